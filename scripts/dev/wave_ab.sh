#!/usr/bin/env bash
# One device call: one 8B layer's graph builds at 128K (build_threads.py, per_kv_head, 2,048 training queries per head,
# key lists of 16, phase profile) with the 8 graphs built all at once (the default) against W at a time
# (RA_DEV_GRAPH_WAVE=W), processes alternated; plus the host's CPU and cache sizes.
#   LIMIT=585 bash scripts/dev/wave_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
(lscpu; grep -H . /sys/devices/system/cpu/cpu0/cache/index*/size 2>/dev/null; nproc) > $OUT/lscpu.txt 2>&1
bash scripts/gpu_run.sh build >> $OUT/run.log 2>&1; save
export PYTHONPATH=$PWD/python:/tmp/pylib
for rep in 1 2; do for w in ${WAVES:-8 1 2 4}; do
  RA_QG_PROFILE=1 RA_DEV_GRAPH_WAVE=$w timeout 150 python3 scripts/dev/build_threads.py --n 131072 --train 2048 --threads 16 \
    --key-lists 16 --modes thread,thread > $OUT/wave${w}_rep$rep.jsonl 2> $OUT/wave${w}_rep$rep.err
  echo "wave $w rep $rep rc=$?: $(grep -o '"knn_s": [0-9.]*\|"key_knn_s": [0-9.]*\|"build_s": [0-9.]*' $OUT/wave${w}_rep$rep.jsonl | tr '\n' ' ')" | tee -a $OUT/run.log
  save
done; done
grep -v -E "^\s*$|^GPU 0|^torch 2" $OUT/run.log | tail -30

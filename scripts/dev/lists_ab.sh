#!/usr/bin/env bash
# One device call: the 128K end-to-end prefill with the GPU key lists exact (as now) against cluster_key_knn (16 probed
# clusters), and that again with the layer builds on 14 OpenMP threads (RA_DEV_BUILD_THREADS) beside the prefill's
# own threads; the GPU time of both list methods; the 128K decode recall of ours with cluster lists.
#   LIMIT=585 bash scripts/dev/lists_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
bash scripts/gpu_run.sh build keyknn >> $OUT/run.log 2>&1; save
for v in "0:" "16:" "16:14"; do
  p=${v%%:*}; th=${v#*:}
  RA_DEV_BUILD_THREADS=$th E2E_METHODS=ours E2E_TRAIN=2048 E2E_ARGS="--key-list-probe $p" bash scripts/gpu_run.sh e2e >> $OUT/run.log 2>&1
  mv $OUT/e2e.jsonl $OUT/e2e_probe${p}_threads${th:-16}.jsonl; mv $OUT/e2e.err $OUT/e2e_probe${p}_threads${th:-16}.log; save
done
DECODE_METHODS=ours DECODE_ARGS="--key-list-probe 16" bash scripts/gpu_run.sh decode >> $OUT/run.log 2>&1
mv $OUT/decode.jsonl $OUT/decode_probe16.jsonl; mv $OUT/decode.err $OUT/decode_probe16.log; save
grep -v -E "^\s*$|^GPU 0|^torch 2" $OUT/run.log | tail -45

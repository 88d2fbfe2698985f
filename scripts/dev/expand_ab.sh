#!/usr/bin/env bash
# One device call: the 128K decode of ours (decode_latency.py, 8B shapes) with the graph search expanding E beam
# candidates per step (RA_DEV_EXPAND=E; 1 = one at a time, as before), runs alternated.
#   LIMIT=585 bash scripts/dev/expand_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
bash scripts/gpu_run.sh build >> $OUT/run.log 2>&1; save
for rep in 1 2; do for e in ${EXPANDS:-1 4 2}; do
  RA_DEV_EXPAND=$e DECODE_METHODS=ours bash scripts/gpu_run.sh decode >> $OUT/run.log 2>&1
  mv $OUT/decode.jsonl $OUT/decode_expand${e}_rep$rep.jsonl; mv $OUT/decode.err $OUT/decode_expand${e}_rep$rep.log; save
  echo "E=$e rep $rep: $(grep -o '"ms_per_token": [0-9.]*\|"cpu_search_ms": [0-9.]*\|"recall": [0-9.]*\|"scanned_frac": [0-9.]*' $OUT/decode_expand${e}_rep$rep.jsonl | tr '\n' ' ')" | tee -a $OUT/summary.txt
done; done
cat $OUT/summary.txt

#!/usr/bin/env bash
# One device call: the A/B of KEY_LIST_COLUMN_STRIDE (1 = every key, the default; 2 = every other key) at 128K on the H200:
# decode (recall and build per layer of ours) and the end-to-end prefill, then the GPU tests on the final code.
#   LIMIT=585 bash scripts/dev/stride_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
bash scripts/gpu_run.sh build >> $OUT/run.log 2>&1; save
for s in 1 2; do
  DECODE_METHODS=ours DECODE_ARGS="--key-list-stride $s" bash scripts/gpu_run.sh decode >> $OUT/run.log 2>&1
  mv $OUT/decode.jsonl $OUT/decode_stride$s.jsonl; mv $OUT/decode.err $OUT/decode_stride$s.log; save
done
for s in 2 1; do
  E2E_METHODS=ours E2E_TRAIN=2048 E2E_ARGS="--key-list-stride $s" bash scripts/gpu_run.sh e2e >> $OUT/run.log 2>&1
  mv $OUT/e2e.jsonl $OUT/e2e_stride$s.jsonl; mv $OUT/e2e.err $OUT/e2e_stride$s.log; save
done
bash scripts/gpu_run.sh tests >> $OUT/run.log 2>&1; save
grep -v -E "^\s*$|^GPU 0|^torch 2" $OUT/run.log | tail -40

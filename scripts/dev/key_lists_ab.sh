#!/usr/bin/env bash
# One device call: the A/B of KEY_LISTS (how the graph builds' GPU key-to-key lists are made: clustered or exact among
# every other key) at 128K on the H200: the clustered-list timing, then the end-to-end prefill with each setting,
# alternated (AB_ROUNDS rounds, default 2).
#   LIMIT=585 bash scripts/dev/key_lists_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
bash scripts/gpu_run.sh build clusknn >> $OUT/run.log 2>&1; save
for r in $(seq 1 ${AB_ROUNDS:-2}); do
  for s in exact clustered; do
    E2E_METHODS=ours E2E_TRAIN=2048 E2E_TAG=_${s}_$r E2E_ARGS="--key-lists $s" bash scripts/gpu_run.sh e2e >> $OUT/run.log 2>&1; save
  done
done
grep -v -E "^\s*$|^GPU 0|^torch 2" $OUT/run.log | tail -40

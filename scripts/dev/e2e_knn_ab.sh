#!/usr/bin/env bash
# Device A/B of the prefill's kNN on a side stream: the 128K end-to-end run with RA_DEV_SYNC_KNN unset (side stream,
# the prefill goes on) and =1 (the prefill waits for each layer's kNN, as before), in the order given by $ORDER.
# Output: $OUT/e2e_ab/<variant>_<i>.{jsonl,err}.   usage: ORDER="side sync" bash scripts/dev/e2e_knn_ab.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python:/tmp/pylib
mkdir -p $OUT/e2e_ab; i=0
for v in ${ORDER:-side sync}; do
  i=$((i + 1)); [ $v = sync ] && export RA_DEV_SYNC_KNN=1 || unset RA_DEV_SYNC_KNN
  timeout ${E2E_S:-150} python3 benchmarks/decode_latency.py --json --contexts 131072 --methods "" --layers 1 --threads 16 --e2e \
    --e2e-context 131072 --e2e-methods ours --index-sharing per_kv_head --max-train-queries 2048 --no-plot --watchdog-s 120 \
    > $OUT/e2e_ab/${v}_$i.jsonl 2> $OUT/e2e_ab/${v}_$i.err
  echo "$v $i rc=$?"; grep -o '"prefill_s": [0-9.]*\|"first_decode_step_s": [0-9.]*\|"indexes_ready_after_prefill_s": [0-9.]*\|"knn_s": [0-9.]*\|"gpu_peak_bytes": [0-9]*' $OUT/e2e_ab/${v}_$i.jsonl | tr '\n' ' '; echo
done

#!/usr/bin/env bash
# DEV A/B on the H200 (one call): build, then the 128K end-to-end run of ours alternately with the old nested teams
# (RA_DEV_SPLIT_TEAMS=1) and the shared work pool, so both variants run on one host. Results in $OUT/o.tgz.
set -u
REAL_OUT=$OUT; rm -rf /tmp/o; mkdir -p /tmp/o
OUT=/tmp/o/build bash scripts/gpu_run.sh build > /tmp/o/build_run.log 2>&1; tail -2 /tmp/o/build_run.log
for v in ${AB_ORDER:-teams pool pool teams}; do
  n=$(ls -d /tmp/o/e2e_${v}_* 2>/dev/null | wc -l); d=/tmp/o/e2e_${v}_$n
  if [ $v = teams ]; then export RA_DEV_SPLIT_TEAMS=1; else unset RA_DEV_SPLIT_TEAMS; fi
  OUT=$d E2E_CTX=131072 E2E_TRAIN=2048 E2E_METHODS=ours E2E_S=${E2E_S:-150} E2E_WATCHDOG_S=120 bash scripts/gpu_run.sh e2e > /tmp/o/run_${v}_$n.log 2>&1
  python3 -c "
import json, sys
for l in open('$d/e2e.jsonl'):
    if '\"decode_e2e\"' in l:
        r = json.loads(l); print('$v', {k: r.get(k) for k in ('prefill_s', 'knn_s', 'first_decode_step_s', 'indexes_ready_after_prefill_s', 'index_build_s', 'ms_per_token')})
" 2>&1 | tail -1
  tar czf $REAL_OUT/o.tgz -C /tmp/o .
done

#!/usr/bin/env bash
# Device call: build, the exception probe (scripts/dev/exc_probe.sh), then the issue-5 accuracy grid for the time left.
# Everything is written under /tmp/o and comes back as one archive ($OUT/o.tgz) since $OUT returns at most 8 files.
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; mkdir -p $OUT; t0=$(date +%s); LIMIT=${LIMIT:-585}
bash scripts/gpu_run.sh build > $OUT/run.log 2>&1
timeout 150 bash scripts/dev/exc_probe.sh > $OUT/exc_probe.log 2>&1
left=$(( LIMIT - ($(date +%s) - t0) - 130 ))
ACC_BUDGET_S=$left ${ACC_EXTRA:-} bash scripts/gpu_run.sh accuracy_full >> $OUT/run.log 2>&1
tar czf $REAL_OUT/o.tgz -C /tmp/o .
cat $OUT/run.log | grep -v "^\s*$" | tail -30; echo ----; tail -45 $OUT/exc_probe.log

#!/usr/bin/env bash
# One device call: the given scripts/gpu_run.sh steps in order, everything written under /tmp/o and returned as one
# archive ($OUT/o.tgz; $OUT returns at most 8 files). An accuracy_full or accuracy_par step gets the time left before LIMIT seconds
# (minus a margin for its last cell) as its budget.   usage: LIMIT=585 bash scripts/dev/device_call.sh build [bg:gputests] [NAME=value] accuracy_par
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT; t0=$(date +%s); LIMIT=${LIMIT:-585}
for step in "$@"; do
  case $step in *=*) export "$step"; continue;; esac  # NAME=value: set for the steps after it (e.g. E2E_TAG=_ddb E2E_ARGS=...)
  if [ "${step#bg:}" != "$step" ]; then  # bg:STEP runs beside the following steps, on GPU BG_GPU with 4 CPU threads
    CUDA_VISIBLE_DEVICES=${BG_GPU:-1} OMP_NUM_THREADS=4 bash scripts/gpu_run.sh "${step#bg:}" >> $OUT/bg.log 2>&1 & continue; fi
  if [ "$step" = accuracy_full ] || [ "$step" = accuracy_par ]; then export ACC_BUDGET_S=$(( LIMIT - ($(date +%s) - t0) - ${ACC_MARGIN_S:-130} )); fi
  bash scripts/gpu_run.sh "$step" >> $OUT/run.log 2>&1
  tar czf $REAL_OUT/o.tgz -C /tmp/o .  # after every step: a call cut short by its limit still returns what was done
done
wait
cat $OUT/bg.log >> $OUT/run.log 2>/dev/null
tar czf $REAL_OUT/o.tgz -C /tmp/o .
grep -v -E "^\s*$|^GPU 0|^torch 2" $OUT/run.log | tail -40

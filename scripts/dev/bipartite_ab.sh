#!/usr/bin/env bash
# One device call: the chunked top-k of exact_knn against the full one (scripts/dev/bipartite_knn_time.py), the CUDA
# op tests (test_cuda_ops.py, with the chunked exact_knn test), and the 128K end-to-end run of ours.
#   LIMIT=300 bash scripts/dev/bipartite_ab.sh     (outputs in $OUT/o.tgz)
set -u
REAL_OUT=$OUT; export OUT=/tmp/o; rm -rf $OUT; mkdir -p $OUT
save() { tar czf $REAL_OUT/o.tgz -C /tmp/o .; }
bash scripts/gpu_run.sh build >> $OUT/run.log 2>&1; save
export PYTHONPATH=$PWD/python:/tmp/pylib
timeout 60 python3 scripts/dev/bipartite_knn_time.py > $OUT/bipartite_knn_time.jsonl 2> $OUT/bipartite_knn_time.err; echo "bench rc=$?" >> $OUT/run.log; save
timeout 90 python3 -m pytest -q -x tests/python/test_cuda_ops.py > $OUT/pytest_cuda_ops.log 2>&1; echo "pytest rc=$?" >> $OUT/run.log; save
E2E_METHODS=ours E2E_TRAIN=2048 bash scripts/gpu_run.sh e2e >> $OUT/run.log 2>&1; save
cat $OUT/bipartite_knn_time.jsonl; tail -2 $OUT/pytest_cuda_ops.log; grep -o '"prefill_s": [0-9.]*\|"knn_s": [0-9.]*\|"indexes_ready_after_prefill_s": [0-9.]*' $OUT/e2e.jsonl

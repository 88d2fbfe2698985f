#!/usr/bin/env bash
# One device call on the GPU machine: build with CUDA (sm_90), GPU tests, demo, recall, accuracy and build-time
# benchmarks, each under its own time limit; logs and JSON lines under $OUT. Needs .deps/eigen3 carried
# (cp -r /usr/include/eigen3 .deps/eigen3 here first) and the faiss wheel in .whl/ (carry [".deps", ".whl"]).
#   usage: bash scripts/gpu_run.sh [steps...]
# accuracy_full runs the issue-5 grid under a time budget (ACC_BUDGET_S) and resumes from ACC_RESUME (a jsonl of an
# earlier call copied into the tree, e.g. benchmarks/results/acc_partial.jsonl), so the grid can span several calls.
set -u
OUT=${OUT:-/tmp/ra_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 EIGEN_INCLUDE_DIR=$PWD/.deps/eigen3 PYTHONPATH=$PWD/python:/tmp/pylib  # /tmp/pylib: the carried faiss wheel, unpacked by the build step
steps=${*:-"build tests demo recall accuracy buildtime"}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
for s in $steps; do case $s in
build) stamp build; ls .whl/faiss*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --target /tmp/pylib .whl/faiss*.whl > "$OUT/faiss_install.log" 2>&1; python3 -c "import faiss; print('faiss', faiss.__version__)"; timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -3 "$OUT/build.log"
       python3 -c "import retrieval_attention as ra, retrieval_attention._ext as e; print('HAS_CUDA_KERNELS', e.HAS_CUDA_KERNELS)"
       grep "no shared libstdc" "$OUT/build.log"; readelf -d python/retrieval_attention/_C*.so | grep NEEDED | tr -s ' ' | cut -d' ' -f6 | tr '\n' ' '; echo;;
tests) stamp tests; timeout 420 python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_ops.py tests/python/test_ops.py tests/python/test_hf_exactness.py tests/python/test_index.py tests/python/test_reliability.py > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "FAILED|ERROR|crashed" "$OUT/pytest_gpu.log" | head -20; tail -3 "$OUT/pytest_gpu.log";;
exc) stamp exc  # a C++ error inside a raw torch.ops kernel must reach Python as an exception, not crash the process
     python3 -c "
import torch, retrieval_attention
try:
    torch.ops.retrieval_attention.dense_attention(torch.randn(4, 3, 8), torch.randn(2, 10, 4), torch.randn(2, 10, 8), 1.0, False)
except Exception as e:
    print('raw op error caught:', type(e).__name__, str(e)[:70])
" 2>&1 | tail -2; echo "exc rc=${PIPESTATUS[0]}";;
gputests) stamp gputests; timeout ${GPUTESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_ops.py tests/python/test_hf_exactness.py tests/python/test_reliability.py::test_ops_bad_and_edge_inputs tests/python/test_packaging.py::test_extension_loads_the_shared_cxx_runtime > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "FAILED|crashed" "$OUT/pytest_gpu.log" | head -12; tail -2 "$OUT/pytest_gpu.log";;
decode) stamp decode; timeout ${DECODE_S:-300} python3 benchmarks/decode_latency.py --json --contexts ${DECODE_CTX:-131072} --layers 1 --threads 16 --methods ${DECODE_METHODS:-full,ours,flat,ivf,static} ${DECODE_ARGS:-} --out "$OUT" --no-plot > "$OUT/decode.jsonl" 2> "$OUT/decode.err"; echo "decode rc=$?"; tail -25 "$OUT/decode.err";;
demo) stamp demo; timeout 120 python3 examples/passkey_demo.py --context 8000 2>&1 | grep -v Warn | tee "$OUT/demo.log" | tail -6;;
recall) stamp recall; timeout 200 python3 benchmarks/recall.py --json --data real,model_qk --dump-if-missing --threads 16 --qg-device cuda --out "$OUT" > "$OUT/recall.jsonl" 2> "$OUT/recall.err"; echo "recall rc=$?"; grep recall_summary "$OUT/recall.jsonl" | cut -c1-300;;
accuracy) stamp accuracy; timeout 240 python3 benchmarks/accuracy.py --json --contexts 4096,16384 --samples 10 --tasks passkey,kv --methods full,retrieval_attention,flat_topk,static_only --out "$OUT" > "$OUT/accuracy.jsonl" 2> "$OUT/accuracy.err"; echo "accuracy rc=$?"; cut -c1-200 "$OUT/accuracy.jsonl";;
accuracy_full) stamp accuracy_full; timeout $(( ${ACC_BUDGET_S:-420} + 120 )) python3 benchmarks/accuracy.py --json --budget-s ${ACC_BUDGET_S:-420} \
       ${ACC_RESUME:+--resume $ACC_RESUME} --index-sharing ${ACC_SHARING:-per_query_head} --out "$OUT/acc" > "$OUT/accuracy_full.jsonl" 2> "$OUT/accuracy_full.err"
       echo "accuracy_full rc=$?"; grep -c '"bench": "accuracy"' "$OUT/accuracy_full.jsonl"; grep "past --budget-s" "$OUT/accuracy_full.err" | head -3;;
accuracy_par) stamp accuracy_par  # the grid split over the GPUs: ACC_SPLIT holds one comma list of tasks per GPU
       i=0; for tl in ${ACC_SPLIT:-passkey,kv niah,niah_multi}; do kl=none; [ $i = 0 ] && kl=2048,8192
         CUDA_VISIBLE_DEVICES=$i OMP_NUM_THREADS=${ACC_THREADS:-16} timeout $(( ${ACC_BUDGET_S:-420} + 120 )) python3 benchmarks/accuracy.py --json \
           --budget-s ${ACC_BUDGET_S:-420} ${ACC_RESUME:+--resume $ACC_RESUME} --tasks $tl --kl-contexts $kl --threads ${ACC_THREADS:-16} \
           --out "$OUT/acc$i" > "$OUT/acc$i.jsonl" 2> "$OUT/acc$i.err" &
         i=$((i + 1)); done; wait
       for f in "$OUT"/acc[0-9].jsonl; do echo "$f: $(grep -c '"bench": "accuracy' "$f") lines"; grep "past --budget-s" "${f%.jsonl}.err" | head -2; done;;
e2e) stamp e2e; timeout ${E2E_S:-500} python3 benchmarks/decode_latency.py --json --contexts 131072 --methods "" --layers 1 --threads 16 --e2e \
       --e2e-methods ${E2E_METHODS:-full,ours} --index-sharing ${E2E_SHARING:-per_kv_head} --max-train-queries ${E2E_TRAIN:-4096} --no-plot \
       > "$OUT/e2e.jsonl" 2> "$OUT/e2e.err"; echo "e2e rc=$?"; grep decode_e2e "$OUT/e2e.jsonl" | cut -c1-400;;
buildtime) stamp buildtime; timeout 150 python3 benchmarks/recall.py --build-time --json --bt-layers 2 --bt-heads 32 --bt-kv-heads 8 --bt-n 131072 --bt-d 128 --threads 16 --qg-device cuda > "$OUT/buildtime.jsonl" 2> "$OUT/buildtime.err"; echo "buildtime rc=$?"; tail -3 "$OUT/buildtime.jsonl" | cut -c1-300;;
esac; done
stamp done

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
nvidia-smi -L; echo "THP $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"  # huge pages for key rows: see huge_page_allocator.h
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
# run_acc_queue GPU "item+item+...": each item "tasks@contexts@cost_s[@kl_contexts]" is one accuracy.py run on that GPU,
# started only when its estimated cost fits the seconds left of ACC_BUDGET_S, so that no cell is killed half done
# (cost 0: start anyway; the default queues, the whole grid, are then cut at the budget and resumed by the next call).
# Lines go to .acc_state/ (git-ignored, so a warm machine keeps them for the next call) and every run resumes from
# ACC_RESUME plus all of .acc_state: a grid spans several calls without copying results back in between.
run_acc_queue() {
  local gpu=$1 tasks ctx cost kl left; mkdir -p .acc_state
  for item in ${2//+/ }; do
    IFS=@ read -r tasks ctx cost kl <<< "$item"
    left=$(( ACC_BUDGET_S - ($(date +%s) - acc_t0) ))
    # -le: more seconds left than the estimate, and never "timeout 0", which would mean no limit
    if [ "$left" -le "$cost" ]; then echo "GPU $gpu: $item not started, ${left}s left" >&2; continue; fi
    grep -h '}$' ${ACC_RESUME:-/dev/null} .acc_state/g*.jsonl 2>/dev/null > .acc_state/resume_g$gpu.jsonl
    CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=${ACC_THREADS:-16} timeout $left python3 benchmarks/accuracy.py --json \
      --resume .acc_state/resume_g$gpu.jsonl --tasks $tasks --contexts $ctx --kl-contexts ${kl:-none} --threads ${ACC_THREADS:-16} ${ACC_EXTRA:-} \
      >> .acc_state/g${gpu}_$(date +%s).jsonl 2>> .acc_state/g$gpu.err
    echo "GPU $gpu: $item rc=$? in $(( $(date +%s) - acc_t0 - (ACC_BUDGET_S - left) ))s" >&2
  done
}
# run_e2e NAME METHODS: the end-to-end generate benchmark (random 8B Llama) into $OUT/NAME$E2E_TAG.{jsonl,err}
run_e2e() {
  local f="$OUT/$1${E2E_TAG:-}"
  timeout ${E2E_S:-500} python3 benchmarks/decode_latency.py --json --contexts 131072 --methods "" --layers 1 --threads 16 --e2e --e2e-context ${E2E_CTX:-131072} --watchdog-s ${E2E_WATCHDOG_S:-400} \
    --e2e-methods $2 ${E2E_ARGS:-} --index-sharing ${E2E_SHARING:-per_kv_head} --max-train-queries ${E2E_TRAIN:-4096} --no-plot > "$f.jsonl" 2> "$f.err"
  echo "$1 rc=$?"; grep decode_e2e "$f.jsonl" | cut -c1-400
}
acc_t0=$(date +%s)
for s in $steps; do case $s in
build) stamp build; ls .whl/faiss*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --target /tmp/pylib .whl/faiss*.whl > "$OUT/faiss_install.log" 2>&1; python3 -c "import faiss; print('faiss', faiss.__version__)"; timeout 300 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$?"; tail -3 "$OUT/build.log"
       python3 -c "import retrieval_attention as ra, retrieval_attention._ext as e; print('HAS_CUDA_KERNELS', e.HAS_CUDA_KERNELS)"
       grep "no shared libstdc" "$OUT/build.log"; readelf -d python/retrieval_attention/_C*.so | grep NEEDED | tr -s ' ' | cut -d' ' -f6 | tr '\n' ' '; echo;;
tests) stamp tests; timeout 420 python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_ops.py tests/python/test_ops.py tests/python/test_hf_exactness.py tests/python/test_index.py tests/python/test_reliability.py tests/python/test_sharing_and_persist.py tests/python/test_rope_shift.py > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "FAILED|ERROR|crashed" "$OUT/pytest_gpu.log" | head -20; tail -3 "$OUT/pytest_gpu.log";;
pytestk) stamp pytestk; timeout ${PYTESTK_S:-200} python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_ops.py tests/python/test_ops.py tests/python/test_index.py -k "${PYTEST_K:-chunk_top}" > "$OUT/pytest_k.log" 2>&1; echo "pytest -k rc=$?"; grep -E "FAILED|ERROR|Error|assert" "$OUT/pytest_k.log" | head -20; tail -3 "$OUT/pytest_k.log";;
exc) stamp exc  # a C++ error inside a raw torch.ops kernel must reach Python as an exception, not crash the process
     python3 -c "
import torch, retrieval_attention
try:
    torch.ops.retrieval_attention.dense_attention(torch.randn(4, 3, 8), torch.randn(2, 10, 4), torch.randn(2, 10, 8), 1.0, False)
except Exception as e:
    print('raw op error caught:', type(e).__name__, str(e)[:70])
" 2>&1 | tail -2; echo "exc rc=${PIPESTATUS[0]}";;
alltests) stamp alltests  # ALLTESTS_FILES: a part of the suite (the whole of it needs more than one call's step limit on the H200)
          timeout ${ALLTESTS_S:-300} python3 -m pytest -v -rfE -p no:cacheprovider ${ALLTESTS_FILES:-tests/python} > "$OUT/pytest_all${ALLTESTS_TAG:-}.log" 2>&1; echo "pytest all rc=$?"; grep -E "FAILED|crashed" "$OUT/pytest_all${ALLTESTS_TAG:-}.log" | head -12; tail -2 "$OUT/pytest_all${ALLTESTS_TAG:-}.log";;
gputests) stamp gputests; timeout ${GPUTESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_ops.py tests/python/test_hf_exactness.py tests/python/test_reliability.py::test_ops_bad_and_edge_inputs tests/python/test_packaging.py::test_extension_loads_the_shared_cxx_runtime tests/python/test_sharing_and_persist.py::test_builtin_retrieval_equals_the_hook_path tests/python/test_sharing_and_persist.py::test_decoding_does_not_wait_for_the_index_build tests/python/test_sharing_and_persist.py::test_on_cpu_tokens_hook_gets_the_prompt_rows > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "FAILED|crashed" "$OUT/pytest_gpu.log" | head -12; tail -2 "$OUT/pytest_gpu.log";;
decode) stamp decode; timeout ${DECODE_S:-300} python3 benchmarks/decode_latency.py --json --contexts ${DECODE_CTX:-131072} --layers 1 --threads 16 --methods ${DECODE_METHODS:-full,ours,flat,ivf,static} ${DECODE_ARGS:-} --out "$OUT" --no-plot > "$OUT/decode${DECODE_TAG:-}.jsonl" 2> "$OUT/decode${DECODE_TAG:-}.err"; echo "decode rc=$?"; tail -25 "$OUT/decode${DECODE_TAG:-}.err";;
profile) stamp profile  # where a decode step's fixed per-layer cost goes: one profiled decode_attention call per method
       timeout ${PROFILE_S:-240} python3 benchmarks/decode_latency.py --json --contexts ${DECODE_CTX:-131072} --layers 1 --threads 16 --methods ours,static \
         --profile "$OUT/prof" --no-plot > "$OUT/profile.jsonl" 2> "$OUT/profile.err"; echo "profile rc=$?"; head -22 "$OUT"/prof/profile_*_static.txt | cut -c1-160;;
demo) stamp demo; timeout 120 python3 examples/passkey_demo.py --context 8000 2>&1 | grep -v Warn | tee "$OUT/demo.log" | tail -6;;
recall) stamp recall; timeout 200 python3 benchmarks/recall.py --json --data real,model_qk --dump-if-missing --threads 16 --qg-device cuda --out "$OUT" > "$OUT/recall.jsonl" 2> "$OUT/recall.err"; echo "recall rc=$?"; grep recall_summary "$OUT/recall.jsonl" | cut -c1-300;;
accuracy) stamp accuracy; timeout 240 python3 benchmarks/accuracy.py --json --contexts 4096,16384 --samples 10 --tasks passkey,kv --methods full,retrieval_attention,flat_topk,static_only --out "$OUT" > "$OUT/accuracy.jsonl" 2> "$OUT/accuracy.err"; echo "accuracy rc=$?"; cut -c1-200 "$OUT/accuracy.jsonl";;
accuracy_full) stamp accuracy_full; timeout $(( ${ACC_BUDGET_S:-420} + 120 )) python3 benchmarks/accuracy.py --json --budget-s ${ACC_BUDGET_S:-420} \
       ${ACC_RESUME:+--resume $ACC_RESUME} --index-sharing ${ACC_SHARING:-per_query_head} --out "$OUT/acc" > "$OUT/accuracy_full.jsonl" 2> "$OUT/accuracy_full.err"
       echo "accuracy_full rc=$?"; grep -c '"bench": "accuracy"' "$OUT/accuracy_full.jsonl"; grep "past --budget-s" "$OUT/accuracy_full.err" | head -3;;
accuracy_par) stamp accuracy_par  # the grid as one queue of cells per GPU, run side by side (see run_acc_queue)
       g=0; for q in ${ACC_QUEUES:-passkey,kv@1024,2048,4096,8192,16384,32768@0@2048,8192 niah,niah_multi@1024,2048,4096,8192,16384,32768@0}; do
         run_acc_queue $g "$q" & g=$((g + 1)); done; wait
       cp .acc_state/g*.jsonl .acc_state/*.err "$OUT"/ 2>/dev/null; for f in .acc_state/g*.jsonl; do echo "$f: $(grep -c '"bench": "accuracy' "$f") lines"; done;;
acc_ab) stamp acc_ab  # retrieval_attention on the same samples with the default share of training queries moved by RoPE and with none
       for v in shift noshift; do timeout ${ACCAB_S:-200} python3 benchmarks/accuracy.py --json --contexts ${ACCAB_CTX:-32768} --samples ${ACCAB_N:-20} \
         --tasks ${ACCAB_TASKS:-niah} --methods retrieval_attention --kl-contexts none $( [ $v = noshift ] && echo --train-shift 0 ) \
         > "$OUT/acc_ab_$v.jsonl" 2> "$OUT/acc_ab_$v.err"; echo "acc_ab $v rc=$?"; cut -c1-300 "$OUT/acc_ab_$v.jsonl"; done;;
acc_ra) stamp acc_ra  # retrieval_attention alone with the default config, one accuracy.py run per context of ACCRA_CTX (in that order), each cell started only within ACCRA_BUDGET_S of the step's start
       for ctx in ${ACCRA_CTX:-16384 8192 4096}; do left=$(( ${ACCRA_BUDGET_S:-300} - ($(date +%s) - acc_t0) )); [ "$left" -le 0 ] && { echo "acc_ra $ctx: not started"; continue; }
         timeout $(( left + 120 )) python3 benchmarks/accuracy.py --json --contexts $ctx --samples ${ACCRA_N:-50} --tasks ${ACCRA_TASKS:-passkey,kv,niah,niah_multi} \
           --methods retrieval_attention --kl-contexts none --budget-s $left > "$OUT/acc_ra_$ctx.jsonl" 2> "$OUT/acc_ra_$ctx.err"; echo "acc_ra $ctx rc=$?"; cut -c1-260 "$OUT/acc_ra_$ctx.jsonl"; done;;
e2e) stamp e2e; run_e2e e2e "${E2E_METHODS:-full,ours}";;
e2e_ab) stamp e2e_ab  # the e2e run of E2E_AB_METHODS with the package's .py files overlaid by those in .ab/ (carried): an A/B of Python changes in one call
       rm -rf /tmp/ab && mkdir -p /tmp/ab && cp -r python/retrieval_attention /tmp/ab/ && cp .ab/*.py /tmp/ab/retrieval_attention/ && echo "overlaid: $(ls .ab)" && PYTHONPATH=/tmp/ab python3 -c "import retrieval_attention.cache as c; print(c.__file__)"
       PYTHONPATH=/tmp/ab:/tmp/pylib run_e2e e2e_ab "${E2E_AB_METHODS:-ours}";;
buildthreads) stamp buildthreads; for n in ${BT_NS:-16384 131072}; do RA_QG_PROFILE=${BT_PROFILE:-0} timeout 200 python3 scripts/dev/build_threads.py --n $n --train ${BT_TRAIN:-4096} --threads 16 --key-lists ${BT_LISTS:-0} --modes ${BT_MODES:-main,thread} ${BT_EXTRA:-}; done \
       > "$OUT/buildthreads${BT_TAG:-}.jsonl" 2> "$OUT/buildthreads${BT_TAG:-}.err"; echo "buildthreads rc=$?"; cut -c1-400 "$OUT/buildthreads${BT_TAG:-}.jsonl";;
offload) stamp offload; timeout 150 python3 scripts/dev/offload_time.py > "$OUT/offload.jsonl" 2> "$OUT/offload.err"; echo "offload rc=$?"; cat "$OUT/offload.jsonl"; tail -3 "$OUT/offload.err";;
projtime) stamp projtime; timeout 150 python3 scripts/dev/projection_time.py > "$OUT/projection_time.log" 2> "$OUT/projection_time.err"; echo "projtime rc=$?"; cut -c1-180 "$OUT/projection_time.log" | head -24; tail -3 "$OUT/projection_time.err";;
bipknn) stamp bipknn; timeout 150 python3 scripts/dev/bipartite_knn_time.py > "$OUT/bipartite_knn_time.jsonl" 2> "$OUT/bipartite_knn_time.err"; echo "bipknn rc=$?"; cat "$OUT/bipartite_knn_time.jsonl"; tail -3 "$OUT/bipartite_knn_time.err";;
storetime) stamp storetime; timeout 200 python3 scripts/dev/store_copy_time.py --lists --tokens 131072 --repeats 5 > "$OUT/store_time.jsonl" 2> "$OUT/store_time.err"; echo "storetime rc=$?"; cat "$OUT/store_time.jsonl"; tail -3 "$OUT/store_time.err";;
keyknn) stamp keyknn; timeout 120 python3 scripts/dev/key_knn_time.py > "$OUT/key_knn_time.jsonl" 2> "$OUT/key_knn_time.err"; echo "keyknn rc=$?"; cat "$OUT/key_knn_time.jsonl"; tail -3 "$OUT/key_knn_time.err";;
ncu) stamp ncu  # Nsight Compute on one launch of the fused score + top-m kernel (scripts/dev/score_top_profile.py)
     timeout ${NCU_S:-150} /usr/local/cuda/bin/ncu -k regex:score_top --set detailed --metrics smsp__inst_executed_pipe_tensor.sum,smsp__inst_executed_op_shared_ld.sum,smsp__inst_executed_op_shared_atom.sum \
       python3 scripts/dev/score_top_profile.py > "$OUT/ncu.txt" 2>&1; echo "ncu rc=$?"; grep -E "Duration|Executed Instructions  |Issued Warp|Warp Cycles Per Issued|Achieved Occupancy|pipe_tensor|Compute \(SM\) Throughput|Memory Throughput" "$OUT/ncu.txt" | head -12
     # per-instruction samples of where warps stall (SASS with stall reasons), for NCU_SOURCE=1
     if [ "${NCU_SOURCE:-0}" = 1 ]; then timeout 150 /usr/local/cuda/bin/ncu -k regex:score_top --section WarpStateStats --section SourceCounters -f -o /tmp/st_rep python3 scripts/dev/score_top_profile.py > "$OUT/ncu_src.log" 2>&1
       /usr/local/cuda/bin/ncu -i /tmp/st_rep.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_sass.csv" 2>> "$OUT/ncu_src.log"; echo "ncu source rc=$? $(wc -l < "$OUT/ncu_sass.csv") lines"
       /usr/local/cuda/bin/ncu -i /tmp/st_rep.ncu-rep --page details > "$OUT/ncu_warpstate.txt" 2>&1; fi;;
buildtime) stamp buildtime; timeout 150 python3 benchmarks/recall.py --build-time --json --bt-layers 2 --bt-heads 32 --bt-kv-heads 8 --bt-n 131072 --bt-d 128 --threads 16 --qg-device cuda > "$OUT/buildtime.jsonl" 2> "$OUT/buildtime.err"; echo "buildtime rc=$?"; tail -3 "$OUT/buildtime.jsonl" | cut -c1-300;;
esac; done
stamp done

// tests/cuda/compile_check.cu -- torch-free translation unit that instantiates every kernel template of
// include/retrieval_attention/cuda/decode_attention.cuh and chunk_top.cuh, so `nvcc -c` type-checks and assembles all of them
// on a machine without a GPU or a CUDA build of torch (scripts/compile_cuda.sh). Nothing here is run.
//
// Each dense_attention<T> / sparse_attention<T> instantiation pulls in the three kernel shapes the
// dispatcher can pick (16-byte vector path for d = dv = 64 and 128, generic warp-per-key path) plus the
// split combine kernel; merge_attention instantiates the merge kernel; chunk_top_candidates the chunk-top kernel
// for every supported chunk width and score type; score_top_candidates the fused score + top-m kernel for every dim.
#include "retrieval_attention/cuda/chunk_top.cuh"
#include "retrieval_attention/cuda/decode_attention.cuh"
#include "retrieval_attention/cuda/score_top.cuh"

namespace rac = retrieval_attention::cuda;

template cudaError_t rac::dense_attention<float>(const rac::AttentionParams<float>&, int, float*, cudaStream_t);
template cudaError_t rac::dense_attention<__half>(const rac::AttentionParams<__half>&, int, float*, cudaStream_t);
template cudaError_t rac::dense_attention<__nv_bfloat16>(const rac::AttentionParams<__nv_bfloat16>&, int, float*, cudaStream_t);
template cudaError_t rac::sparse_attention<float>(const rac::AttentionParams<float>&, int, float*, cudaStream_t);
template cudaError_t rac::sparse_attention<__half>(const rac::AttentionParams<__half>&, int, float*, cudaStream_t);
template cudaError_t rac::sparse_attention<__nv_bfloat16>(const rac::AttentionParams<__nv_bfloat16>&, int, float*, cudaStream_t);

// A host function that calls every public entry point, so the non-template ones are compiled too.
cudaError_t retrieval_attention_compile_check_all(cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const int sms = rac::device_sm_count(0);
  const int splits = rac::choose_splits(32, 640, sms);
  (void)rac::workspace_floats(32, 128, splits);
  (void)rac::supports_dims(128, 128);
  rac::AttentionParams<__half> ph;
  err = rac::dense_attention(ph, splits, nullptr, stream);
  rac::AttentionParams<__nv_bfloat16> pb;
  if (err == cudaSuccess) err = rac::sparse_attention(pb, splits, nullptr, stream);
  if (err == cudaSuccess) err = rac::merge_attention(nullptr, nullptr, nullptr, nullptr, 0, 0, nullptr, rac::Elem::kBFloat16, nullptr, stream);
  (void)rac::chunk_top_supported(1024, 128, 4, 64);
  (void)rac::chunk_top_smem_bytes(1024, 128, 4);
  for (int64_t chunk = 8; chunk <= 256 && err == cudaSuccess; chunk *= 2) {
    err = rac::chunk_top_candidates<__half>(nullptr, 1, 4 * chunk, chunk, 2, 8, nullptr, stream);
    if (err == cudaSuccess) err = rac::chunk_top_candidates<__nv_bfloat16>(nullptr, 1, 4 * chunk, chunk, 2, 8, nullptr, stream);
  }
  (void)rac::rerank_l2_supported(1000, 128, 64, 16);
  if (err == cudaSuccess) err = rac::rerank_l2<float>(nullptr, 1, 10, 8, 0, nullptr, 1, 4, 2, nullptr, stream);
  if (err == cudaSuccess) err = rac::rerank_l2<__half>(nullptr, 1, 10, 8, 0, nullptr, 1, 4, 2, nullptr, stream);
  if (err == cudaSuccess) err = rac::rerank_l2<__nv_bfloat16>(nullptr, 1, 10, 8, 0, nullptr, 1, 4, 2, nullptr, stream);
  (void)rac::score_top_supported(128, 1000, 64);
  (void)rac::score_top_smem_bytes(128);
  for (int64_t dim = 64; dim <= 256 && err == cudaSuccess; dim *= 2)
    err = rac::score_top_candidates(nullptr, nullptr, nullptr, 1, 10, 10, dim, 0, 10, 2, 8, nullptr, stream);
  return err;
}

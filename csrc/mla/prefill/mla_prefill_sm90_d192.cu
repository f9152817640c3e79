// The head_dim_qk = 192 (128 nope + 64 rope) / head_dim_v = 128 instantiation of the
// Hopper MLA prefill kernel and its host-side launch (no torch): encodes the three TMA
// descriptors and launches the persistent grid.
#include <cuda.h>
#include <cuda_runtime.h>

#include "common/sm90_host.h"
#include "mla/prefill/mla_prefill_sm90.h"
#include "mla/prefill/mla_prefill_sm90_kernel.cuh"

namespace tokenspeed::mla_prefill_sm90 {
namespace {

constexpr int kHeadDimQK = 192;
using Layout192 = SmemLayout<kHeadDimQK>;

using sm90::encode_tiled;
using sm90::EncodeTiledFn;

// A [tokens, heads, dim] bf16 tensor as a 3-D TMA tensor (dim, head, token); a box is
// 64 dims x 1 head x 128 tokens = one [128 rows][64 bf16] smem panel, 128-byte swizzled.
// Tokens past `tokens` read as zeros.
cudaError_t make_map(CUtensorMap* map, const void* base, int64_t dim, int64_t heads, int64_t tokens,
                     int64_t stride_h, int64_t stride_t) {
  EncodeTiledFn encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(tokens)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(stride_h) * 2, static_cast<cuuint64_t>(stride_t) * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(kBlockN)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult res = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims, strides,
                              box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Raises the dynamic shared memory limit above 48 KB, once per device (the first call
// happens before any graph capture in practice: warm-up).
cudaError_t allow_large_smem() {
  static sm90::LargeSmemOptIn opt_in;
  return opt_in.ensure(reinterpret_cast<const void*>(&mla_prefill_sm90_kernel<kHeadDimQK>), Layout192::kSmemBytes);
}

}  // namespace

size_t mla_prefill_sm90_d192_smem_bytes() { return static_cast<size_t>(Layout192::kSmemBytes); }

cudaError_t launch_mla_prefill_sm90_d192(const MlaPrefillSm90Params& params, const MlaPrefillSm90Tensors& t,
                                         int grid, cudaStream_t stream, const char** bad_tensor) {
  *bad_tensor = nullptr;
  if (params.batch == 0 || t.total_q == 0) return cudaSuccess;
  CUtensorMap q_map, k_map, v_map;
  cudaError_t err = make_map(&q_map, t.q, kHeadDimQK, t.heads, t.total_q, t.q_stride_h, t.q_stride_t);
  if (err != cudaSuccess) {
    if (err == cudaErrorInvalidValue) *bad_tensor = "q";
    return err;
  }
  err = make_map(&k_map, t.k, kHeadDimQK, t.kv_heads, t.total_k, t.k_stride_h, t.k_stride_t);
  if (err != cudaSuccess) {
    if (err == cudaErrorInvalidValue) *bad_tensor = "k";
    return err;
  }
  err = make_map(&v_map, t.v, kHeadDimV, t.kv_heads, t.total_k, t.v_stride_h, t.v_stride_t);
  if (err != cudaSuccess) {
    if (err == cudaErrorInvalidValue) *bad_tensor = "v";
    return err;
  }
  err = allow_large_smem();
  if (err != cudaSuccess) return err;
  mla_prefill_sm90_kernel<kHeadDimQK><<<grid, kThreads, Layout192::kSmemBytes, stream>>>(q_map, k_map, v_map, params);
  return cudaGetLastError();
}

#if TS_PF_TRACE
// Probe builds only (scripts/dev/prefill_probe.cu): the steady-state timeline of the last launch.
cudaError_t mla_prefill_sm90_trace_copy(uint32_t* dst) {
  return cudaMemcpyFromSymbol(dst, g_pf_trace, sizeof(g_pf_trace));
}
#endif

}  // namespace tokenspeed::mla_prefill_sm90

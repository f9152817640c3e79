// CUDA launcher of tokenspeed::mla_prefill for Hopper (sm_90a): validate, allocate,
// launch. The kernel is in csrc/mla/prefill/; the design is in csrc/mla/README.md
// ("The sm90 prefill kernel").
//
// What this kernel takes (everything else is refused with a message that points at the
// registry, which routes such calls to the Triton or reference backend):
//   q bf16 [total_q, heads, 192], k bf16 [total_k, kv_heads, 192], v bf16
//   [total_k, kv_heads, 128], heads a multiple of kv_heads (MLA: equal); rows 16-byte
//   aligned (data pointers and token / head strides in multiples of 8 elements);
//   softmax_scale > 0.
//
// No host sync and no value-dependent allocation: every CTA walks the tile schedule from
// cu_seqlens on the device, and the grid depends only on (batch, heads, max_seqlen_q, SMs),
// so a call can be captured in a CUDA graph. Lengths are not checked against the tensors
// here (that needs the values on the host): rows outside q are never written and keys
// outside k / v read as zeros. Set TOKENSPEED_DEBUG_CHECKS=1 to validate cu_seqlens with
// a device sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>  // not torch/torch.h: halves this file's compile time

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "common/cuda_launch.h"
#include "mla/mla_checks.h"
#include "mla/prefill/mla_prefill_sm90.h"

namespace tokenspeed {
namespace {

namespace pf = tokenspeed::mla_prefill_sm90;

constexpr const char* kOp = "mla_prefill";
constexpr const char* kUseRegistry = kSm90UseRegistry;
constexpr int64_t kHeadDimQK = 192;

// TMA needs 16-byte aligned rows: the base and the token / head strides in multiples of
// 8 bf16 elements (the last dimension is contiguous, checked by the shared checks).
void check_rows_aligned(const char* name, const at::Tensor& t) {
  TORCH_CHECK(aligned16(t.data_ptr()) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0, kOp, ": ", name,
              "'s rows must be 16-byte aligned (data pointer and strides in multiples of 8 elements), got strides ",
              t.strides());
}

std::tuple<at::Tensor, at::Tensor> mla_prefill_sm90_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                         int64_t max_seqlen_k, double softmax_scale, bool causal) {
  // arch
  const at::Device device = q.is_cuda() ? q.device() : (k.is_cuda() ? k.device() : v.device());
  check_sm90(kOp, device);
  // dtype, device, ranks, shapes (shared with every backend)
  check_mla_prefill_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale);
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got ", q.device());
  // what this kernel covers
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, kOp, ": q, k and v must be bfloat16, got ",
              c10::toString(q.scalar_type()), kUseRegistry);
  TORCH_CHECK(q.size(2) == kHeadDimQK, kOp, ": head_dim_qk (q.shape[2]) must be ", kHeadDimQK,
              " (128 nope + 64 rope), got ", q.size(2), kUseRegistry);
  TORCH_CHECK(v.size(2) == pf::kHeadDimV, kOp, ": head_dim_v (v.shape[2]) must be ", pf::kHeadDimV, ", got ",
              v.size(2), kUseRegistry);
  TORCH_CHECK(softmax_scale > 0.0, kOp, ": softmax_scale must be > 0 for this kernel (its row maximum is taken ",
              "before scaling), got ", softmax_scale, kUseRegistry);
  // layout
  check_rows_aligned("q", q);
  check_rows_aligned("k", k);
  check_rows_aligned("v", v);
  TORCH_CHECK(cu_seqlens_q.is_contiguous() && cu_seqlens_k.is_contiguous(), kOp,
              ": cu_seqlens_q and cu_seqlens_k must be contiguous");
  const int64_t total_q = q.size(0), total_k = k.size(0), heads = q.size(1), kv_heads = k.size(1);
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(total_q < kIntMax && total_k < kIntMax - pf::kBlockN && heads < kIntMax && batch < kIntMax, kOp,
              ": total_q (", total_q, "), total_k (", total_k, "), heads and batch must fit int32 token coordinates");
  if (debug_checks()) {
    check_cu_seqlens(kOp, "cu_seqlens_q", cu_seqlens_q.cpu(), total_q, max_seqlen_q, "max_seqlen_q");
    check_cu_seqlens(kOp, "cu_seqlens_k", cu_seqlens_k.cpu(), total_k, max_seqlen_k, "max_seqlen_k");
  }

  const c10::cuda::CUDAGuard guard(q.device());
  if (batch == 0 || total_k == 0) {
    // No key anywhere (or no sequence): every row is empty, as in the reference.
    return {at::zeros({total_q, heads, pf::kHeadDimV}, q.options()),
            at::full({total_q, heads}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))};
  }
  auto out = at::empty({total_q, heads, pf::kHeadDimV}, q.options());
  auto lse = at::empty({total_q, heads}, q.options().dtype(at::kFloat));
  if (total_q == 0 || heads == 0) return {out, lse};  // nothing to compute (TMA refuses a 0-size dim)

  const auto* prop = at::cuda::getDeviceProperties(q.device().index());
  pf::MlaPrefillSm90Params p{};
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  // K/V of the heads in flight should stay in L2 while their query tiles stream over them;
  // keep ~40% of L2 for everything else (Q, outputs, the other heads' tails).
  p.l2_budget = static_cast<int64_t>(prop->l2CacheSize) * 5 / 8;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.kv_group = static_cast<int>(heads / kv_heads);
  p.total_q = static_cast<int>(total_q);
  p.causal = causal ? 1 : 0;

  pf::MlaPrefillSm90Tensors t{};
  t.q = q.data_ptr();
  t.k = k.data_ptr();
  t.v = v.data_ptr();
  t.total_q = total_q;
  t.total_k = total_k;
  t.heads = heads;
  t.kv_heads = kv_heads;
  t.q_stride_t = q.stride(0);
  t.q_stride_h = q.stride(1);
  t.k_stride_t = k.stride(0);
  t.k_stride_h = k.stride(1);
  t.v_stride_t = v.stride(0);
  t.v_stride_h = v.stride(1);

  const int grid = pf::grid_size(batch, heads, max_seqlen_q, prop->multiProcessorCount);
  const char* bad = nullptr;
  const cudaError_t err =
      pf::launch_mla_prefill_sm90_d192(p, t, grid, at::cuda::getCurrentCUDAStream(), &bad);
  if (bad != nullptr) {
    const at::Tensor& refused = bad[0] == 'q' ? q : (bad[0] == 'k' ? k : v);
    TORCH_CHECK(false, kOp, ": cannot describe ", bad, " (shape ", refused.sizes(), ", strides ",
                refused.strides(), ") to the TMA unit: cuTensorMapEncodeTiled refused it (token and head ",
                "strides must be multiples of 8 elements below 2^39)", kUseRegistry);
  }
  check_cuda_launch(kOp, err);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) { m.impl("mla_prefill", &mla_prefill_sm90_cuda); }

}  // namespace tokenspeed

// CUDA launcher of tokenspeed::mla_decode for Hopper (sm_90a): validate, allocate,
// launch. The kernels are in csrc/mla/decode/; the design is in csrc/mla/README.md.
//
// What this kernel takes (everything else is refused with a message that points at
// the registry, which routes such calls to the Triton or reference backend):
//   q bf16 [B, q_len 1..8, heads 1..128, 576], rows 16-byte aligned;
//   kv_cache bf16 [num_pages, page_size, 576] contiguous, page_size a power of two
//   in 16..256; head_dim_v 512; or kv_cache float8_e4m3fn of the same shape with kv_scale
//   (float32 [1] on q's device: the fp8 variant, decode/mla_decode_sm90_fp8.cuh).
//
// No host sync and no value-dependent allocation: the split of the keys over the
// SMs is planned on the device from cache_seqlens, and the workspace size depends
// only on (heads, q_len, number of SMs), so a call can be captured in a CUDA graph.
// Lengths are not checked against the block table here (that needs the values on
// the host); the kernel clamps them to the block table's capacity. Set
// TOKENSPEED_DEBUG_CHECKS=1 to validate them with a device sync.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "common/cuda_launch.h"
#include "mla/decode/mla_decode_sm90.h"
#include "mla/mla_checks.h"

namespace tokenspeed {
namespace {

namespace sm90 = tokenspeed::mla_sm90;

constexpr const char* kOp = "mla_decode";
constexpr const char* kUseRegistry = kSm90UseRegistry;

// Fewest plan units (64-key tiles) a split gets: fewer means more CTAs on a short sequence
// but more partials to merge (default kMinSplitCost = 1). TOKENSPEED_MLA_DECODE_MIN_SPLIT=1..64
// overrides (benchmark sweeps). Read on every call (a getenv), so one benchmark process can sweep it.
int min_split_cost() {
  const char* v = std::getenv("TOKENSPEED_MLA_DECODE_MIN_SPLIT");
  if (v == nullptr || *v == '\0') return sm90::kMinSplitCost;
  const int n = std::atoi(v);
  TORCH_CHECK(n >= 1 && n <= 64, kOp, ": TOKENSPEED_MLA_DECODE_MIN_SPLIT must be in [1, 64], got '", v, "'");
  return n;
}

// Per-slot capacities the plan tries, C0 .. C0 + window - 1 (mla_decode_sm90.h):
// TOKENSPEED_MLA_DECODE_PLAN_WINDOW=1..8 (1: always the even split C0), default 8. Read on
// every call, so one benchmark process can compare.
int plan_window() {
  const char* v = std::getenv("TOKENSPEED_MLA_DECODE_PLAN_WINDOW");
  if (v == nullptr || *v == '\0') return sm90::kPlanWindow;
  const int n = std::atoi(v);
  TORCH_CHECK(n >= 1 && n <= sm90::kPlanWindow, kOp, ": TOKENSPEED_MLA_DECODE_PLAN_WINDOW must be in [1, ",
              sm90::kPlanWindow, "], got '", v, "'");
  return n;
}

// Consumer schedule: TOKENSPEED_MLA_DECODE_SCHEDULE=seesaw (default: pairs of tiles,
// mla_decode_sm90_seesaw.cuh; faster or equal in every measured bf16 shape; the fp8 cache runs the
// transposed consumer at <= 32 rows, lockstep above) | lockstep (both caches, every row count).
// Read on every call, so one benchmark process can compare both.
int decode_schedule() {
  const char* v = std::getenv("TOKENSPEED_MLA_DECODE_SCHEDULE");
  if (v == nullptr || *v == '\0' || std::string(v) == "seesaw") return 1;
  TORCH_CHECK(std::string(v) == "lockstep", kOp, ": TOKENSPEED_MLA_DECODE_SCHEDULE must be lockstep or seesaw, got '", v, "'");
  return 0;
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return (int64_t{1} << l) == v ? l : -1;
}

std::tuple<at::Tensor, at::Tensor> mla_decode_sm90_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                                        const at::Tensor& block_table,
                                                        const at::Tensor& cache_seqlens,
                                                        double softmax_scale, bool causal,
                                                        int64_t head_dim_v,
                                                        const std::optional<at::Tensor>& kv_scale) {
  // arch
  const at::Device device = q.is_cuda() ? q.device() : kv_cache.device();
  check_sm90(kOp, device);
  // dtype, device, ranks, shapes (shared with every backend)
  check_mla_decode_args(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, kv_scale);
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got ", q.device());
  // what this kernel covers
  const bool fp8_kv = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && (kv_cache.scalar_type() == at::kBFloat16 || fp8_kv), kOp,
              ": q must be bfloat16 and kv_cache bfloat16 or float8_e4m3fn, got ", c10::toString(q.scalar_type()),
              " and ", c10::toString(kv_cache.scalar_type()), kUseRegistry);
  TORCH_CHECK(q.size(3) == sm90::kHeadDim, kOp, ": head_dim (q.shape[3]) must be ", sm90::kHeadDim,
              " (512 latent + 64 rope), got ", q.size(3), kUseRegistry);
  TORCH_CHECK(head_dim_v == sm90::kHeadDimV, kOp, ": head_dim_v must be ", sm90::kHeadDimV, ", got ",
              head_dim_v, kUseRegistry);
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2);
  const int64_t num_pages = kv_cache.size(0), page_size = kv_cache.size(1);
  TORCH_CHECK(q_len >= 1 && q_len <= sm90::kMaxQLen, kOp, ": q_len (q.shape[1]) must be in [1, ",
              sm90::kMaxQLen, "], got ", q_len, kUseRegistry);
  TORCH_CHECK(heads >= 1 && heads <= sm90::kMaxHeads, kOp, ": heads (q.shape[2]) must be in [1, ",
              sm90::kMaxHeads, "], got ", heads, kUseRegistry);
  const int ps_log2 = log2_exact(page_size);
  TORCH_CHECK(ps_log2 >= sm90::kMinPageLog2 && ps_log2 <= sm90::kMaxPageLog2, kOp,
              ": page_size (kv_cache.shape[1]) must be a power of two in [16, 256], got ", page_size,
              kUseRegistry);
  // layout
  TORCH_CHECK(aligned16(q.data_ptr()) && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 &&
                  q.stride(2) % 8 == 0,
              kOp, ": q's rows must be 16-byte aligned (data pointer and strides in multiples of 8 "
              "elements), got strides ", q.strides());
  TORCH_CHECK(aligned16(kv_cache.data_ptr()), kOp, ": kv_cache's data pointer must be 16-byte aligned");
  TORCH_CHECK(cache_seqlens.is_contiguous(), kOp, ": cache_seqlens must be contiguous");
  TORCH_CHECK(num_pages * page_size < (int64_t{1} << 31), kOp,
              ": kv_cache holds more than 2^31 tokens (num_pages x page_size = ", num_pages * page_size,
              "), beyond the TMA coordinate range");
  TORCH_CHECK(block_table.size(1) * page_size < (int64_t{1} << 31), kOp,
              ": block_table capacity (max_pages x page_size) must be < 2^31 tokens");
  if (debug_checks()) {
    check_mla_decode_lengths(block_table.cpu(), cache_seqlens.cpu(), num_pages, page_size);
  }

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({batch, q_len, heads, head_dim_v}, q.options());
  auto lse = at::empty({batch, q_len, heads}, q.options().dtype(at::kFloat));
  if (batch == 0) return {out, lse};

  const int rows = static_cast<int>(q_len * heads);
  const int m_blocks = sm90::m_blocks_for(rows);
  const int sms = num_sms(q.device());
  const int slots = sm90::slots_for(sms, m_blocks);
  auto workspace = at::empty({sm90::workspace_floats(slots, rows)}, q.options().dtype(at::kFloat));

  sm90::MlaDecodeSm90Params p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_i = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.kv_scale = fp8_kv ? kv_scale->data_ptr<float>() : nullptr;
  p.ws_out = workspace.data_ptr<float>();
  p.ws_lse = p.ws_out + sm90::workspace_out_floats(slots, rows);
  p.ws_plan = reinterpret_cast<int*>(p.ws_lse + sm90::workspace_lse_floats(slots, rows));
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.batch = static_cast<int>(batch);
  p.q_len = static_cast<int>(q_len);
  p.heads = static_cast<int>(heads);
  p.rows = rows;
  p.m_blocks = m_blocks;
  p.slots = slots;
  p.max_pages = static_cast<int>(block_table.size(1));
  p.page_size_log2 = ps_log2;
  p.causal = causal ? 1 : 0;
  // Few rows to merge: spread each row's 512 dims over 4 CTAs of the combine kernel.
  const int64_t combine_blocks = batch * ((rows + 3) / 4);
  p.combine_dsplit = combine_blocks >= 2LL * sms ? 1 : 4;
  p.min_split = min_split_cost();
  p.plan_window = plan_window();
  p.schedule = decode_schedule();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_cuda_launch(kOp, fp8_kv ? sm90::launch_mla_decode_sm90_fp8(p, kv_cache.data_ptr(), num_pages, stream)
                                : sm90::launch_mla_decode_sm90(p, kv_cache.data_ptr(), num_pages, stream));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) { m.impl("mla_decode", &mla_decode_sm90_cuda); }

}  // namespace tokenspeed

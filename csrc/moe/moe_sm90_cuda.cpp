// CUDA launchers of tokenspeed::fused_moe and tokenspeed::grouped_gemm for Hopper (sm_90a):
// validate, allocate, launch. Kernels: csrc/moe/sm90/; design: csrc/moe/README.md.
//
// What these kernels take (anything else is refused with a message that points at the
// registry, which routes such calls to the Triton or reference backend):
//   activations bf16 (fused_moe) / a bf16 or float8_e4m3fn (grouped_gemm); weights in the
//   activation dtype or float8_e4m3fn with 128x128 block scales; contiguous weights with
//   16-byte aligned rows (hidden and intermediate multiples of 8, of 128 for fp8);
//   at most 1024 local experts.
//
// No host sync and no value-dependent allocation: routing counts, offsets and per-expert
// GEMM arguments are computed on the device, and every buffer's size depends on shapes
// only, so a call can be captured in a CUDA graph and replayed.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "common/cuda_launch.h"
#include "moe/moe_checks.h"
#include "moe/moe_grouped_gemm_checks.h"
#include "moe/moe_sm90.h"
#include "moe/moe_sm90_heuristics.h"

namespace tokenspeed {

namespace moe_sm90 {

namespace {

using WorkspaceFn = size_t (*)(int, int);
using RunFn = const char* (*)(const GroupedGemmParams&, cudaStream_t);
struct Variant {
  WorkspaceFn workspace;
  RunFn run;
};

// The compiled (dtype, tile, output) variants; {nullptr, nullptr} where none was compiled.
Variant variant(bool fp8, GemmTile tile, GemmOut out) {
  const bool large = tile == GemmTile::kLarge, bf16_out = out == GemmOut::kBF16;
  if (fp8) {
    if (!large) return {nullptr, nullptr};
    return bf16_out ? Variant{workspace_bytes_fp8_large_bf16, run_fp8_large_bf16}
                    : Variant{workspace_bytes_fp8_large_f32, run_fp8_large_f32};
  }
  if (large) {
    return bf16_out ? Variant{workspace_bytes_bf16_large_bf16, run_bf16_large_bf16}
                    : Variant{workspace_bytes_bf16_large_f32, run_bf16_large_f32};
  }
  return bf16_out ? Variant{nullptr, nullptr} : Variant{workspace_bytes_bf16_small_f32, run_bf16_small_f32};
}

}  // namespace

bool grouped_gemm_compiled(bool fp8, GemmTile tile, GemmOut out) { return variant(fp8, tile, out).run != nullptr; }

size_t grouped_gemm_workspace_bytes(bool fp8, GemmTile tile, GemmOut out, int groups, int sm_count) {
  const Variant v = variant(fp8, tile, out);
  return v.workspace != nullptr ? v.workspace(groups, sm_count) : 0;
}

const char* run_grouped_gemm(bool fp8, GemmTile tile, GemmOut out, const GroupedGemmParams& p,
                             cudaStream_t stream) {
  const Variant v = variant(fp8, tile, out);
  return v.run != nullptr ? v.run(p, stream) : "this (dtype, tile, output) variant is not compiled";
}

}  // namespace moe_sm90

namespace {

namespace sm90 = tokenspeed::moe_sm90;

constexpr const char* kUseRegistry = kSm90UseRegistry;
constexpr int kMaxExperts = 1024;
constexpr size_t kAlign = 256;

// Hands out 256-byte aligned pieces of one byte buffer (one allocation per call).
class Carver {
 public:
  void reserve(size_t bytes) { total_ += (bytes + kAlign - 1) / kAlign * kAlign; }
  size_t total() const { return total_; }
  void bind(void* base) { cursor_ = static_cast<char*>(base); }
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(cursor_);
    cursor_ += (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return p;
  }

 private:
  size_t total_ = 0;
  char* cursor_ = nullptr;
};

void check_gemm_status(const char* op, const char* what, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": ", what, ": ", err);
}

// Weight block scales [groups, n/128, k/128] -> [groups, k/128, n/128] (the MN-major layout
// CUTLASS's sm90 blockwise mainloop reads).
at::Tensor scales_mn_major(const at::Tensor& w_scale) { return w_scale.transpose(1, 2).contiguous(); }

// Contiguous with a 16-byte aligned start (a view at an odd offset is already "contiguous";
// its clone is a fresh, aligned allocation), as TMA and the vector loads need.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c.data_ptr()) ? c : c.clone();
}

// The routing map's buffers (reserve, then take in the same order).
void reserve_route_map(Carver& c, int slots, int experts, int chunks, bool decode) {
  c.reserve(sizeof(int32_t) * (static_cast<size_t>(chunks) * experts));  // chunk_counts
  for (int i = 0; i < 3; ++i) c.reserve(sizeof(int32_t) * experts);      // counts, start, end
  for (int i = 0; i < 2; ++i) c.reserve(sizeof(int32_t) * slots);        // slot_row, row_slot
  if (decode) {
    c.reserve(sizeof(sm90::DecodeTask) * sm90::decode_task_bound(slots, experts));
    c.reserve(sizeof(int32_t));
  }
}

sm90::RouteMapParams take_route_map(Carver& c, const at::Tensor& ids, int slots, int experts, int chunks,
                                    int64_t expert_offset, bool decode) {
  sm90::RouteMapParams map{};
  map.topk_ids = ids.data_ptr<int32_t>();
  map.slots = slots;
  map.experts = experts;
  map.expert_offset = static_cast<int>(expert_offset);
  map.chunks = chunks;
  map.chunk_counts = c.take<int32_t>(static_cast<size_t>(chunks) * experts);
  map.expert_counts = c.take<int32_t>(experts);
  map.expert_start = c.take<int32_t>(experts);
  map.expert_end = c.take<int32_t>(experts);
  map.slot_row = c.take<int32_t>(slots);
  map.row_slot = c.take<int32_t>(slots);
  if (decode) {
    map.decode_tasks = c.take<sm90::DecodeTask>(sm90::decode_task_bound(slots, experts));
    map.num_decode_tasks = c.take<int32_t>(1);
  }
  return map;
}

void launch_combine(const char* op, const void* down, bool down_f32, const at::Tensor& weights,
                    const sm90::RouteMapParams& map, int64_t tokens, int64_t top_k, int64_t hid, at::Tensor& out) {
  sm90::CombineParams combine{};
  combine.down = down;
  combine.down_f32 = down_f32;
  combine.topk_weights = weights.data_ptr<float>();
  combine.slot_row = map.slot_row;
  combine.tokens = static_cast<int>(tokens);
  combine.top_k = static_cast<int>(top_k);
  combine.hidden = static_cast<int>(hid);
  combine.out = out.data_ptr();
  check_cuda_launch(op, sm90::launch_combine(combine, at::cuda::getCurrentCUDAStream()));
}

// Experts with a few rows each (moe_sm90_heuristics.h): route map with the task list,
// gate/up GEMV with SiLU-and-mul, down GEMV (fp32 rows), combine: four launches for bf16;
// fp8 adds the per-128 quantisation of the tokens and of the intermediate (six).
void fused_moe_decode(const char* op, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                      const at::Tensor& weights, const at::Tensor& ids, const std::optional<at::Tensor>& w13_scale,
                      const std::optional<at::Tensor>& w2_scale, int64_t expert_offset, at::Tensor& out) {
  const bool fp8 = w13.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t tokens = x.size(0), hid = x.size(1), top_k = ids.size(1);
  const int E = static_cast<int>(w13.size(0)), S = static_cast<int>(tokens * top_k);
  const int64_t inter = w2.size(2), kb_hid = hid / sm90::kScaleBlock, kb_inter = inter / sm90::kScaleBlock;
  const int chunks = (S + sm90::kMapChunk - 1) / sm90::kMapChunk;
  const auto stream = at::cuda::getCurrentCUDAStream();
  Carver c;
  reserve_route_map(c, S, E, chunks, true);
  c.reserve(sizeof(at::BFloat16) * S * inter);  // SiLU-and-mul output
  c.reserve(sizeof(float) * S * hid);           // down output
  if (fp8) {  // quantised tokens, their scales, quantised intermediate, its scales
    for (const int64_t bytes : {tokens * hid, 4 * tokens * kb_hid, S * inter, 4 * S * kb_inter}) c.reserve(bytes);
  }
  auto buffer = at::empty({static_cast<int64_t>(c.total())}, x.options().dtype(at::kByte));
  c.bind(buffer.data_ptr());
  const sm90::RouteMapParams map = take_route_map(c, ids, S, E, chunks, expert_offset, true);
  auto* act = c.take<at::BFloat16>(static_cast<size_t>(S) * inter);
  float* down = c.take<float>(static_cast<size_t>(S) * hid);
  check_cuda_launch(op, sm90::launch_route_map(map, stream));
  const int max_tasks = sm90::decode_task_bound(S, E);

  if (fp8) {
    // Scales in the checkpoint's [experts, n/128, k/128] layout (no transpose on this path).
    const at::Tensor s13 = w13_scale->contiguous(), s2 = w2_scale->contiguous();
    sm90::QuantizeRowsParams qx{x.data_ptr(), x.stride(0), static_cast<int>(tokens), nullptr, static_cast<int>(hid),
                                c.take<uint8_t>(tokens * hid), nullptr};
    qx.out_scale = c.take<float>(tokens * kb_hid);
    check_cuda_launch(op, sm90::launch_quantize_rows(qx, stream));
    sm90::DecodeFp8Params g1{};
    g1.x = static_cast<const uint8_t*>(qx.out);
    g1.x_scale = qx.out_scale;
    g1.row_slot = map.row_slot;
    g1.top_k = static_cast<int>(top_k);
    g1.w = static_cast<const uint8_t*>(w13.data_ptr());
    g1.w_scale = s13.data_ptr<float>();
    g1.n = static_cast<int>(2 * inter);
    g1.k = static_cast<int>(hid);
    g1.tasks = map.decode_tasks;
    g1.num_tasks = map.num_decode_tasks;
    g1.out = act;
    check_cuda_launch(op, sm90::launch_decode_fp8_gate_up_silu(g1, max_tasks, stream));
    sm90::QuantizeRowsParams qa{act, inter, S, map.expert_end + (E - 1), static_cast<int>(inter),
                                c.take<uint8_t>(S * inter), nullptr};
    qa.out_scale = c.take<float>(S * kb_inter);
    check_cuda_launch(op, sm90::launch_quantize_rows(qa, stream));
    sm90::DecodeFp8Params g2 = g1;
    g2.x = static_cast<const uint8_t*>(qa.out);
    g2.x_scale = qa.out_scale;
    g2.row_slot = nullptr;
    g2.w = static_cast<const uint8_t*>(w2.data_ptr());
    g2.w_scale = s2.data_ptr<float>();
    g2.n = static_cast<int>(hid);
    g2.k = static_cast<int>(inter);
    g2.out = down;
    check_cuda_launch(op, sm90::launch_decode_fp8_down(g2, max_tasks, stream));
  } else {
    sm90::DecodeGemvParams g1{};
    g1.x = x.data_ptr();
    g1.x_stride = x.stride(0);
    g1.row_slot = map.row_slot;
    g1.top_k = static_cast<int>(top_k);
    g1.w = w13.data_ptr();
    g1.n = static_cast<int>(2 * inter);
    g1.k = static_cast<int>(hid);
    g1.tasks = map.decode_tasks;
    g1.num_tasks = map.num_decode_tasks;
    g1.out = act;
    check_cuda_launch(op, sm90::launch_decode_gate_up_silu(g1, max_tasks, stream));
    sm90::DecodeGemvParams g2 = g1;
    g2.x = act;
    g2.x_stride = inter;
    g2.row_slot = nullptr;
    g2.w = w2.data_ptr();
    g2.n = static_cast<int>(hid);
    g2.k = static_cast<int>(inter);
    g2.out = down;
    check_cuda_launch(op, sm90::launch_decode_down(g2, max_tasks, stream));
  }
  launch_combine(op, down, true, weights, map, tokens, top_k, hid, out);
}

at::Tensor fused_moe_sm90_cuda(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                               const std::optional<at::Tensor>& w13_scale,
                               const std::optional<at::Tensor>& w2_scale, int64_t expert_offset) {
  constexpr const char* op = "fused_moe";
  // Mixed devices reach the CUDA key too: say so before asking a CPU tensor for its GPU.
  if (!hidden.is_cuda()) {
    check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_offset);
    TORCH_CHECK(false, op, ": hidden_states must be a CUDA tensor, got ", hidden.device());
  }
  // arch
  check_sm90(op, hidden.device());
  // dtype, device, ranks, shapes (shared with every backend)
  check_fused_moe_args(hidden, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_offset);
  // what this kernel covers
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16, op, ": hidden_states must be bfloat16, got ",
              c10::toString(hidden.scalar_type()), kUseRegistry);
  const bool fp8 = w13.scalar_type() == at::kFloat8_e4m3fn;
  const int64_t tokens = hidden.size(0), hid = hidden.size(1), top_k = topk_ids.size(1);
  const int64_t experts = w13.size(0), inter = w2.size(2);
  TORCH_CHECK(hid % 8 == 0 && inter % 8 == 0, op, ": hidden (", hid, ") and intermediate (", inter,
              ") must be multiples of 8 (16-byte rows for TMA)", kUseRegistry);
  TORCH_CHECK(experts <= kMaxExperts, op, ": at most ", kMaxExperts, " local experts, got ", experts, kUseRegistry);
  TORCH_CHECK(expert_offset <= std::numeric_limits<int32_t>::max(), op, ": expert_offset must fit in int32, got ",
              expert_offset);
  const int64_t slots = tokens * top_k;
  TORCH_CHECK(slots < (int64_t{1} << 31), op, ": tokens x top_k must be < 2^31, got ", slots);
  // layout
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous(), op,
              ": w13 and w2 must be contiguous (copying the experts on every call would cost more than "
              "the GEMMs)");
  TORCH_CHECK(aligned16(w13.data_ptr()) && aligned16(w2.data_ptr()), op,
              ": w13 and w2 data pointers must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(hidden.device());
  auto out = at::empty({tokens, hid}, hidden.options());
  if (slots == 0 || experts == 0) return out.zero_();
  const bool rows_ok = hidden.stride(1) == 1 && hidden.stride(0) % 8 == 0 && aligned16(hidden.data_ptr());
  const at::Tensor x = rows_ok ? hidden : aligned_contiguous(hidden);
  const at::Tensor ids = topk_ids.contiguous();
  const at::Tensor weights = topk_weights.contiguous();
  if (sm90::use_decode_path(fp8, slots, experts)) {
    fused_moe_decode(op, x, w13, w2, weights, ids, w13_scale, w2_scale, expert_offset, out);
    return out;
  }
  const int sms = num_sms(hidden.device());
  const auto stream = at::cuda::getCurrentCUDAStream();

  // Shapes of everything, from shapes only.
  const int E = static_cast<int>(experts), S = static_cast<int>(slots);
  const int chunks = (S + sm90::kMapChunk - 1) / sm90::kMapChunk;
  const sm90::GemmTile tile = sm90::choose_gemm_tile(fp8, slots, experts);
  const sm90::GemmOut down_out = sm90::bf16_or_f32(fp8, tile);
  const size_t down_bytes = down_out == sm90::GemmOut::kBF16 ? 2 : 4;
  const size_t act_bytes = fp8 ? 1 : 2;
  // Both GEMMs run one after the other on one stream: they share one workspace (argument
  // arrays and tensormaps), as large as the larger of the two needs.
  const size_t gemm_ws = std::max(sm90::grouped_gemm_workspace_bytes(fp8, tile, sm90::GemmOut::kF32, E, sms),
                                  sm90::grouped_gemm_workspace_bytes(fp8, tile, down_out, E, sms));
  // bf16 experts with a bf16 down output reuse the gathered rows' buffer for it.
  const bool down_in_rows = !fp8 && down_bytes == 2;
  Carver c;
  reserve_route_map(c, S, E, chunks, false);
  c.reserve(act_bytes * S * hid);                                   // gathered rows
  c.reserve(sizeof(float) * S * 2 * inter);                         // gate/up output, fp32
  c.reserve(act_bytes * S * inter);                                 // SiLU-and-mul output
  if (fp8) {
    c.reserve(sizeof(float) * S * (hid / sm90::kScaleBlock));
    c.reserve(sizeof(float) * S * (inter / sm90::kScaleBlock));
  }
  if (!down_in_rows) c.reserve(down_bytes * S * hid);              // down output
  c.reserve(gemm_ws);
  auto buffer = at::empty({static_cast<int64_t>(c.total())}, hidden.options().dtype(at::kByte));
  c.bind(buffer.data_ptr());

  const sm90::RouteMapParams map = take_route_map(c, ids, S, E, chunks, expert_offset, false);
  void* rows_in = c.take<uint8_t>(act_bytes * S * hid);
  float* gate_up = c.take<float>(static_cast<size_t>(S) * 2 * inter);
  void* act = c.take<uint8_t>(act_bytes * S * inter);
  float* rows_scale = fp8 ? c.take<float>(static_cast<size_t>(S) * (hid / sm90::kScaleBlock)) : nullptr;
  float* act_scale = fp8 ? c.take<float>(static_cast<size_t>(S) * (inter / sm90::kScaleBlock)) : nullptr;
  void* down = down_in_rows ? rows_in : c.take<uint8_t>(down_bytes * S * hid);
  void* gemm_workspace = c.take<uint8_t>(gemm_ws);
  check_cuda_launch(op, sm90::launch_route_map(map, stream));
  const sm90::RowMap rows{S, map.row_slot, map.topk_ids, map.expert_offset, E,
                          map.expert_start, map.expert_counts, map.expert_end};

  sm90::GatherParams gather{};
  gather.x = x.data_ptr();
  gather.x_stride = x.stride(0);
  gather.hidden = static_cast<int>(hid);
  gather.top_k = static_cast<int>(top_k);
  gather.rows = rows;
  gather.out = rows_in;
  gather.out_scale = rows_scale;
  check_cuda_launch(op, sm90::launch_gather_rows(gather, fp8, stream));

  at::Tensor s13, s2;
  if (fp8) {
    s13 = scales_mn_major(*w13_scale);
    s2 = scales_mn_major(*w2_scale);
  }
  sm90::GroupedGemmParams g1{};
  g1.a = rows_in;
  g1.w = w13.data_ptr();
  g1.d = gate_up;
  g1.offsets = map.expert_end;
  g1.a_scale = rows_scale;
  g1.w_scale = fp8 ? s13.data_ptr<float>() : nullptr;
  g1.rows = S;
  g1.n = static_cast<int>(2 * inter);
  g1.k = static_cast<int>(hid);
  g1.groups = E;
  g1.workspace = gemm_workspace;
  g1.device = hidden.device().index();
  g1.sm_count = sms;
  check_gemm_status(op, "gate/up GEMM", sm90::run_grouped_gemm(fp8, tile, sm90::GemmOut::kF32, g1, stream));

  sm90::SiluMulParams silu{};
  silu.gate_up = gate_up;
  silu.inter = static_cast<int>(inter);
  silu.rows = rows;
  silu.out = act;
  silu.out_scale = act_scale;
  check_cuda_launch(op, sm90::launch_silu_mul(silu, fp8, stream));

  sm90::GroupedGemmParams g2 = g1;
  g2.a = act;
  g2.w = w2.data_ptr();
  g2.d = down;
  g2.a_scale = act_scale;
  g2.w_scale = fp8 ? s2.data_ptr<float>() : nullptr;
  g2.n = static_cast<int>(hid);
  g2.k = static_cast<int>(inter);
  check_gemm_status(op, "down GEMM", sm90::run_grouped_gemm(fp8, tile, down_out, g2, stream));

  launch_combine(op, down, down_out == sm90::GemmOut::kF32, weights, map, tokens, top_k, hid, out);
  return out;
}

at::Tensor grouped_gemm_sm90_cuda(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets,
                                  const std::optional<at::Tensor>& a_scale,
                                  const std::optional<at::Tensor>& w_scale) {
  constexpr const char* op = "grouped_gemm";
  if (!a.is_cuda()) {
    check_grouped_gemm_args(a, w, offsets, a_scale, w_scale);
    TORCH_CHECK(false, op, ": a must be a CUDA tensor, got ", a.device());
  }
  check_sm90(op, a.device());
  check_grouped_gemm_args(a, w, offsets, a_scale, w_scale);
  const bool fp8 = a.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || a.scalar_type() == at::kBFloat16, op, ": a must be bfloat16 or float8_e4m3fn, got ",
              c10::toString(a.scalar_type()), kUseRegistry);
  const int64_t rows = a.size(0), k = a.size(1), n = w.size(1), groups = w.size(0);
  const int64_t align = fp8 ? sm90::kScaleBlock : 8;
  TORCH_CHECK(k % align == 0 && n % align == 0, op, ": k (", k, ") and n (", n, ") must be multiples of ", align,
              fp8 ? " for fp8 (128-blocks of scales)" : " (16-byte rows for TMA)", kUseRegistry);
  TORCH_CHECK(groups <= kMaxExperts, op, ": at most ", kMaxExperts, " groups, got ", groups, kUseRegistry);
  TORCH_CHECK(rows < (int64_t{1} << 31), op, ": rows must be < 2^31, got ", rows);

  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({rows, n}, a.options().dtype(at::kBFloat16));
  if (rows == 0) return out;
  if (groups == 0) return out.zero_();
  const at::Tensor ac = aligned_contiguous(a), wc = aligned_contiguous(w), offs = offsets.contiguous();
  const int sms = num_sms(a.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const sm90::GemmTile tile = sm90::choose_gemm_tile(fp8, rows, groups);
  const sm90::GemmOut kind = sm90::bf16_or_f32(fp8, tile);
  // Where no bf16-output variant is compiled (the decode tile) the GEMM writes fp32 rows
  // and one cast makes them bf16; those outputs are small.
  at::Tensor group_scale, wsc, row_scale;
  if (fp8) {
    row_scale = a_scale->contiguous();
    group_scale = at::empty({rows * (k / sm90::kScaleBlock)}, a.options().dtype(at::kFloat));
    sm90::GroupScaleParams gs{};
    gs.row_scale = row_scale.data_ptr<float>();
    gs.group_scale = group_scale.data_ptr<float>();
    gs.offsets = offs.data_ptr<int32_t>();
    gs.groups = static_cast<int>(groups);
    gs.rows = rows;
    gs.kb = static_cast<int>(k / sm90::kScaleBlock);
    check_cuda_launch(op, sm90::launch_row_scales_to_group_layout(gs, stream));
    wsc = scales_mn_major(*w_scale);
  }
  const size_t ws_bytes = sm90::grouped_gemm_workspace_bytes(fp8, tile, kind, static_cast<int>(groups), sms);
  auto workspace = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
  sm90::GroupedGemmParams p{};
  p.a = ac.data_ptr();
  p.w = wc.data_ptr();
  at::Tensor d = kind == sm90::GemmOut::kBF16 ? out : at::empty({rows, n}, a.options().dtype(at::kFloat));
  p.d = d.data_ptr();
  p.offsets = offs.data_ptr<int32_t>();
  p.a_scale = fp8 ? group_scale.data_ptr<float>() : nullptr;
  p.w_scale = fp8 ? wsc.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.groups = static_cast<int>(groups);
  p.workspace = workspace.data_ptr();
  p.device = a.device().index();
  p.sm_count = sms;
  check_gemm_status(op, "grouped GEMM", sm90::run_grouped_gemm(fp8, tile, kind, p, stream));
  check_cuda_launch(op, sm90::launch_zero_tail_rows(d.data_ptr(), rows, n * d.element_size(),
                                                    offs.data_ptr<int32_t>(), static_cast<int>(groups), stream));
  if (kind == sm90::GemmOut::kF32) out.copy_(d);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenspeed, CUDA, m) {
  m.impl("fused_moe", &fused_moe_sm90_cuda);
  m.impl("grouped_gemm", &grouped_gemm_sm90_cuda);
}

}  // namespace tokenspeed

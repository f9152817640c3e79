// CUTLASS 3.x grouped GEMM for Hopper, used as a library: one template that the four
// instantiation files (grouped_gemm_sm90_{bf16,fp8}_{large,small}.cu) specialise.
//
// Kernel: KernelPtrArrayTmaWarpSpecialized{Cooperative,Pingpong} (bf16) or their
// FP8Blockwise forms (e4m3 with 1x128 activation / 128x128 weight scales applied to the
// fp32 accumulators every 128 of K), built with the collective builders; persistent,
// warp-specialised, TMA loads and stores, per-group problem shapes read from device memory.
//
// No host sync: the per-group shapes, pointers, strides (and scale pointers) are written
// by `build_group_args` from the device-resident `offsets`, and the GEMM is told only the
// number of groups (no host problem shapes), so it launches one CTA per SM and walks the
// groups on the device. Both launches go on `stream`; the call can be captured in a graph.
//
// Scale layout (fp8): CUTLASS's sm90 blockwise mainloop reads MN-major scales, i.e. for
// group g a [k/128, m_g] block for the activations and a [k/128, n/128] block for the
// weights. The launcher transposes the weights' [n/128, k/128] scales; the MoE gather and
// SiLU kernels write activation scales straight into this layout.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <type_traits>

#include "moe/moe_sm90.h"

namespace tokenspeed::moe_sm90 {

// Upper bound on groups: build_group_args keeps every group's end in shared memory.
constexpr int kMaxGroups = 1024;

template <bool kFp8, class ElementD_, class TileShape_, class ClusterShape_, bool kPingpong>
struct GroupedGemm {
  static constexpr bool kFp8Scaled = kFp8;
  using Element = std::conditional_t<kFp8, cutlass::float_e4m3_t, cutlass::bfloat16_t>;
  using ElementD = ElementD_;  // bf16, or float where the consumer needs the exact accumulators
  using Accum = float;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using LayoutA = cutlass::layout::RowMajor;     // activations [m, k], k contiguous
  using LayoutB = cutlass::layout::ColumnMajor;  // W[g] stored [n, k], k contiguous
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16 / static_cast<int>(sizeof(Element));
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  // M granularity 1 (per row), N and K granularity 128; MN-major (the only sm90 form).
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using MainloopSchedule = std::conditional_t<
      kFp8,
      std::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>,
      std::conditional_t<kPingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>>;
  using EpilogueSchedule = std::conditional_t<kPingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;

  // D = acc (bf16 or fp32); no C operand (void), so the epilogue only stores.
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accum, Accum, void, LayoutD*, kAlignD, ElementD,
      LayoutD*, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, Accum, ElementD, Accum>>::CollectiveOp;

  using LayoutTagA = std::conditional_t<kFp8, cute::tuple<LayoutA*, LayoutSFA*>, LayoutA*>;
  using LayoutTagB = std::conditional_t<kFp8, cute::tuple<LayoutB*, LayoutSFB*>, LayoutB*>;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutTagA, kAlignAB, Element, LayoutTagB,
      kAlignAB, Accum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape = typename ProblemShape::UnderlyingProblemShape;

  // The per-group argument arrays, carved from the front of the workspace.
  struct GroupArgs {
    Shape* shapes;
    const Element** ptr_a;
    const Element** ptr_b;
    ElementD** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    const float** ptr_sfa;
    const float** ptr_sfb;
    LayoutSFA* layout_sfa;
    LayoutSFB* layout_sfb;
  };

  static constexpr size_t kAlign = 256;  // tensormaps need 64 B; keep every array on its own lines
  static constexpr size_t round_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

  static size_t group_args_bytes(int groups) {
    const size_t g = static_cast<size_t>(groups);
    size_t bytes = round_up(g * sizeof(Shape)) + 3 * round_up(g * sizeof(void*)) + round_up(g * sizeof(StrideA)) +
                   round_up(g * sizeof(StrideB)) + round_up(g * sizeof(StrideD));
    if constexpr (kFp8) {
      bytes += 2 * round_up(g * sizeof(void*)) + round_up(g * sizeof(LayoutSFA)) + round_up(g * sizeof(LayoutSFB));
    }
    return bytes;
  }

  static GroupArgs carve(void* workspace, int groups) {
    char* cursor = static_cast<char*>(workspace);
    const size_t g = static_cast<size_t>(groups);
    auto take = [&](size_t bytes) {
      char* p = cursor;
      cursor += round_up(bytes);
      return p;
    };
    GroupArgs a{};
    a.shapes = reinterpret_cast<Shape*>(take(g * sizeof(Shape)));
    a.ptr_a = reinterpret_cast<const Element**>(take(g * sizeof(void*)));
    a.ptr_b = reinterpret_cast<const Element**>(take(g * sizeof(void*)));
    a.ptr_d = reinterpret_cast<ElementD**>(take(g * sizeof(void*)));
    a.stride_a = reinterpret_cast<StrideA*>(take(g * sizeof(StrideA)));
    a.stride_b = reinterpret_cast<StrideB*>(take(g * sizeof(StrideB)));
    a.stride_d = reinterpret_cast<StrideD*>(take(g * sizeof(StrideD)));
    if constexpr (kFp8) {
      a.ptr_sfa = reinterpret_cast<const float**>(take(g * sizeof(void*)));
      a.ptr_sfb = reinterpret_cast<const float**>(take(g * sizeof(void*)));
      a.layout_sfa = reinterpret_cast<LayoutSFA*>(take(g * sizeof(LayoutSFA)));
      a.layout_sfb = reinterpret_cast<LayoutSFB*>(take(g * sizeof(LayoutSFB)));
    }
    return a;
  }

  static typename Gemm::Arguments arguments(const GroupedGemmParams& p, const GroupArgs& g) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = p.device;
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {p.groups, g.shapes, nullptr};  // shapes live on the device only
    args.mainloop.ptr_A = g.ptr_a;
    args.mainloop.dA = g.stride_a;
    args.mainloop.ptr_B = g.ptr_b;
    args.mainloop.dB = g.stride_b;
    if constexpr (kFp8) {
      args.mainloop.ptr_SFA = g.ptr_sfa;
      args.mainloop.layout_SFA = g.layout_sfa;
      args.mainloop.ptr_SFB = g.ptr_sfb;
      args.mainloop.layout_SFB = g.layout_sfb;
    }
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = nullptr;
    args.epilogue.ptr_D = g.ptr_d;
    args.epilogue.dD = g.stride_d;
    args.hw_info = hw;
    return args;
  }

  static size_t workspace_bytes(int groups, int sm_count) {
    GroupedGemmParams p{};
    p.groups = groups;
    p.sm_count = sm_count;
    GroupArgs g{};
    auto args = arguments(p, g);
    return group_args_bytes(groups) + round_up(Gemm::get_workspace_size(args));
  }
};

// The compiled variants; which one runs is chosen in moe_sm90_heuristics.h. The fp32-output
// forms serve the gate/up GEMM, whose SiLU-and-mul must see the exact accumulators (a bf16
// round trip of gate and up flips enough e4m3 roundings of the intermediate to break the
// fp8 tolerance); the bf16-output forms serve the down GEMM and the standalone op.
//
// bf16, many rows per expert: 128 x 256 x 64 tiles (each consumer warp group a 64 x 256
// half: the widest wgmma, least shared-memory traffic per FLOP), a 2 x 1 cluster so the
// weight tile is multicast to the two CTAs of neighbouring M tiles.
using Bf16Tile = cute::Shape<cute::_128, cute::_256, cute::_64>;
using Bf16Cluster = cute::Shape<cute::_2, cute::_1, cute::_1>;
using Bf16LargeBf16 = GroupedGemm<false, cutlass::bfloat16_t, Bf16Tile, Bf16Cluster, false>;
using Bf16LargeF32 = GroupedGemm<false, float, Bf16Tile, Bf16Cluster, false>;
// bf16, few rows per expert (decode): 64-row tiles, ping-pong so one warp group's epilogue
// hides under the other's main loop; no cluster (a 2 x 1 cluster would pair each expert's
// only M tile with an empty one). fp32 output only: at decode the output is tiny.
using Bf16SmallF32 = GroupedGemm<false, float, cute::Shape<cute::_64, cute::_128, cute::_128>,
                                 cute::Shape<cute::_1, cute::_1, cute::_1>, true>;
// fp8 blockwise: 128 x 128 x 128 (one scale block of K per k-tile; a 256-wide tile would
// need 256 fp32 accumulator registers per thread with the promotion buffer), 1 x 2 cluster
// multicasting the activation tile. Also the decode kernel: a k-tile's 16 KB of weights
// take longer to arrive than its four wgmmas take to run, so it streams at full bandwidth.
using Fp8Tile = cute::Shape<cute::_128, cute::_128, cute::_128>;
using Fp8Cluster = cute::Shape<cute::_1, cute::_2, cute::_1>;
using Fp8LargeBf16 = GroupedGemm<true, cutlass::bfloat16_t, Fp8Tile, Fp8Cluster, false>;
using Fp8LargeF32 = GroupedGemm<true, float, Fp8Tile, Fp8Cluster, false>;

// One block: group ends made monotone (running maximum) and clamped to [0, rows], then one
// thread per group writes its shape, pointers, strides and scale pointers.
template <class G>
__global__ void __launch_bounds__(256) build_group_args(GroupedGemmParams p, typename G::GroupArgs out) {
  __shared__ int32_t ends[kMaxGroups];
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int32_t carry = 0;
    for (int base = 0; base < p.groups; base += 32) {
      const int g = base + lane;
      int32_t v = g < p.groups ? p.offsets[g] : 0;
      v = max(v, carry);
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int32_t up = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v = max(v, up);
      }
      if (g < p.groups) ends[g] = static_cast<int32_t>(min(static_cast<int64_t>(max(v, 0)), p.rows));
      carry = __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
  using Element = typename G::Element;
  const auto* a = static_cast<const Element*>(p.a);
  const auto* w = static_cast<const Element*>(p.w);
  auto* d = static_cast<typename G::ElementD*>(p.d);
  const int kb = p.k / kScaleBlock, nb = p.n / kScaleBlock;
  for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
    const int64_t start = g == 0 ? 0 : ends[g - 1];
    const int m = static_cast<int>(ends[g] - start);
    out.shapes[g] = typename G::Shape{m, p.n, p.k};
    out.ptr_a[g] = a + start * p.k;
    out.ptr_b[g] = w + static_cast<int64_t>(g) * p.n * p.k;
    out.ptr_d[g] = d + start * p.n;
    out.stride_a[g] = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, p.k, 1});
    out.stride_b[g] = cutlass::make_cute_packed_stride(typename G::StrideB{}, {p.n, p.k, 1});
    out.stride_d[g] = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, p.n, 1});
    if constexpr (G::kFp8Scaled) {
      out.ptr_sfa[g] = p.a_scale + start * kb;
      out.ptr_sfb[g] = p.w_scale + static_cast<int64_t>(g) * kb * nb;
      out.layout_sfa[g] = G::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(m, p.n, p.k, 1));
      out.layout_sfb[g] = G::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, p.n, p.k, 1));
    }
  }
}

template <class G>
const char* run_grouped(const GroupedGemmParams& p, cudaStream_t stream) {
  if (p.groups < 1 || p.groups > kMaxGroups) return "groups must be in [1, 1024]";
  const auto group_args = G::carve(p.workspace, p.groups);
  build_group_args<G><<<1, 256, 0, stream>>>(p, group_args);
  if (cudaGetLastError() != cudaSuccess) return "launch of build_group_args failed";
  auto args = G::arguments(p, group_args);
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this grouped GEMM";
  void* cutlass_workspace = static_cast<char*>(p.workspace) + G::group_args_bytes(p.groups);
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return "CUTLASS grouped GEMM initialisation failed";
  }
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS grouped GEMM launch failed";
  if (cudaGetLastError() != cudaSuccess) return "CUTLASS grouped GEMM launch reported an error";
  return nullptr;
}

}  // namespace tokenspeed::moe_sm90

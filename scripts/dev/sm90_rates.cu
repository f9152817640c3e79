// Raw rates of the pieces the sm90 MLA decode is made of, on the device, without torch:
//   * wgmma issue-to-retire throughput of the decode's shapes (QK^T m64n64k16 / m64n32k16 SS
//     over 576 dims, PV m64n256k16 SS with V MN-major), one or two consumer warpgroups;
//   * TMA ingest per SM (64-dim x 64-row boxes, 128-byte swizzle, the decode's KV boxes) from
//     an L2-resident tensor and from HBM, with 1-3 tiles of 72 KB in flight, every SM loading;
//   * both at once (does the TMA's smem write traffic slow the tensor cores?).
// Smem contents are garbage: only timing matters. Build and run (device):
//   nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc scripts/dev/sm90_rates.cu -o /tmp/rates
//   /tmp/rates
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "common/sm90_host.h"
#include "common/sm90_ptx.cuh"
#include "mla/decode/mla_decode_sm90_wgmma.cuh"

using namespace tokenspeed::sm90;
using namespace tokenspeed::mla_sm90::dev;

constexpr int kPanel = 64 * 128;
constexpr int kTile = 9 * kPanel;             // 64 rows x 576 bf16
constexpr int kSmem = 3 * kTile + 1024 + 64;  // 3 tiles + alignment + barriers

enum Mode : int { kNone = 0, kQk64 = 1, kQk32 = 2, kPv = 3, kQk64Pv = 4 };

struct Params {
  int mode, wgs, iters;  // consumer work: mode, active warpgroups (0-2), groups per warpgroup
  int stages, tiles;     // producer: tiles in flight (0: no loads), tiles per CTA
  int rows;              // rows of the tensor the producer reads (multiple of 64)
  unsigned long long* out;  // per CTA: [producer cycles, wg0 cycles, wg1 cycles, wg0 loop ns]
};

constexpr int qk_off(int kk) { return ((kk / 4) * kPanel + (kk % 4) * 32) / 16; }
template <int... kK>
__device__ __forceinline__ void qk64(float (&s)[32], uint64_t dq, uint64_t dk, std::integer_sequence<int, kK...>) {
  (wgmma_m64n64k16_ss<qk_off(kK), qk_off(kK)>(s, dq, dk, kK > 0 ? 1 : 0), ...);
}
template <int... kK>
__device__ __forceinline__ void qk32(float (&s)[16], uint64_t dq, uint64_t dk, std::integer_sequence<int, kK...>) {
  (wgmma_m64n32k16_ss<qk_off(kK), qk_off(kK)>(s, dq, dk, kK > 0 ? 1 : 0), ...);
}
template <int... kK>
__device__ __forceinline__ void pv(float (&o)[128], uint64_t dp, uint64_t dv, std::integer_sequence<int, kK...>) {
  (wgmma_m64n256k16_ss_tb<kK * 2, kK * 128>(o, dp, dv, 1), ...);
}

template <int kMode>
__device__ void consume(const Params& p, uint32_t base, int w, unsigned long long* out) {
  float s[32] = {};
  float s32[16] = {};
  float o[128] = {};
  const uint64_t dq = desc_k_sw128(base);                                   // "Q" (tile 0)
  const uint64_t dk = desc_k_sw128(base + kTile);                           // "K" (tile 1)
  const uint64_t dp = desc_k_sw128(base + kTile + 8 * kPanel);              // "P" (rope panel)
  const uint64_t dv = desc_mn_sw128(base + kTile + 4 * w * kPanel, kPanel);  // "V" half w
  const long long t0 = clock64();
  unsigned long long g0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0)::"memory");
  for (int i = 0; i < p.iters; ++i) {
    wgmma_fence();
    if constexpr (kMode == kQk64 || kMode == kQk64Pv) qk64(s, dq, dk, std::make_integer_sequence<int, 36>{});
    if constexpr (kMode == kQk32) qk32(s32, dq, dk, std::make_integer_sequence<int, 36>{});
    if constexpr (kMode == kPv || kMode == kQk64Pv) pv(o, dp, dv, std::make_integer_sequence<int, 4>{});
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  fence_regs(s);
  fence_regs(s32);
  fence_regs(o);
  const long long t1 = clock64();
  unsigned long long g1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1)::"memory");
  if ((threadIdx.x & 127) == 0 && w == 0) out[3] = g1 - g0;
  float acc = 0.f;  // keeps the accumulators (and so the wgmma) alive
  if constexpr (kMode == kQk64 || kMode == kQk64Pv) {
    for (int i = 0; i < 32; ++i) acc += s[i];
  }
  if constexpr (kMode == kQk32) {
    for (int i = 0; i < 16; ++i) acc += s32[i];
  }
  if constexpr (kMode == kPv || kMode == kQk64Pv) {
    for (int i = 0; i < 128; ++i) acc += o[i];
  }
  if ((threadIdx.x & 127) == 0) out[1 + w] = static_cast<unsigned long long>(t1 - t0) + (acc == 12345.f ? 1 : 0);
}

template <int kMode>
__global__ void __launch_bounds__(384, 1) rates_kernel(const __grid_constant__ CUtensorMap map, Params p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = raw + ((1024u - (raw & 1023u)) & 1023u);
  const uint32_t bars = base + 3 * kTile;
  unsigned long long* out = p.out + blockIdx.x * 4;
  if (threadIdx.x == 0) {
    for (int s = 0; s < 3; ++s) mbar_init(bars + s * 8, 1);
    fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0 && p.stages > 0) {
      const long long t0 = clock64();
      unsigned long long g0;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0)::"memory");
      const int tiles_total = p.rows / 64;
      // With consumers reading tiles 0-1, the producer writes tile 2 .. (stages 1); alone, 0 ...
      const int first = p.wgs > 0 ? 2 - (p.stages - 1) : 0;
      for (int k = 0; k < p.tiles; ++k) {
        const int st = k % p.stages;
        const uint32_t bar = bars + st * 8;
        if (k >= p.stages) mbar_wait(bar, ((k / p.stages) - 1) & 1);
        const int tile = static_cast<int>((blockIdx.x * 7919u + k * 104729u) % tiles_total);
        mbar_arrive_expect_tx(bar, kTile);
        for (int panel = 0; panel < 9; ++panel) {
          tma_load_2d(base + (first + st) * kTile + panel * kPanel, &map, panel * 64, tile * 64, bar);
        }
      }
      for (int k = std::max(0, p.tiles - p.stages); k < p.tiles; ++k) {
        mbar_wait(bars + (k % p.stages) * 8, (k / p.stages) & 1);
      }
      out[0] = static_cast<unsigned long long>(clock64() - t0);
      unsigned long long g1;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1)::"memory");
      if (p.wgs == 0) out[3] = g1 - g0;  // with consumers, [3] is their loop's time
    }
  } else {
    setmaxnreg_inc<232>();
    const int w = (threadIdx.x - 128) >> 7;
    if (w < p.wgs) consume<kMode>(p, base, w, out);
  }
}

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

struct Result {
  double prod_cyc, wg_cyc, ns;
};

template <int kMode>
Result run_one(const CUtensorMap& map, Params p, int sms) {
  check(cudaFuncSetAttribute(rates_kernel<kMode>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem), "attr");
  unsigned long long* out;
  check(cudaMalloc(&out, sms * 4 * sizeof(unsigned long long)), "malloc out");
  check(cudaMemset(out, 0, sms * 4 * sizeof(unsigned long long)), "memset");
  p.out = out;
  for (int rep = 0; rep < 2; ++rep) rates_kernel<kMode><<<sms, 384, kSmem>>>(map, p);
  check(cudaDeviceSynchronize(), "kernel");
  std::vector<unsigned long long> h(sms * 4);
  check(cudaMemcpy(h.data(), out, h.size() * 8, cudaMemcpyDeviceToHost), "copy");
  cudaFree(out);
  std::vector<double> prod, wg, ns;
  for (int c = 0; c < sms; ++c) {
    prod.push_back(static_cast<double>(h[c * 4]));
    wg.push_back(static_cast<double>(std::max(h[c * 4 + 1], h[c * 4 + 2])));
    ns.push_back(static_cast<double>(h[c * 4 + 3]));
  }
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  return {med(prod), med(wg), med(ns)};
}

Result run(const CUtensorMap& map, const Params& p, int sms) {
  switch (p.mode) {
    case kQk64: return run_one<kQk64>(map, p, sms);
    case kQk32: return run_one<kQk32>(map, p, sms);
    case kPv: return run_one<kPv>(map, p, sms);
    case kQk64Pv: return run_one<kQk64Pv>(map, p, sms);
    default: return run_one<kNone>(map, p, sms);
  }
}

int main() {
  int sms = 0, clock_khz = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "sms");
  check(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "clock");
  const long long big_rows = (2ll << 30) / 1152 / 64 * 64;  // ~2 GB: HBM
  const int l2_rows = 16 * 1024 * 1024 / 1152 / 64 * 64;    // ~16 MB: L2-resident
  void* buf;
  check(cudaMalloc(&buf, big_rows * 1152), "malloc kv");
  check(cudaMemset(buf, 0, big_rows * 1152), "memset kv");
  auto make_map = [&](long long rows) {
    CUtensorMap m;
    const cuuint64_t dims[2] = {576, static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {1152};
    const cuuint32_t box[2] = {64, 64};
    const cuuint32_t es[2] = {1, 1};
    if (encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, buf, dims, strides, box, es,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      std::printf("encode failed\n");
      std::exit(1);
    }
    return m;
  };
  const CUtensorMap map_l2 = make_map(l2_rows), map_hbm = make_map(big_rows);
  std::printf("device: %d SMs, max clock %d MHz\n", sms, clock_khz / 1000);

  std::printf("\n## wgmma alone (per warpgroup, back to back, one group in flight)\n");
  std::printf("mode | WGs | cycles/group | MHz | MAC/clk/SM | %% of 2048 MAC/clk/SM (dense bf16 peak)\n");
  const char* names[] = {"none", "QK n64 x36", "QK n32 x36", "PV n256 x4", "QK n64 x36 + PV x4"};
  const double macs[] = {0, 64.0 * 64 * 576, 64.0 * 32 * 576, 64.0 * 256 * 64, 64.0 * 64 * 576 + 64.0 * 256 * 64};
  for (int mode = 1; mode <= 4; ++mode) {
    for (int wgs = 1; wgs <= 2; ++wgs) {
      Params p{mode, wgs, 200, 0, 0, l2_rows, nullptr};
      const Result r = run(map_l2, p, sms);
      const double per = r.wg_cyc / p.iters;
      const double mhz = r.wg_cyc / r.ns * 1e3;  // SM clock while the tensor cores run
      const double rate = macs[mode] * wgs / per;
      std::printf("%s | %d | %.0f | %.0f | %.0f | %.0f%%\n", names[mode], wgs, per, mhz, rate, 100.0 * rate / 2048.0);
    }
  }

  std::printf("\n## TMA ingest alone (every SM, 72 KB tiles of 9 boxes [64 rows x 64 dims])\n");
  std::printf("source | tiles in flight | cycles/tile | B/clk/SM | TB/s (all SMs) | SM MHz\n");
  for (int src = 0; src < 2; ++src) {
    for (int st = 1; st <= 3; ++st) {
      Params p{kNone, 0, 0, st, 200, src == 0 ? l2_rows : static_cast<int>(big_rows), nullptr};
      const Result r = run(src == 0 ? map_l2 : map_hbm, p, sms);
      const double per = r.prod_cyc / p.tiles;
      const double tbs = static_cast<double>(kTile) * p.tiles * sms / r.ns / 1e3;
      std::printf("%s | %d | %.0f | %.1f | %.2f | %.0f\n", src == 0 ? "L2 (16 MB)" : "HBM (2 GB)", st, per, kTile / per, tbs,
                  r.prod_cyc / r.ns * 1e3);
    }
  }

  std::printf("\n## TMA ingest from L2 with fewer SMs loading (is ~30 B/clk a per-SM or an L2 limit?)\n");
  std::printf("SMs loading | cycles/tile | B/clk/SM\n");
  for (int n : {1, 8, 33, 66, 132}) {
    Params p{kNone, 0, 0, 2, 200, l2_rows, nullptr};
    const Result r = run(map_l2, p, n);
    std::printf("%d | %.0f | %.1f\n", n, r.prod_cyc / p.tiles, kTile / (r.prod_cyc / p.tiles));
  }

  std::printf("\n## both: 2 warpgroups of wgmma while the producer streams 2 tiles in flight\n");
  std::printf("mode | source | wgmma cycles/group (alone -> with loads) | TMA cycles/tile\n");
  for (int mode : {kQk64, kPv, kQk64Pv}) {
    for (int src = 0; src < 2; ++src) {
      Params alone{mode, 2, 200, 0, 0, l2_rows, nullptr};
      const Result a = run(map_l2, alone, sms);
      Params both{mode, 2, 200, 2, 120, src == 0 ? l2_rows : static_cast<int>(big_rows), nullptr};
      const Result b = run(src == 0 ? map_l2 : map_hbm, both, sms);
      std::printf("%s | %s | %.0f -> %.0f | %.0f\n", names[mode], src == 0 ? "L2" : "HBM", a.wg_cyc / alone.iters,
                  b.wg_cyc / both.iters, b.prod_cyc / both.tiles);
    }
  }
  cudaFree(buf);
  return 0;
}

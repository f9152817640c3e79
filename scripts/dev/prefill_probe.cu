// Throughput probe of the sm90 MLA prefill kernel without torch: times the real launch
// (launch_mla_prefill_sm90_d192) on the issue-4 cases plus one that measures the main loop alone
// (132 query heads sharing one kv head: one 128-row tile per SM over 32K keys, K/V in L2), and
// checks one small ragged causal case against a CPU fp64 reference (so a variant that breaks the
// kernel shows). Kernel variants are compile-time defines (scripts/dev/device_prefill_probe.sh).
//   nvcc -std=c++20 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc \
//     scripts/dev/prefill_probe.cu csrc/mla/prefill/mla_prefill_sm90_d192.cu -o /tmp/pf && /tmp/pf
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "mla/prefill/mla_prefill_sm90.h"

namespace pf = tokenspeed::mla_prefill_sm90;

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

#if TS_PF_TRACE
namespace tokenspeed::mla_prefill_sm90 {
cudaError_t mla_prefill_sm90_trace_copy(uint32_t* dst);
}
// Mean clocks between the trace points of iterations 32..223 (mla_prefill_sm90_trace.cuh).
static void print_trace() {
  std::vector<uint32_t> t(2 * 256 * 8);
  check(pf::mla_prefill_sm90_trace_copy(t.data()), "trace copy");
  for (int w = 0; w < 2; ++w) {
    double d[8] = {};
    int n = 0;
    for (int i = 32; i < 224; ++i, ++n) {
      const uint32_t* e = &t[(w * 256 + i) * 8];
      const uint32_t* nx = &t[(w * 256 + i + 1) * 8];
      for (int k = 0; k < 7; ++k) d[k] += static_cast<double>(e[k + 1] - e[k]);
      d[7] += static_cast<double>(nx[0] - e[0]);  // period
    }
    std::printf("trace wg%d: waits %.0f | turn %.0f | issue %.0f | wait1 %.0f | max %.0f | wait0 %.0f | exp+pack %.0f | period %.0f\n",
                w, d[0] / n, d[1] / n, d[2] / n, d[3] / n, d[4] / n, d[5] / n, d[6] / n, d[7] / n);
  }
  double off = 0.0;
  for (int i = 32; i < 224; ++i) off += static_cast<double>(t[(256 + i) * 8 + 2] - t[i * 8 + 2]);
  std::printf("trace: wg1 turn - wg0 turn (same iteration) %.0f clocks\n", off / 192);
}
#endif

// Deterministic values with variance ~1 (uniform on [-1.7, 1.7]), bf16.
__global__ void fill(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((static_cast<float>(h & 0xffffu) / 65535.f - 0.5f) * 3.4f);
  }
}

struct Case {
  int n, heads, kv_heads, lq, lk, causal;
  const char* name;
};

struct Run {
  __nv_bfloat16 *q, *k, *v, *out;
  float* lse;
  int32_t *cu_q, *cu_k;
  pf::MlaPrefillSm90Params p;
  pf::MlaPrefillSm90Tensors t;
  int grid;
};

static Run setup(const std::vector<int>& lqs, const std::vector<int>& lks, int heads, int kv_heads, int causal,
                 int sms, size_t l2) {
  Run r{};
  std::vector<int32_t> cq(1, 0), ck(1, 0);
  for (size_t i = 0; i < lqs.size(); ++i) {
    cq.push_back(cq.back() + lqs[i]);
    ck.push_back(ck.back() + lks[i]);
  }
  const int64_t tq = cq.back(), tk = ck.back();
  check(cudaMalloc(&r.q, tq * heads * 192 * 2), "q");
  check(cudaMalloc(&r.k, (tk + 128) * kv_heads * 192 * 2), "k");  // + a tile of garbage past the end
  check(cudaMalloc(&r.v, (tk + 128) * kv_heads * 128 * 2), "v");
  check(cudaMalloc(&r.out, tq * heads * 128 * 2), "out");
  check(cudaMalloc(&r.lse, tq * heads * 4), "lse");
  fill<<<1024, 256>>>(r.q, tq * heads * 192, 1u);
  fill<<<1024, 256>>>(r.k, (tk + 128) * kv_heads * 192, 2u);
  fill<<<1024, 256>>>(r.v, (tk + 128) * kv_heads * 128, 3u);
  check(cudaMalloc(&r.cu_q, cq.size() * 4), "cu_q");
  check(cudaMalloc(&r.cu_k, ck.size() * 4), "cu_k");
  check(cudaMemcpy(r.cu_q, cq.data(), cq.size() * 4, cudaMemcpyHostToDevice), "copy cu_q");
  check(cudaMemcpy(r.cu_k, ck.data(), ck.size() * 4, cudaMemcpyHostToDevice), "copy cu_k");
  r.p.cu_seqlens_q = r.cu_q;
  r.p.cu_seqlens_k = r.cu_k;
  r.p.out = r.out;
  r.p.lse = r.lse;
  r.p.l2_budget = static_cast<int64_t>(l2) * 5 / 8;
  r.p.scale_log2 = static_cast<float>(std::pow(192.0, -0.5) * 1.4426950408889634);
  r.p.batch = static_cast<int>(lqs.size());
  r.p.heads = heads;
  r.p.kv_group = heads / kv_heads;
  r.p.total_q = static_cast<int>(tq);
  r.p.causal = causal;
  r.t = {r.q, r.k, r.v, tq, tk, heads, kv_heads, heads * 192, 192, kv_heads * 192, 192, kv_heads * 128, 128};
  const int max_lq = *std::max_element(lqs.begin(), lqs.end());
  r.grid = pf::grid_size(static_cast<int64_t>(lqs.size()), heads, max_lq, sms);
  return r;
}

static void release(Run& r) {
  cudaFree(r.q), cudaFree(r.k), cudaFree(r.v), cudaFree(r.out), cudaFree(r.lse), cudaFree(r.cu_q), cudaFree(r.cu_k);
}

static cudaError_t launch(const Run& r) {
  const char* bad = nullptr;
  return pf::launch_mla_prefill_sm90_d192(r.p, r.t, r.grid, 0, &bad);
}

static float bf(__nv_bfloat16 x) { return __bfloat162float(x); }

// Small ragged causal batch against fp64 on the CPU: max abs error of out / lse.
static void check_small(int sms, size_t l2) {
  const std::vector<int> lqs = {300, 5, 129}, lks = {1000, 40, 129};
  const int heads = 2;
  Run r = setup(lqs, lks, heads, heads, 1, sms, l2);
  check(launch(r), "launch small");
  check(cudaDeviceSynchronize(), "run small");
  const int64_t tq = r.t.total_q, tk = r.t.total_k;
  std::vector<__nv_bfloat16> q(tq * heads * 192), k(tk * heads * 192), v(tk * heads * 128), o(tq * heads * 128);
  std::vector<float> lse(tq * heads);
  cudaMemcpy(q.data(), r.q, q.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(k.data(), r.k, k.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(v.data(), r.v, v.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(o.data(), r.out, o.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(lse.data(), r.lse, lse.size() * 4, cudaMemcpyDeviceToHost);
  double worst = 0.0, worst_lse = 0.0;
  int64_t q0 = 0, k0 = 0;
  const double scale = std::pow(192.0, -0.5);
  for (size_t b = 0; b < lqs.size(); ++b) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < lqs[b]; ++i) {
        const int lim = std::min(lks[b], lks[b] - lqs[b] + i + 1);
        std::vector<double> s(std::max(lim, 0));
        double mx = -1e300;
        for (int j = 0; j < lim; ++j) {
          double acc = 0.0;
          for (int d = 0; d < 192; ++d)
            acc += static_cast<double>(bf(q[((q0 + i) * heads + h) * 192 + d])) * bf(k[((k0 + j) * heads + h) * 192 + d]);
          s[j] = acc * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j < lim; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int d = 0; d < 128; ++d) {
          double acc = 0.0;
          for (int j = 0; j < lim; ++j) acc += s[j] * bf(v[((k0 + j) * heads + h) * 128 + d]);
          const double ref = lim > 0 ? acc / sum : 0.0;
          worst = std::max(worst, std::fabs(ref - bf(o[((q0 + i) * heads + h) * 128 + d])));
        }
        if (lim > 0) worst_lse = std::max(worst_lse, std::fabs(mx + std::log(sum) - lse[(q0 + i) * heads + h]));
      }
    }
    q0 += lqs[b];
    k0 += lks[b];
  }
  std::printf("check (300/1000, 5/40, 129/129 causal, 2 heads): max abs err out %.3e, lse %.3e -> %s\n", worst,
              worst_lse, worst < 2e-2 && worst_lse < 1e-3 ? "ok" : "WRONG");
  release(r);
}

int main(int argc, char** argv) {  // argv[1]: comma-separated case indices (default all)
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  int sms = 0, l2 = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "sms");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0), "l2");
  if (argc <= 1) check_small(sms, static_cast<size_t>(l2));
  const Case cases[] = {{1, 128, 128, 8192, 8192, 1, "1 x 8K/8K causal, 128 heads"},
                        {1, 16, 16, 16384, 16384, 0, "1 x 16K/16K non-causal, 16 heads"},
                        {4, 16, 16, 1024, 81920, 1, "4 x 1K/80K causal, 16 heads"},
                        {4, 32, 32, 1024, 81920, 1, "4 x 1K/80K causal, 32 heads"},
                        {8, 16, 16, 512, 16384, 1, "8 x 512/16K causal, 16 heads"},
                        {1, 132, 1, 128, 32768, 0, "main loop: 132 heads / 1 kv head, 128/32K"}};
  std::printf("case | us | TFLOP/s\n");
  for (int ci = 0; ci < static_cast<int>(sizeof(cases) / sizeof(cases[0])); ++ci) {
    if (argc > 1 && std::string(",").append(argv[1]).append(",").find("," + std::to_string(ci) + ",") == std::string::npos) continue;
    const Case& c = cases[ci];
    Run r = setup(std::vector<int>(c.n, c.lq), std::vector<int>(c.n, c.lk), c.heads, c.kv_heads, c.causal, sms,
                  static_cast<size_t>(l2));
    double pairs = 0.0;
    for (int i = 0; i < c.lq; ++i) pairs += c.causal ? std::min(c.lk, std::max(0, c.lk - c.lq + i + 1)) : c.lk;
    const double flops = 2.0 * c.n * c.heads * pairs * (192 + 128);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 2; ++i) check(launch(r), "launch");
    check(cudaDeviceSynchronize(), "warm-up");
    float best = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
      cudaEventRecord(e0);
      for (int i = 0; i < 10; ++i) launch(r);
      cudaEventRecord(e1);
      check(cudaEventSynchronize(e1), "timing");
      float ms = 0.f;
      cudaEventElapsedTime(&ms, e0, e1);
      best = std::min(best, ms * 100.f);  // us per launch
    }
    std::printf("%s | %.1f | %.1f\n", c.name, best, flops / best * 1e-6);
#if TS_PF_TRACE
    if (ci == 5) print_trace();
#endif
    release(r);
  }
  return 0;
}

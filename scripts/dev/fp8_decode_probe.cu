// Throughput probe of the sm90 MLA decode over an fp8 cache, without torch: times the real kernel
// (launch_mla_decode_sm90_fp8) on synthetic caches, built with -DTS_MLA_PROBE=n to time its halves
// alone (mla_decode_sm90_trace.cuh: 0 the kernel, 1 producers alone, 2 consumer alone, 3 producers
// loading without widening). Outputs are garbage under n > 0: only the times matter.
// Build and run on the device (scripts/dev/device_fp8_probe.sh does all four):
//   nvcc -std=c++20 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc \
//     -DTS_MLA_PROBE=0 scripts/dev/fp8_decode_probe.cu csrc/mla/decode/mla_decode_sm90_fp8.cu \
//     csrc/mla/decode/mla_decode_sm90_plan.cu -o /tmp/probe0 && /tmp/probe0
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "mla/decode/mla_decode_sm90.h"

namespace sm90 = tokenspeed::mla_sm90;

static void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

__global__ void fill_codes(uint8_t* codes, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    codes[i] = static_cast<uint8_t>((h >> 8) & 0xf7u);  // e4m3 without NaN (exponent 1111 with mantissa 111)
  }
}
__global__ void fill_q(__nv_bfloat16* q, size_t n) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    q[i] = __float2bfloat16(static_cast<float>(static_cast<int>(i * 7919u % 2001u) - 1000) * 1e-3f);
  }
}

struct Shape {
  int batch, heads, len, q_len;
};

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // a hung shape still shows the ones before it
  const int schedule = argc > 1 ? std::atoi(argv[1]) : 1;  // 1: transposed at <= 32 rows, 0: lockstep
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "sms");
  const Shape shapes[] = {{128, 16, 4096, 1}, {32, 16, 4096, 1}, {1, 16, 65536, 1}, {4, 16, 81920, 1}, {8, 16, 32768, 2},
                         {128, 32, 4096, 1}, {32, 16, 4096, 2}};
  std::printf("probe %d schedule %d | B x H x len x q_len | us | us per tile per SM | x fp8 bytes at 3000 GB/s\n",
              TS_MLA_PROBE, schedule);
  for (const Shape& s : shapes) {
    const int pages_per_seq = (s.len + 63) / 64;
    const int64_t pages = static_cast<int64_t>(s.batch) * pages_per_seq;
    const int rows = s.heads * s.q_len;
    uint8_t* codes;
    check(cudaMalloc(&codes, pages * 64 * 576), "codes");
    fill_codes<<<1024, 256>>>(codes, pages * 64 * 576, 12345u);
    __nv_bfloat16* q;
    check(cudaMalloc(&q, static_cast<size_t>(s.batch) * rows * 576 * 2), "q");
    fill_q<<<256, 256>>>(q, static_cast<size_t>(s.batch) * rows * 576);
    std::vector<int32_t> table(pages);
    std::iota(table.begin(), table.end(), 0);
    std::shuffle(table.begin(), table.end(), std::mt19937(7));
    std::vector<int32_t> lens(s.batch, s.len);
    int32_t *d_table, *d_lens;
    check(cudaMalloc(&d_table, pages * 4), "table");
    check(cudaMalloc(&d_lens, s.batch * 4), "lens");
    check(cudaMemcpy(d_table, table.data(), pages * 4, cudaMemcpyHostToDevice), "copy table");
    check(cudaMemcpy(d_lens, lens.data(), s.batch * 4, cudaMemcpyHostToDevice), "copy lens");
    const float one = 1.f;
    float* d_scale;
    check(cudaMalloc(&d_scale, 4), "scale");
    check(cudaMemcpy(d_scale, &one, 4, cudaMemcpyHostToDevice), "copy scale");
    const int m_blocks = sm90::m_blocks_for(rows);
    const int slots = sm90::slots_for(sms, m_blocks);
    float* ws;
    check(cudaMalloc(&ws, sm90::workspace_floats(slots, rows) * 4), "ws");
    void* out;
    float* lse;
    check(cudaMalloc(&out, static_cast<size_t>(s.batch) * rows * 512 * 2), "out");
    check(cudaMalloc(&lse, static_cast<size_t>(s.batch) * rows * 4), "lse");

    sm90::MlaDecodeSm90Params p{};
    p.q = q;
    p.q_stride_b = static_cast<int64_t>(rows) * 576;
    p.q_stride_i = static_cast<int64_t>(s.heads) * 576;
    p.q_stride_h = 576;
    p.block_table = d_table;
    p.block_table_stride = pages_per_seq;
    p.seqlens = d_lens;
    p.out = out;
    p.lse = lse;
    p.kv_scale = d_scale;
    p.ws_out = ws;
    p.ws_lse = ws + sm90::workspace_out_floats(slots, rows);
    p.ws_plan = reinterpret_cast<int*>(p.ws_lse + sm90::workspace_lse_floats(slots, rows));
    p.scale_log2 = static_cast<float>(std::pow(192.0, -0.5) * 1.4426950408889634);
    p.batch = s.batch;
    p.q_len = s.q_len;
    p.heads = s.heads;
    p.rows = rows;
    p.m_blocks = m_blocks;
    p.slots = slots;
    p.max_pages = pages_per_seq;
    p.page_size_log2 = 6;
    p.causal = 1;
    p.combine_dsplit = static_cast<int64_t>(s.batch) * ((rows + 3) / 4) >= 2LL * sms ? 1 : 4;
    p.min_split = sm90::kMinSplitCost;
    p.plan_window = sm90::kPlanWindow;
    p.schedule = schedule;

    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int i = 0; i < 3; ++i) check(sm90::launch_mla_decode_sm90_fp8(p, codes, pages, 0), "launch");
    check(cudaDeviceSynchronize(), "warm-up");
    float best = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
      cudaEventRecord(e0);
      for (int i = 0; i < 20; ++i) sm90::launch_mla_decode_sm90_fp8(p, codes, pages, 0);
      cudaEventRecord(e1);
      check(cudaEventSynchronize(e1), "timing");
      float ms = 0.f;
      cudaEventElapsedTime(&ms, e0, e1);
      best = std::min(best, ms * 1e3f / 20);
    }
    const double tiles_per_sm = static_cast<double>(s.batch) * pages_per_seq / sms;
    const double bytes_us = static_cast<double>(s.batch) * s.len * 576 / 3000e3;
    std::printf("%d x %d x %d x %d | %.1f | %.2f | %.2f\n", s.batch, s.heads, s.len, s.q_len, best, best / tiles_per_sm,
                best / bytes_us);
    cudaFree(codes);
    cudaFree(q);
    cudaFree(d_table);
    cudaFree(d_lens);
    cudaFree(d_scale);
    cudaFree(ws);
    cudaFree(out);
    cudaFree(lse);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  return 0;
}

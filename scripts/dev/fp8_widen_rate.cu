// Rate of widening e4m3 pairs to f16x2 on the device, per SM: the conversion instruction
// (cvt.rn.f16x2.e4m3x2) against an integer form (prmt + shift + and + add; the f16 then holds
// the value times 2^-8, a factor a kernel can fold into its scale). 8 independent chains per
// thread, every SM busy. Build and run (device):
//   nvcc -std=c++20 -O3 -gencode arch=compute_90a,code=sm_90a scripts/dev/fp8_widen_rate.cu -o /tmp/widen && /tmp/widen
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

template <int kMode>
__global__ void widen(uint32_t* out, int iters) {
  uint32_t x[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) x[c] = threadIdx.x * 2654435761u + c * 40503u;
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      uint32_t h;
      if constexpr (kMode == 0) {
        const uint16_t pair = static_cast<uint16_t>(x[c]);
        asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
      } else {
        uint32_t t, u;
        asm volatile("prmt.b32 %0, %1, 0, 0x1404;" : "=r"(t) : "r"(x[c]));
        u = t >> 1;
        h = u + (u & 0x40004000u);
      }
      x[c] ^= h;  // keeps the chain live; one extra integer op per conversion in both modes
    }
  }
  const long long t1 = clock64();
  uint32_t acc = 0;
#pragma unroll
  for (int c = 0; c < 8; ++c) acc ^= x[c];
  if (threadIdx.x == 0) out[blockIdx.x * 2] = static_cast<uint32_t>(t1 - t0);
  if (acc == 0x12345678u) out[blockIdx.x * 2 + 1] = acc;
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  uint32_t* out;
  cudaMalloc(&out, sms * 8 * 8);
  const int iters = 4096;
  for (int threads : {256, 512, 1024}) {
    for (int mode = 0; mode < 2; ++mode) {
      for (int rep = 0; rep < 2; ++rep) {
        if (mode == 0) widen<0><<<sms, threads>>>(out, iters);
        else widen<1><<<sms, threads>>>(out, iters);
      }
      cudaDeviceSynchronize();
      uint32_t cyc = 0;
      cudaMemcpy(&cyc, out, 4, cudaMemcpyDeviceToHost);
      const double per_clk = static_cast<double>(threads) * iters * 8 / cyc;  // pairs per clock per SM
      std::printf("%s | %d threads/SM | %.1f pairs/clk/SM (%.0f clk per 64 x 576 tile)\n",
                  mode == 0 ? "cvt.rn.f16x2.e4m3x2" : "prmt+shr+and+add", threads, per_clk, 18432.0 / per_clk);
    }
  }
  return 0;
}

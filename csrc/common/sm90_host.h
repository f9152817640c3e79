// Host-side helpers for the Hopper kernels' launchers in .cu files (no torch): the TMA
// descriptor encoder from the driver, and the one-time opt-in to > 48 KB of dynamic
// shared memory.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>

namespace tokenspeed::sm90 {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point, so the extension
// needs no link against libcuda; nullptr when the driver lacks it.
inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) return static_cast<EncodeTiledFn>(nullptr);
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// Raises one kernel's dynamic shared memory limit, once per device. Each kernel owns one
// instance (a function-local static in its launcher); the first call happens before any
// graph capture in practice (warm-up), and later calls are one atomic load.
class LargeSmemOptIn {
 public:
  cudaError_t ensure(const void* kernel, int bytes) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < kMaxDevices && done_[device].load(std::memory_order_acquire)) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess && device < kMaxDevices) done_[device].store(true, std::memory_order_release);
    return err;
  }

 private:
  static constexpr int kMaxDevices = 64;
  std::atomic<bool> done_[kMaxDevices] = {};
};

}  // namespace tokenspeed::sm90

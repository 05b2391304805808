// Shared helpers for the CUDA kernels of repforget_kernels: dtype codes and conversions.
// Plain CUDA (no torch headers: the CPU torch wheel ships none for CUDA), so nvcc checks it anywhere.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// dtype codes shared with the torch binding (cuda_ops.cpp)
enum RepforgetDtype : int { kRfFloat32 = 0, kRfFloat64 = 1, kRfFloat16 = 2, kRfBFloat16 = 3 };

template <typename To>
__device__ __forceinline__ To rf_convert(float v) { return static_cast<To>(v); }

template <typename To>
__device__ __forceinline__ To rf_convert(double v) { return static_cast<To>(v); }

template <typename To>
__device__ __forceinline__ To rf_convert(__half v) { return static_cast<To>(__half2float(v)); }

template <typename To>
__device__ __forceinline__ To rf_convert(__nv_bfloat16 v) { return static_cast<To>(__bfloat162float(v)); }

// Blocks for a grid-stride loop over `work` items with `threads` per block: enough to fill the
// device (blocks_per_sm per multiprocessor), never more than the work needs.
inline int rf_grid_blocks(int64_t work, int threads, int blocks_per_sm) {
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int64_t need = (work + threads - 1) / threads;
  int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  int64_t blocks = need < cap ? need : cap;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

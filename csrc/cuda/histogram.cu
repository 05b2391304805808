// Linear or log10-binned histogram in one pass: each block counts into shared-memory bins
// (32-bit, privatised per block), then adds its non-zero bins to the global int64 counts.
// Bin of v: floor(t * bins), t = (v - lo) / (hi - lo), or (log10 v - log10 lo) / (log10 hi - log10 lo)
// when log, t in float64; v == hi goes in the last bin; v outside [lo, hi], NaN, and v <= 0 when log
// are not counted. Above kMaxSharedBins bins the blocks count straight into global memory.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedBins = 12288;  // 48 KiB of 32-bit counters

__device__ __forceinline__ int bin_of(double v, double lo, double hi, double llo, double lspan, int bins, bool log_bins) {
  if (!(v >= lo && v <= hi)) return -1;  // also drops NaN
  double t;
  if (log_bins) {
    if (!(v > 0.0)) return -1;
    t = (log10(v) - llo) / lspan;
  } else {
    t = (v - lo) / (hi - lo);
  }
  int b = static_cast<int>(floor(t * bins));
  return b < 0 ? 0 : (b >= bins ? bins - 1 : b);
}

template <typename T, bool kShared>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const T* __restrict__ values, int64_t n, double lo, double hi,
                                                            double llo, double lspan, int bins, bool log_bins,
                                                            unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int local[];
  if (kShared) {
    for (int i = threadIdx.x; i < bins; i += blockDim.x) local[i] = 0u;
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int b = bin_of(rf_convert<double>(values[e]), lo, hi, llo, lspan, bins, log_bins);
    if (b >= 0) {
      if (kShared) atomicAdd(local + b, 1u);
      else atomicAdd(counts + b, 1ull);
    }
  }
  if (kShared) {
    __syncthreads();
    for (int i = threadIdx.x; i < bins; i += blockDim.x) {
      if (local[i]) atomicAdd(counts + i, static_cast<unsigned long long>(local[i]));
    }
  }
}

template <typename T>
cudaError_t launch(const void* values, int64_t n, double lo, double hi, int bins, bool log_bins,
                   unsigned long long* counts, cudaStream_t stream) {
  const double llo = log_bins && lo > 0.0 ? log10(lo) : 0.0;
  const double lspan = log_bins && lo > 0.0 ? log10(hi) - llo : 1.0;
  const int blocks = rf_grid_blocks(n, kThreads, 4);
  const T* v = static_cast<const T*>(values);
  if (bins <= kMaxSharedBins) {
    histogram_kernel<T, true><<<blocks, kThreads, bins * sizeof(unsigned int), stream>>>(v, n, lo, hi, llo, lspan, bins,
                                                                                         log_bins, counts);
  } else {
    histogram_kernel<T, false><<<blocks, kThreads, 0, stream>>>(v, n, lo, hi, llo, lspan, bins, log_bins, counts);
  }
  return cudaGetLastError();
}

}  // namespace

// values (n,) of dtype code (0 f32, 1 f64, 2 f16, 3 bf16), contiguous; counts (bins,) int64, zeroed
// by the caller; lo < hi (lo > 0 when log_bins). Adds the counts on `stream`; returns a cudaError_t.
extern "C" int repforget_histogram(const void* values, int dtype, int64_t n, double lo, double hi, int bins,
                                   int log_bins, unsigned long long* counts, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (bins < 1 || !(lo < hi) || (log_bins && !(lo > 0.0))) return cudaErrorInvalidValue;
  switch (dtype) {
    case kRfFloat32: return launch<float>(values, n, lo, hi, bins, log_bins != 0, counts, stream);
    case kRfFloat64: return launch<double>(values, n, lo, hi, bins, log_bins != 0, counts, stream);
    case kRfFloat16: return launch<__half>(values, n, lo, hi, bins, log_bins != 0, counts, stream);
    case kRfBFloat16: return launch<__nv_bfloat16>(values, n, lo, hi, bins, log_bins != 0, counts, stream);
    default: return cudaErrorInvalidValue;
  }
}

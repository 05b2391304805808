// acc += scale * grad^2 (grad upcast to acc's dtype first), bf16/fp16/fp32/fp64 grads into
// float32/float64 accumulators. Grid-stride loop; when both pointers are 16-byte aligned each
// thread moves one 16-byte vector of grads and the matching 16-byte vectors of acc per step
// (8 bf16 grads + 2 x 4 float32 accs), then a scalar tail. Memory-bound: one read of grad and
// one read-modify-write of acc, (sizeof(G) + 2 sizeof(A)) bytes per element.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;

template <typename A, typename G>
__global__ void __launch_bounds__(kThreads) square_acc_vec_kernel(A* __restrict__ acc, const G* __restrict__ grad,
                                                                 int64_t n, A scale) {
  constexpr int kPerVec = 16 / sizeof(G);                  // grads in one 16-byte load
  constexpr int kAccVecs = kPerVec * sizeof(A) / 16;       // 16-byte vectors of acc for them
  const int64_t nvec = n / kPerVec;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const uint4* gvec = reinterpret_cast<const uint4*>(grad);
  uint4* avec = reinterpret_cast<uint4*>(acc);
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    union { uint4 raw; G g[kPerVec]; } gu;
    union { uint4 raw[kAccVecs]; A a[kPerVec]; } au;
    gu.raw = __ldg(gvec + v);
#pragma unroll
    for (int j = 0; j < kAccVecs; ++j) au.raw[j] = avec[v * kAccVecs + j];
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) {
      A g = rf_convert<A>(gu.g[j]);
      au.a[j] += scale * (g * g);
    }
#pragma unroll
    for (int j = 0; j < kAccVecs; ++j) avec[v * kAccVecs + j] = au.raw[j];
  }
  for (int64_t e = nvec * kPerVec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    A g = rf_convert<A>(grad[e]);
    acc[e] += scale * (g * g);
  }
}

template <typename A, typename G>
__global__ void __launch_bounds__(kThreads) square_acc_scalar_kernel(A* __restrict__ acc, const G* __restrict__ grad,
                                                                    int64_t n, A scale) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    A g = rf_convert<A>(grad[e]);
    acc[e] += scale * (g * g);
  }
}

template <typename A, typename G>
cudaError_t launch(void* acc, const void* grad, int64_t n, double scale, cudaStream_t stream) {
  A* a = static_cast<A*>(acc);
  const G* g = static_cast<const G*>(grad);
  const bool aligned = (reinterpret_cast<uintptr_t>(acc) % 16 == 0) && (reinterpret_cast<uintptr_t>(grad) % 16 == 0);
  if (aligned) {
    const int64_t per = 16 / sizeof(G);
    int blocks = rf_grid_blocks(n / per > 0 ? n / per : 1, kThreads, 8);
    square_acc_vec_kernel<A, G><<<blocks, kThreads, 0, stream>>>(a, g, n, static_cast<A>(scale));
  } else {
    int blocks = rf_grid_blocks(n, kThreads, 8);
    square_acc_scalar_kernel<A, G><<<blocks, kThreads, 0, stream>>>(a, g, n, static_cast<A>(scale));
  }
  return cudaGetLastError();
}

template <typename A>
cudaError_t dispatch_grad(void* acc, const void* grad, int grad_dtype, int64_t n, double scale, cudaStream_t s) {
  switch (grad_dtype) {
    case kRfFloat32: return launch<A, float>(acc, grad, n, scale, s);
    case kRfFloat64: return launch<A, double>(acc, grad, n, scale, s);
    case kRfFloat16: return launch<A, __half>(acc, grad, n, scale, s);
    case kRfBFloat16: return launch<A, __nv_bfloat16>(acc, grad, n, scale, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

// acc (n,) float32 (acc_dtype 0) or float64 (1), contiguous; grad (n,) of grad_dtype (0 f32, 1 f64,
// 2 f16, 3 bf16), contiguous. acc += scale * grad^2 on `stream`. Returns a cudaError_t (0 = success).
extern "C" int repforget_square_accumulate(void* acc, int acc_dtype, const void* grad, int grad_dtype, int64_t n,
                                           double scale, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (acc_dtype) {
    case kRfFloat32: return dispatch_grad<float>(acc, grad, grad_dtype, n, scale, stream);
    case kRfFloat64: return dispatch_grad<double>(acc, grad, grad_dtype, n, scale, stream);
    default: return cudaErrorInvalidValue;
  }
}

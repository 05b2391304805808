// Torch binding of the CUDA kernels in csrc/cuda/*.cu (built only in a CUDA build of
// repforget_kernels._C, with -DREPFORGET_WITH_CUDA). Registers the CUDA kernels of two ops declared
// in repforget_kernels/_ops.py (schemas and contracts there):
//   square_accumulate(Tensor(a!)[] accs, Tensor[] grads, float scale) -> ()
//   histogram(Tensor values, float lo, float hi, int bins, bool log) -> Tensor (int64 counts)
// Each call passes data_ptr() and the current CUDA stream to the extern "C" launchers.
#ifdef REPFORGET_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

extern "C" int repforget_square_accumulate(void* acc, int acc_dtype, const void* grad, int grad_dtype, int64_t n,
                                           double scale, cudaStream_t stream);
extern "C" int repforget_histogram(const void* values, int dtype, int64_t n, double lo, double hi, int bins,
                                   int log_bins, unsigned long long* counts, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
  return -1;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void cuda_square_accumulate(at::TensorList accs, at::TensorList grads, double scale) {
  TORCH_CHECK(accs.size() == grads.size(), "accs and grads must have the same length, got ", accs.size(), " and ",
              grads.size());
  for (size_t i = 0; i < accs.size(); ++i) {
    const at::Tensor& acc = accs[i];
    const at::Tensor grad = grads[i].contiguous();
    TORCH_CHECK(acc.is_cuda() && grad.is_cuda() && acc.device() == grad.device(),
                "accs[", i, "] and grads[", i, "] must be CUDA tensors on one device");
    TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
                "accs[", i, "] must be float32 or float64, got ", acc.scalar_type());
    TORCH_CHECK(acc.numel() == grad.numel(), "accs[", i, "] has ", acc.numel(), " elements, grads[", i, "] has ",
                grad.numel());
    c10::cuda::CUDAGuard guard(acc.device());
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(acc.device().index()).stream();
    // a strided accumulator is updated in a contiguous copy, then written back
    const at::Tensor work = acc.is_contiguous() ? acc : acc.contiguous();
    check_launch(repforget_square_accumulate(work.data_ptr(), dtype_code(work, "acc"), grad.data_ptr(),
                                             dtype_code(grad, "grad"), work.numel(), scale, stream),
                 "repforget_square_accumulate");
    if (!acc.is_contiguous()) acc.copy_(work);
  }
}

at::Tensor cuda_histogram(const at::Tensor& values_in, double lo, double hi, int64_t bins, bool log) {
  TORCH_CHECK(values_in.is_cuda(), "values must be a CUDA tensor");
  TORCH_CHECK(values_in.dim() == 1, "values must be 1-D, got shape ", values_in.sizes());
  const at::Tensor values = values_in.contiguous();
  TORCH_CHECK(bins >= 1 && bins <= (1 << 24), "bins must be in [1, 2^24], got ", bins);
  TORCH_CHECK(lo < hi, "lo must be < hi, got lo=", lo, " hi=", hi);
  TORCH_CHECK(!log || lo > 0, "log bins need lo > 0, got lo=", lo);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor counts = at::zeros({bins}, values.options().dtype(at::kLong));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(values.device().index()).stream();
  check_launch(repforget_histogram(values.data_ptr(), dtype_code(values, "values"), values.numel(), lo, hi,
                                   static_cast<int>(bins), log ? 1 : 0,
                                   reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), stream),
               "repforget_histogram");
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(repforget, CUDA, m) {
  m.impl("square_accumulate", &cuda_square_accumulate);
  m.impl("histogram", &cuda_histogram);
}

#endif  // REPFORGET_WITH_CUDA

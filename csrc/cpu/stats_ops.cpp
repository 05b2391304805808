// CPU kernel of the column_stats op (declared in repforget_kernels/_ops.py).
//
// Contract: x (L, n, d) float16 / bfloat16 / float32 / float64 -> (sum (L, d) float64, min (L, d),
// max (L, d) in x's dtype): per layer, the column sums accumulated in float64 and the column extrema,
// in ONE read of x (the torch composite converts x to float64 first, then reduces, then scans
// twice more for the extrema). Rows are split over the threads; each thread sums blocks of kBlock
// rows into float64 block sums (recursive summation, n terms: error at most
// (kBlock + n / kBlock) u64 sum |x| per column) and keeps its extrema; the per-thread results are
// combined in thread order (deterministic for a given thread count). NaN reaches the sums; the
// extrema of a column holding NaN are unspecified (callers check the sums for finiteness).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace repforget {
namespace {

constexpr int64_t kBlock = 256;  // rows per float64 block sum

template <typename scalar_t>
void column_stats_layer(const scalar_t* x, int64_t n, int64_t d, double* sum, scalar_t* lo, scalar_t* hi) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half types, else the type itself
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + kBlock - 1) / kBlock));
  const int64_t rows_per = (n + threads - 1) / threads;
  std::vector<double> sums(threads * d, 0.0);
  std::vector<acc_t> los(threads * d, std::numeric_limits<acc_t>::infinity());
  std::vector<acc_t> his(threads * d, -std::numeric_limits<acc_t>::infinity());
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> block(d);
    for (int64_t t = t0; t < t1; ++t) {
      double* s = sums.data() + t * d;
      acc_t* l = los.data() + t * d;
      acc_t* h = his.data() + t * d;
      const int64_t r_end = std::min(n, (t + 1) * rows_per);
      for (int64_t r0 = t * rows_per; r0 < r_end; r0 += kBlock) {
        std::fill(block.begin(), block.end(), 0.0);
        const int64_t r1 = std::min(r_end, r0 + kBlock);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = x + r * d;
          for (int64_t j = 0; j < d; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            block[j] += static_cast<double>(v);
            l[j] = v < l[j] ? v : l[j];
            h[j] = v > h[j] ? v : h[j];
          }
        }
        for (int64_t j = 0; j < d; ++j) s[j] += block[j];
      }
    }
  });
  for (int64_t j = 0; j < d; ++j) {
    double s = 0.0;
    acc_t l = std::numeric_limits<acc_t>::infinity(), h = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < threads; ++t) {
      s += sums[t * d + j];
      l = std::min(l, los[t * d + j]);
      h = std::max(h, his[t * d + j]);
    }
    sum[j] = s;
    lo[j] = static_cast<scalar_t>(l);
    hi[j] = static_cast<scalar_t>(h);
  }
}

}  // namespace

// Also called by centered_gram (gram_ops.cpp) for its column means.
std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "column_stats: x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 3, "column_stats: x must be (L, n, d), got shape ", x_in.sizes());
  TORCH_CHECK(x_in.size(1) >= 1, "column_stats: x needs at least one row, got shape ", x_in.sizes());
  const at::ScalarType t = x_in.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "column_stats: x must have a floating dtype, got ", t);
  const at::Tensor x = x_in.contiguous();
  const int64_t L = x.size(0), n = x.size(1), d = x.size(2);
  at::Tensor sum = at::empty({L, d}, x.options().dtype(at::kDouble));  // (L, d)
  at::Tensor lo = at::empty({L, d}, x.options());                      // (L, d)
  at::Tensor hi = at::empty({L, d}, x.options());                      // (L, d)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "column_stats", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t l = 0; l < L; ++l)
      column_stats_layer<scalar_t>(xp + l * n * d, n, d, sum.data_ptr<double>() + l * d,
                                   lo.data_ptr<scalar_t>() + l * d, hi.data_ptr<scalar_t>() + l * d);
  });
  return {sum, lo, hi};
}

}  // namespace repforget

TORCH_LIBRARY_IMPL(repforget, CPU, m) { m.impl("column_stats", &repforget::column_stats_cpu); }

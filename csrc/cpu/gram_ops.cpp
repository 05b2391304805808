// CPU kernel of centered_gram: (L, n, d) -> ((L, n, n) centred or U-centred Grams, (L,) traces).
//
// Contract (repforget_kernels/cka.py, the torch composite):
//   x' = (x - mean) * scale[l] per layer, mean the float64 column means, scale a power of two
//   (default 1), rounded once to the compute dtype (float32, float64 for float64 input).
//   unbiased=false: Kc = H (X' X'^T) H, the doubly centred Gram (= X' X'^T when X' is exactly centred).
//   unbiased=true:  U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2)) for i != j, U_ii = 0, with
//                   K = X' X'^T, r = K~ 1 (K~: K with zero diagonal), s = 1^T K~ 1.
//   trace[l] = ||X'||_F^2 = tr K in float64: the size of the terms the centring cancels.
//
// What is fused: K is symmetric, so only the blocks (I, J) with I <= J are computed (one GEMM each,
// about half the flops of the full product); each block is centred while it is in cache and
// written to both (I, J) and (J, I). Both centrings subtract u_i + u_j from K_ij; the row sums come
// from the features, not from a pass over K: with c the column sums of X' (zero up to rounding),
// K 1 = X' c, so r_i = x'_i . c (- ||x'_i||^2 for K~), in float64 at O(n d) cost. Doubly centring the
// biased Gram as well removes whatever the float64 mean left in X' (e.g. the rounding of the mean of a
// constant float64 column), so every backend returns the same H K H.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace repforget {

// stats_ops.cpp: (L, n, d) -> (float64 column sums, column min, column max), one read of x.
std::tuple<at::Tensor, at::Tensor, at::Tensor> column_stats_cpu(const at::Tensor& x);

namespace {

constexpr int64_t kBlock = 256;  // rows per Gram block: a (256 x 256) block GEMM is BLAS-efficient

// Offsets u (n,) with the centred Gram K_ij - u_i - u_j (float64), and the trace sum_i ||x'_i||^2.
//   biased:   r_i = x'_i . c,                u_i = r_i / n - s / (2 n^2)              (H K H)
//   unbiased: r_i = x'_i . c - ||x'_i||^2,   u_i = r_i/(n-2) - s / (2 (n-1)(n-2))   (U-centring)
// with c the column sums of X' and s = sum_i r_i.
template <typename cd_t>
std::vector<double> centring_offsets(const cd_t* xc, int64_t n, int64_t d, bool unbiased, double* trace) {
  std::vector<double> c(static_cast<size_t>(d), 0.0);  // column sums of the shifted rows
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) c[j] += static_cast<double>(xc[i * d + j]);
  std::vector<double> u(static_cast<size_t>(n)), sq(static_cast<size_t>(n));
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double dot = 0.0, norm2 = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const double v = static_cast<double>(xc[i * d + j]);
        dot += v * c[j];
        norm2 += v * v;
      }
      sq[i] = norm2;
      u[i] = unbiased ? dot - norm2 : dot;  // r_i
    }
  });
  double s = 0.0, tr = 0.0;
  for (int64_t i = 0; i < n; ++i) {  // in row order: deterministic whatever the thread count
    s += u[i];
    tr += sq[i];
  }
  const double nn = static_cast<double>(n);
  const double div = unbiased ? nn - 2.0 : nn;
  const double half_s = unbiased ? s / (2.0 * (nn - 1.0) * (nn - 2.0)) : s / (2.0 * nn * nn);
  for (int64_t i = 0; i < n; ++i) u[i] = u[i] / div - half_s;
  *trace = tr;
  return u;
}

// One layer: out (n, n) from xc (n, d) contiguous, upper-triangle blocks only, mirrored; returns tr K.
template <typename cd_t>
double gram_layer(const at::Tensor& xc, const at::Tensor& out, bool unbiased) {
  const int64_t n = xc.size(0), d = xc.size(1);
  double trace = 0.0;
  const std::vector<double> u = centring_offsets<cd_t>(xc.const_data_ptr<cd_t>(), n, d, unbiased, &trace);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;  // upper-triangle block pairs (I <= J)
  for (int64_t bi = 0; bi < nb; ++bi)
    for (int64_t bj = bi; bj < nb; ++bj) pairs.emplace_back(bi, bj);
  cd_t* o = out.data_ptr<cd_t>();
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t i0 = pairs[p].first * kBlock, j0 = pairs[p].second * kBlock;
      const int64_t ni = std::min(kBlock, n - i0), nj = std::min(kBlock, n - j0);
      at::Tensor block = out.narrow(0, i0, ni).narrow(1, j0, nj);          // (ni, nj), row stride n
      at::mm_out(block, xc.narrow(0, i0, ni), xc.narrow(0, j0, nj).t());  // K[I, J] in place
      for (int64_t i = 0; i < ni; ++i) {  // centre the block while it is in cache
        cd_t* row = o + (i0 + i) * n + j0;
        const double ui = u[i0 + i];
        for (int64_t j = 0; j < nj; ++j) row[j] = static_cast<cd_t>(static_cast<double>(row[j]) - ui - u[j0 + j]);
        if (unbiased && i0 == j0) row[i] = cd_t(0);
      }
      if (i0 == j0) continue;
      for (int64_t j = 0; j < nj; ++j) {  // mirror into K[J, I]
        cd_t* row = o + (j0 + j) * n + i0;
        for (int64_t i = 0; i < ni; ++i) row[i] = o[(i0 + i) * n + j0 + j];
      }
    }
  });
  return trace;
}

// xc = (x - mean) * scale in float64, rounded once to the compute dtype: exact under large column offsets
// ("massive activations") and exact scaling by a power of two (no overflow or underflow in the
// products); one pass, no float64 copy of x. x (L, n, d) contiguous, mean (L, d), scale (L,) float64.
template <typename in_t, typename cd_t>
void centre_rows(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& xc) {
  const int64_t n = x.size(1), d = x.size(2);
  const in_t* xp = x.const_data_ptr<in_t>();
  const double* mp = mean.const_data_ptr<double>();
  const double* sp = scale.const_data_ptr<double>();
  cd_t* cp = xc.data_ptr<cd_t>();
  at::parallel_for(0, x.size(0) * n, 16, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const double* m = mp + (r / n) * d;
      const double sc = sp[r / n];
      for (int64_t j = 0; j < d; ++j)
        cp[r * d + j] = static_cast<cd_t>((static_cast<double>(xp[r * d + j]) - m[j]) * sc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> centered_gram_cpu(const at::Tensor& x, bool unbiased,
                                                     const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.device().is_cpu(), "centered_gram: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "centered_gram: x must be (L, n, d), got shape ", x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "centered_gram: x must have a floating dtype, got ", t);
  const int64_t L = x.size(0), n = x.size(1);
  TORCH_CHECK(n >= (unbiased ? 3 : 1), "centered_gram: x needs at least ", unbiased ? 3 : 1,
              " rows for unbiased=", unbiased, ", got shape ", x.sizes());
  if (scale.has_value())
    TORCH_CHECK(scale->device().is_cpu() && scale->is_floating_point() && scale->dim() == 1 && scale->size(0) == L,
                "centered_gram: scale must be a floating CPU tensor of shape [", L, "], got ", scale->scalar_type(),
                " of shape ", scale->sizes());
  const at::Tensor sc = scale.has_value() ? scale->to(at::kDouble).contiguous()
                                          : at::ones({L}, x.options().dtype(at::kDouble));  // (L,) float64
  const at::ScalarType cd = t == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xin = x.contiguous();
  // (L, d) float64 means, from one read of x (no float64 copy of it)
  const at::Tensor mean = std::get<0>(column_stats_cpu(xin)).div_(static_cast<double>(n));
  at::Tensor xc = at::empty(x.sizes(), x.options().dtype(cd));                                      // (L, n, d)
  at::Tensor out = at::empty({L, n, n}, xc.options());                                               // (L, n, n)
  at::Tensor trace = at::empty({L}, x.options().dtype(at::kDouble));                                 // (L,)
  double* tp = trace.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(cd, "centered_gram", [&] {
    using cd_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "centered_gram_centre",
                                    [&] { centre_rows<scalar_t, cd_t>(xin, mean, sc, xc); });
    for (int64_t l = 0; l < L; ++l) tp[l] = gram_layer<cd_t>(xc[l], out[l], unbiased);
  });
  return {out, trace};
}

}  // namespace

TORCH_LIBRARY_IMPL(repforget, CPU, m) { m.impl("centered_gram", &centered_gram_cpu); }

}  // namespace repforget

// CPU kernels of the Fisher ops: square_accumulate, histogram, per_sample_linear_fisher.
//
// Contracts (see repforget_kernels/fisher.py, the torch composites):
//   square_accumulate(accs, grads, scale): acc += scale * grad.to(acc.dtype)^2 in place, one pass,
//     no temporary; accs float32/float64 contiguous, grads same shape, any float dtype, contiguous.
//   histogram(values, lo, hi, bins, log) -> (bins,) int64: bin floor(t * bins) with
//     t = (v - lo) / (hi - lo) or (log10 v - log10 lo) / (log10 hi - log10 lo), in float64;
//     v == hi goes in the last bin, v outside [lo, hi] (or NaN) is not counted.
//   per_sample_linear_fisher(x (B,T,in), g (B,T,out), mask (B,T) bool?, out (out,in)):
//     out += sum_s (sum_t m_st g_st x_st^T)^2, computed in out's dtype, never B x out x in.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace repforget {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel chunk for streaming loops

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Element conversion to the accumulation type. bf16 -> float is a 16-bit shift, written
// out so the compiler vectorises it.
template <typename acc_t, typename in_t>
inline acc_t to_acc(in_t v) {
  return static_cast<acc_t>(v);
}
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ------------------------------------------------------------------ square_accumulate

template <typename acc_t, typename grad_t>
void square_accumulate_one(const at::Tensor& acc, const at::Tensor& grad, double scale) {
  acc_t* __restrict a = acc.data_ptr<acc_t>();
  const grad_t* __restrict g = grad.const_data_ptr<grad_t>();
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, acc.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t v = to_acc<acc_t>(g[i]);
      a[i] += s * (v * v);
    }
  });
}

void square_accumulate_cpu(at::TensorList accs, at::TensorList grads, double scale) {
  TORCH_CHECK(accs.size() == grads.size(), "square_accumulate: accs and grads must have the same length, got ",
              accs.size(), " and ", grads.size());
  for (size_t k = 0; k < accs.size(); ++k) {
    const at::Tensor& acc = accs[k];
    const at::Tensor& grad = grads[k];
    TORCH_CHECK(acc.device().is_cpu() && grad.device().is_cpu(), "square_accumulate: accs[", k, "] and grads[", k,
                "] must be CPU tensors, got ", acc.device(), " and ", grad.device());
    TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, "square_accumulate: accs[", k,
                "] must be float32 or float64, got ", acc.scalar_type());
    TORCH_CHECK(is_float_dtype(grad.scalar_type()), "square_accumulate: grads[", k,
                "] must have a floating dtype, got ", grad.scalar_type());
    TORCH_CHECK(acc.sizes() == grad.sizes(), "square_accumulate: accs[", k, "] has shape ", acc.sizes(),
                " but grads[", k, "] has shape ", grad.sizes());
    TORCH_CHECK(acc.is_contiguous() && grad.is_contiguous(), "square_accumulate: accs[", k, "] and grads[", k,
                "] must be contiguous");
  }
  for (size_t k = 0; k < accs.size(); ++k) {
    const at::Tensor& acc = accs[k];
    const at::Tensor& grad = grads[k];
    AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "square_accumulate_acc", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "square_accumulate_grad", [&] {
        square_accumulate_one<acc_t, scalar_t>(acc, grad, scale);
      });
    });
  }
}

// ------------------------------------------------------------------ histogram

// Bin of v, or -1 when v is not counted: the definition, t in float64 as the contract says.
struct Binner {
  double lo, hi, base, span;
  int64_t bins;
  bool log;
  inline int64_t operator()(double v) const {
    if (!(v >= lo && v <= hi)) return -1;  // also drops NaN
    const double t = log ? (std::log10(v) - base) / span : (v - base) / span;
    const int64_t k = static_cast<int64_t>(std::floor(t * static_cast<double>(bins)));
    return k < 0 ? 0 : (k >= bins ? bins - 1 : k);
  }
};

// Order-preserving map of doubles to uint64 (NaNs of either sign land outside any finite range).
inline uint64_t order_key(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return (b >> 63) ? ~b : (b | (uint64_t(1) << 63));
}
inline double from_key(uint64_t k) {
  const uint64_t b = (k >> 63) ? (k & ~(uint64_t(1) << 63)) : ~k;
  double v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// The same bins as Binner without a log10 or a division per value. Binner is monotone in v, so
// bin k starts at an exact threshold thr[k] (the smallest double with bin >= k, found once by
// bisection over the order keys); a table over the top bits of the key gives each value its
// first candidate bin and a short forward scan over thr finishes. Exact, not approximate.
struct KeyBinner {
  uint64_t klo, khi;
  int shift;
  std::vector<uint64_t> thr;    // (bins + 1,) keys; thr[bins] is a sentinel above every key
  std::vector<int64_t> table;   // bin of the first key of each bucket of 2^shift keys

  KeyBinner(const Binner& bin, int64_t table_size)
      : klo(order_key(bin.lo + 0.0)), khi(order_key(bin.hi + 0.0)), shift(0) {
    const int64_t bins = bin.bins;
    thr.assign(static_cast<size_t>(bins + 1), ~uint64_t(0));
    thr[0] = klo;
    for (int64_t k = 1; k < bins; ++k) {  // bin(lo) = 0 < k <= bins - 1 = bin(hi)
      uint64_t a = klo, b = khi;
      while (b - a > 1) {
        const uint64_t m = a + (b - a) / 2;
        (bin(from_key(m)) >= k ? b : a) = m;
      }
      thr[k] = b;
    }
    while (((khi >> shift) - (klo >> shift)) >= static_cast<uint64_t>(table_size)) ++shift;
    const uint64_t n_buckets = (khi >> shift) - (klo >> shift) + 1;
    table.resize(n_buckets);
    for (uint64_t j = 0; j < n_buckets; ++j) {
      const uint64_t first = std::max(klo, ((klo >> shift) + j) << shift);
      table[j] = std::upper_bound(thr.begin() + 1, thr.begin() + bins, first) - (thr.begin() + 1);
    }
  }
  inline int64_t operator()(double v) const {
    const uint64_t kv = order_key(v + 0.0);  // + 0.0 folds -0.0 into +0.0, as Binner compares
    if (kv < klo || kv > khi) return -1;
    int64_t k = table[(kv >> shift) - (klo >> shift)];
    while (kv >= thr[k + 1]) ++k;
    return k;
  }
};

template <typename in_t, typename binner_t>
void histogram_range(const in_t* __restrict p, int64_t begin, int64_t end, const binner_t& bin, int64_t* h) {
  for (int64_t i = begin; i < end; ++i) {
    double v;
    if constexpr (std::is_same_v<in_t, double>) {
      v = p[i];
    } else {
      v = static_cast<double>(to_acc<float>(p[i]));
    }
    const int64_t k = bin(v);
    if (k >= 0) ++h[k];
  }
}

template <typename binner_t>
void histogram_fill(const at::Tensor& values, const binner_t& bin, int64_t bins, std::vector<int64_t>& local,
                    int64_t n_threads) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "histogram", [&] {
    const scalar_t* p = values.const_data_ptr<scalar_t>();
    at::parallel_for(0, values.numel(), kGrain, [&](int64_t begin, int64_t end) {
      const int64_t tid = std::min<int64_t>(at::get_thread_num(), n_threads - 1);
      histogram_range<scalar_t>(p, begin, end, bin, local.data() + tid * bins);
    });
  });
}

at::Tensor histogram_cpu(const at::Tensor& values, double lo, double hi, int64_t bins, bool log) {
  TORCH_CHECK(values.device().is_cpu(), "histogram: values must be a CPU tensor, got ", values.device());
  TORCH_CHECK(values.dim() == 1, "histogram: values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(is_float_dtype(values.scalar_type()), "histogram: values must have a floating dtype, got ",
              values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), "histogram: values must be contiguous");
  TORCH_CHECK(bins >= 1, "histogram: bins must be >= 1, got ", bins);
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi, "histogram: need finite lo < hi, got lo=", lo,
              " hi=", hi);
  TORCH_CHECK(!log || lo > 0, "histogram: log bins need lo > 0, got lo=", lo);
  Binner bin{lo, hi, log ? std::log10(lo) : lo, log ? std::log10(hi) - std::log10(lo) : hi - lo, bins, log};

  const int64_t n_threads = at::get_num_threads();
  std::vector<int64_t> local(static_cast<size_t>(n_threads * bins), 0);  // thread-private bins
  // thresholds cost ~64 bin evaluations per bin: worth it once there are many values per bin
  const int64_t table_size = std::max<int64_t>(4096, 4 * bins);
  if (values.numel() >= 256 * bins + table_size)
    histogram_fill(values, KeyBinner(bin, table_size), bins, local, n_threads);
  else
    histogram_fill(values, bin, bins, local, n_threads);
  at::Tensor counts = at::zeros({bins}, values.options().dtype(at::kLong));  // (bins,)
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < n_threads; ++t)
    for (int64_t k = 0; k < bins; ++k) c[k] += local[t * bins + k];
  return counts;
}

// ------------------------------------------------------------------ per_sample_linear_fisher

// Rows tok[0..n) of g (token-major, out_f wide), columns r0..r0+nr, into a (n, ld) buffer in the
// compute dtype: the masked tile of one sample's g_s^T.
template <typename cd_t, typename in_t>
void gather_tile(const in_t* g, const int64_t* tok, int64_t n, int64_t out_f, int64_t r0, int64_t nr, cd_t* dst,
                 int64_t ld) {
  for (int64_t k = 0; k < n; ++k) {
    const in_t* src = g + tok[k] * out_f + r0;
    cd_t* d = dst + k * ld;
    for (int64_t r = 0; r < nr; ++r) d[r] = to_acc<cd_t>(src[r]);
  }
}

template <typename cd_t>
void add_squares(cd_t* __restrict out, const cd_t* __restrict g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += g[i] * g[i];
}

// Output rows per tile: the tile of G (rows x in) about 1 MiB (measured best on a 1024 x 1024
// layer: smaller tiles re-read x_s too often, larger ones leave the cache), at least one tile per thread.
int64_t tile_rows(int64_t out_f, int64_t in_f, int64_t elem_size) {
  const int64_t by_cache = std::max<int64_t>(8, (int64_t(1) << 20) / (elem_size * std::max<int64_t>(in_f, 1)));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_threads = std::max<int64_t>(1, (out_f + threads - 1) / threads);
  return std::min({by_cache, by_threads, out_f});
}

// The unmasked tokens as flat indices b*T + t, and where each sample's run starts: (tok, start (B+1)).
std::pair<std::vector<int64_t>, std::vector<int64_t>> live_tokens(const bool* mask, int64_t B, int64_t T) {
  std::vector<int64_t> tok, start(static_cast<size_t>(B + 1), 0);
  tok.reserve(static_cast<size_t>(B * T));
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t t = 0; t < T; ++t)
      if (mask == nullptr || mask[s * T + t]) tok.push_back(s * T + t);
    start[s + 1] = static_cast<int64_t>(tok.size());
  }
  return {std::move(tok), std::move(start)};
}

// Masked tokens are dropped, not zeroed: each per-sample GEMM has inner size T_s (live tokens).
// x's live rows are gathered (and upcast) a chunk of samples at a time, at most max(out, T)
// rows per chunk, so the scratch stays within one weight matrix.
template <typename cd_t, typename g_t>
void psl_fisher_impl(const at::Tensor& x, const at::Tensor& g, const bool* mask, const at::Tensor& out) {
  const int64_t B = x.size(0), T = x.size(1), in_f = x.size(2), out_f = g.size(2);
  const at::ScalarType cd = out.scalar_type();
  const int64_t rows = tile_rows(out_f, in_f, sizeof(cd_t));
  const int64_t n_tiles = (out_f + rows - 1) / rows;
  auto [tok, start] = live_tokens(mask, B, T);
  const bool gather = mask != nullptr || x.scalar_type() != cd;
  const int64_t chunk_rows = gather ? std::max(out_f, T) : B * T;
  const at::Tensor x2 = x.view({B * T, in_f});  // (B*T, in)
  const g_t* gp = g.const_data_ptr<g_t>();
  cd_t* op = out.data_ptr<cd_t>();
  for (int64_t s0 = 0, s1 = 0; s0 < B; s0 = s1) {
    for (s1 = s0 + 1; s1 < B && start[s1 + 1] - start[s0] <= chunk_rows;) ++s1;
    const int64_t base = start[s0], n_live = start[s1] - base;
    if (n_live == 0) continue;
    at::Tensor idx = at::from_blob(tok.data() + base, {n_live}, at::TensorOptions().dtype(at::kLong));
    const at::Tensor xs = gather ? x2.index_select(0, idx).to(cd)  // (n_live, in) live rows of x
                                 : x2;
    at::parallel_for(0, n_tiles, 1, [&](int64_t tb, int64_t te) {
      at::Tensor a_buf = at::empty({T, rows}, out.options());    // (T, rows) live rows of a g tile
      at::Tensor g_buf = at::empty({rows, in_f}, out.options());  // (rows, in) per-sample gradient tile
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t r0 = tile * rows, nr = std::min(rows, out_f - r0);
        at::Tensor gt = g_buf.narrow(0, 0, nr);  // (nr, in), contiguous
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t n_s = start[s + 1] - start[s];
          if (n_s == 0) continue;
          gather_tile<cd_t, g_t>(gp, tok.data() + start[s], n_s, out_f, r0, nr, a_buf.data_ptr<cd_t>(), rows);
          at::Tensor a = a_buf.narrow(0, 0, n_s).narrow(1, 0, nr);              // (T_s, nr)
          at::mm_out(gt, a.t(), xs.narrow(0, start[s] - base, n_s));          // (nr, in) = g_s[:, tile]^T x_s
          add_squares<cd_t>(op + r0 * in_f, gt.const_data_ptr<cd_t>(), nr * in_f);
        }
      }
    });
  }
}

void per_sample_linear_fisher_cpu(const at::Tensor& x, const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& out) {
  TORCH_CHECK(x.device().is_cpu() && grad_out.device().is_cpu() && out.device().is_cpu(),
              "per_sample_linear_fisher: x, grad_out and out must be CPU tensors");
  TORCH_CHECK(x.dim() == 3, "per_sample_linear_fisher: x must be (B, T, in), got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1),
              "per_sample_linear_fisher: grad_out must be (B, T, out) with x's B and T, got ", grad_out.sizes(),
              " for x ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()) && is_float_dtype(grad_out.scalar_type()),
              "per_sample_linear_fisher: x and grad_out must have floating dtypes, got ", x.scalar_type(), " and ",
              grad_out.scalar_type());
  TORCH_CHECK(x.is_contiguous() && grad_out.is_contiguous(), "per_sample_linear_fisher: x and grad_out must be contiguous");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "per_sample_linear_fisher: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == grad_out.size(2) && out.size(1) == x.size(2),
              "per_sample_linear_fisher: out must be (out, in) = (", grad_out.size(2), ", ", x.size(2), "), got ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "per_sample_linear_fisher: out must be contiguous");
  const bool* m = nullptr;
  if (mask.has_value()) {
    const at::Tensor& mk = *mask;
    TORCH_CHECK(mk.device().is_cpu() && mk.scalar_type() == at::kBool && mk.is_contiguous(),
                "per_sample_linear_fisher: mask must be a contiguous bool CPU tensor, got ", mk.scalar_type());
    TORCH_CHECK(mk.dim() == 2 && mk.size(0) == x.size(0) && mk.size(1) == x.size(1),
                "per_sample_linear_fisher: mask must be (B, T) = (", x.size(0), ", ", x.size(1), "), got ",
                mk.sizes());
    m = mk.const_data_ptr<bool>();
  }
  if (x.numel() == 0 || out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "per_sample_linear_fisher_out", [&] {
    using cd_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "per_sample_linear_fisher_g",
                                    [&] { psl_fisher_impl<cd_t, scalar_t>(x, grad_out, m, out); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(repforget, CPU, m) {
  m.impl("square_accumulate", &square_accumulate_cpu);
  m.impl("histogram", &histogram_cpu);
  m.impl("per_sample_linear_fisher", &per_sample_linear_fisher_cpu);
}

}  // namespace repforget

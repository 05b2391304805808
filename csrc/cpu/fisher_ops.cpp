// CPU kernels of the Fisher ops: square_accumulate, histogram.
//
// Contracts (see repforget_kernels/fisher.py, the torch composites):
//   square_accumulate(accs, grads, scale): acc += scale * grad.to(acc.dtype)^2 in place, one pass,
//     no temporary; accs float32/float64 contiguous, grads same shape, any float dtype, contiguous.
//   histogram(values, lo, hi, bins, log) -> (bins,) int64: bin floor(t * bins) with
//     t = (v - lo) / (hi - lo) or (log10 v - log10 lo) / (log10 hi - log10 lo), in float64;
//     v == hi goes in the last bin, v outside [lo, hi] (or NaN) is not counted.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
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
  }
  for (size_t k = 0; k < accs.size(); ++k) {
    const at::Tensor& acc = accs[k];
    const at::Tensor grad = grads[k].contiguous();
    // a strided accumulator is updated in a contiguous copy, then written back
    const at::Tensor work = acc.is_contiguous() ? acc : acc.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "square_accumulate_acc", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "square_accumulate_grad", [&] {
        square_accumulate_one<acc_t, scalar_t>(work, grad, scale);
      });
    });
    if (!acc.is_contiguous()) acc.copy_(work);
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
  TORCH_CHECK(bins >= 1, "histogram: bins must be >= 1, got ", bins);
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi, "histogram: need finite lo < hi, got lo=", lo,
              " hi=", hi);
  TORCH_CHECK(!log || lo > 0, "histogram: log bins need lo > 0, got lo=", lo);
  const at::Tensor flat = values.contiguous();  // the kernels read one dense run
  Binner bin{lo, hi, log ? std::log10(lo) : lo, log ? std::log10(hi) - std::log10(lo) : hi - lo, bins, log};

  const int64_t n_threads = at::get_num_threads();
  std::vector<int64_t> local(static_cast<size_t>(n_threads * bins), 0);  // thread-private bins
  // thresholds cost ~64 bin evaluations per bin: worth it once there are many values per bin
  const int64_t table_size = std::max<int64_t>(4096, 4 * bins);
  if (values.numel() >= 256 * bins + table_size)
    histogram_fill(flat, KeyBinner(bin, table_size), bins, local, n_threads);
  else
    histogram_fill(flat, bin, bins, local, n_threads);
  at::Tensor counts = at::zeros({bins}, values.options().dtype(at::kLong));  // (bins,)
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t t = 0; t < n_threads; ++t)
    for (int64_t k = 0; k < bins; ++k) c[k] += local[t * bins + k];
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(repforget, CPU, m) {
  m.impl("square_accumulate", &square_accumulate_cpu);
  m.impl("histogram", &histogram_cpu);
}

}  // namespace repforget

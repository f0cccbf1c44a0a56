// syncnorm's CPU kernels: the four passes over the data of one synchronising BatchNorm step.
//
// Each function here is the CPU kernel of one custom op of syncnorm/ops.py, which holds the schema, the reference
// implementation in plain torch operations (the maths these kernels must match), and the fake implementation:
//
//   batch_stats     x                 -> fp64 [n, 0, sum x, sum x^2]             (the forward all-reduce's vector)
//   normalize       x, [k, s, h]      -> y = (x - k) * s + h                     (per channel)
//   backward_stats  dy, x, k          -> fp64 [sum dy, sum dy * (x - k)]
//   backward_input  dy, x, [k, a, b, c] -> dx = dy * a + (x - k) * b + c
//
// The per-channel constants come from syncnorm/functional.py; no collective and no statistics formula lives here.
// Sums are taken in the accumulation type (float for float/half/bfloat16, double for double) in SIMD lanes over
// blocks of at most 4096 values, and each block's total is added in double. A channel whose mean is large against
// its spread (mean^2 > 100 var) is summed again around its mean, so sum x^2 - (sum x)^2 / n keeps its digits.
//
// Layouts: contiguous (N, C, *), channels_last / channels_last_3d, and (N, C). Anything else is made contiguous.
// Built without -march=native and with -ffp-contract=off, so the rounding does not depend on the CPU that built it.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kBlock = 4096;       // values per lane block before its total is added in double
constexpr double kShiftAbove = 100.0;  // a channel with mean^2 > kShiftAbove * var is summed around its mean

enum class Layout { kChannelsFirst, kChannelsLast };

// (rows, C, S) view of an (N, C, *) tensor: channels-first has N rows of C * S, channels-last N * S rows of C.
struct Geometry {
  Layout layout;
  int64_t N, C, S;
};

Geometry geometry(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N * C) ? x.numel() / (N * C) : 1;
  if (x.dim() == 2) return {Layout::kChannelsLast, N, C, 1};
  if (x.is_contiguous()) return {Layout::kChannelsFirst, N, C, S};
  return {Layout::kChannelsLast, N, C, S};  // supported() made sure x is channels_last(_3d) contiguous
}

at::MemoryFormat memory_format(const Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// x itself when it is contiguous in a supported layout, else a contiguous copy.
Tensor supported(const Tensor& x) {
  if (x.is_contiguous()) return x;
  if (memory_format(x) != at::MemoryFormat::Contiguous) return x;
  return x.contiguous();
}

// dy in x's dtype and memory format (x as returned by supported()).
Tensor like_input(const Tensor& dy, const Tensor& x) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "syncnorm: gradient of shape ", dy.sizes(), " for an input of shape ",
              x.sizes());
  return (dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type())).contiguous(memory_format(x));
}

// The C values of row `row` of a (R, C) per-channel constant tensor, in the accumulation type A.
template <typename A>
std::vector<A> row_of(const Tensor& coef, int64_t row, int64_t C) {
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == C && row < coef.size(0), "syncnorm: expected per-channel "
              "constants of shape (", row + 1, ", ", C, "), got ", coef.sizes());
  const Tensor r = coef.select(0, row).to(at::kDouble).contiguous();
  const double* p = r.const_data_ptr<double>();
  std::vector<A> out(C);
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<A>(p[c]);
  return out;
}

// Explicit SIMD through GCC/Clang vector extensions (32-byte vectors). Reductions need it: without -ffast-math the
// compiler does not reassociate a scalar sum.
template <typename A>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  static constexpr int64_t W = 8;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  static constexpr int64_t W = 4;
};

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename A, typename V>
inline double hsum(V v) {
  double t = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(sizeof(V) / sizeof(A)); ++j) t += v[j];
  return t;
}

// s1 += sum(p - k), s2 += sum((p - k)^2) over n contiguous values.
template <typename T, typename A>
inline void moments_run(const T* p, int64_t n, A k, double& s1, double& s2) {
  int64_t i = 0;
  while (i < n) {
    const int64_t end = std::min(n, i + kBlock);
    A ta = 0, tb = 0;
    if constexpr (std::is_same_v<T, A>) {
      using V = typename Simd<A>::V;
      constexpr int64_t W = Simd<A>::W;
      V a0{}, a1{}, b0{}, b1{};
      for (; i + 2 * W <= end; i += 2 * W) {
        const V v0 = load<V>(p + i) - k, v1 = load<V>(p + i + W) - k;
        a0 += v0;
        a1 += v1;
        b0 += v0 * v0;
        b1 += v1 * v1;
      }
      s1 += hsum<A>(a0 + a1);
      s2 += hsum<A>(b0 + b1);
    }
    for (; i < end; ++i) {
      const A v = static_cast<A>(p[i]) - k;
      ta += v;
      tb += v * v;
    }
    s1 += ta;
    s2 += tb;
  }
}

// s1 += sum(dy), s2 += sum(dy * (x - k)) over n contiguous values.
template <typename T, typename A>
inline void dot_run(const T* dy, const T* x, int64_t n, A k, double& s1, double& s2) {
  int64_t i = 0;
  while (i < n) {
    const int64_t end = std::min(n, i + kBlock);
    A ta = 0, tb = 0;
    if constexpr (std::is_same_v<T, A>) {
      using V = typename Simd<A>::V;
      constexpr int64_t W = Simd<A>::W;
      V a0{}, a1{}, b0{}, b1{};
      for (; i + 2 * W <= end; i += 2 * W) {
        const V g0 = load<V>(dy + i), g1 = load<V>(dy + i + W);
        a0 += g0;
        a1 += g1;
        b0 += g0 * (load<V>(x + i) - k);
        b1 += g1 * (load<V>(x + i + W) - k);
      }
      s1 += hsum<A>(a0 + a1);
      s2 += hsum<A>(b0 + b1);
    }
    for (; i < end; ++i) {
      const A g = static_cast<A>(dy[i]);
      ta += g;
      tb += g * (static_cast<A>(x[i]) - k);
    }
    s1 += ta;
    s2 += tb;
  }
}

// Per-channel reduction over the R rows of C values of a channels-last tensor: body(row, a, b) accumulates into
// the per-channel lanes a and b (type A) over blocks of rows; each block is added in double to out1 / out2.
template <typename A, typename Body>
void channels_last_reduce(int64_t R, int64_t C, double* out1, double* out2, const Body& body) {
  std::mutex mu;
  const int64_t rows_per_block = std::max<int64_t>(1, std::min<int64_t>(kBlock / 8, R));
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<double> d1(C, 0.0), d2(C, 0.0);
    std::vector<A> a(C), b(C);
    for (int64_t r0 = begin; r0 < end; r0 += rows_per_block) {
      const int64_t r1 = std::min(end, r0 + rows_per_block);
      std::fill(a.begin(), a.end(), A(0));
      std::fill(b.begin(), b.end(), A(0));
      for (int64_t r = r0; r < r1; ++r) body(r, a.data(), b.data());
      for (int64_t c = 0; c < C; ++c) {
        d1[c] += a[c];
        d2[c] += b[c];
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t c = 0; c < C; ++c) {
      out1[c] += d1[c];
      out2[c] += d2[c];
    }
  });
}

// Per-channel sum(x - k) and sum((x - k)^2) in double; k may be null (no shift).
template <typename T>
void channel_moments(const Tensor& x, const Geometry& g, const double* k, double* s1, double* s2) {
  using A = at::opmath_type<T>;
  const T* p = x.const_data_ptr<T>();
  const int64_t N = g.N, C = g.C, S = g.S;
  std::fill(s1, s1 + C, 0.0);
  std::fill(s2, s2 + C, 0.0);
  if (g.layout == Layout::kChannelsFirst) {
    at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(N * S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const A kc = k ? static_cast<A>(k[c]) : A(0);
        for (int64_t n = 0; n < N; ++n) moments_run<T, A>(p + (n * C + c) * S, S, kc, s1[c], s2[c]);
      }
    });
  } else {
    std::vector<A> kk(C, A(0));
    if (k)
      for (int64_t c = 0; c < C; ++c) kk[c] = static_cast<A>(k[c]);
    channels_last_reduce<A>(N * S, C, s1, s2, [&](int64_t r, A* a, A* b) {
      const T* row = p + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const A v = static_cast<A>(row[c]) - kk[c];
        a[c] += v;
        b[c] += v * v;
      }
    });
  }
}

// Elementwise pass over x's layout: run(c, begin, end) for a run of flat offsets [begin, end) of channel c
// (channels-first), or row(begin) for a row of C values at flat offset begin (channels-last). The per-channel
// constants are read into locals before each inner loop, so the loop does not reload them from memory that the
// output might alias, and vectorises.
template <typename Run, typename Row>
void for_each_run(const Geometry& g, const Run& run, const Row& row) {
  const int64_t N = g.N, C = g.C, S = g.S;
  if (g.layout == Layout::kChannelsFirst) {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) run(r % C, r * S, r * S + S);
    });
  } else {
    at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) row(r * C);
    });
  }
}

Tensor batch_stats(const Tensor& x_in, int64_t num_features) {
  TORCH_CHECK(x_in.dim() >= 2 && x_in.size(1) == num_features, "syncnorm.batch_stats: expected an (N, ",
              num_features, ", *) input, got shape ", x_in.sizes());
  const int64_t C = num_features;
  Tensor buf = at::zeros({2 + 2 * C}, x_in.options().dtype(at::kDouble));
  const int64_t count = x_in.numel() / C;
  if (count == 0) return buf;
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  double* out = buf.data_ptr<double>();
  double* s1 = out + 2;
  double* s2 = out + 2 + C;
  out[0] = static_cast<double>(count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_batch_stats", [&] {
    channel_moments<scalar_t>(x, g, nullptr, s1, s2);
    const double n = static_cast<double>(count);
    std::vector<double> shift(C, 0.0);
    bool shifted = false;
    for (int64_t c = 0; c < C; ++c) {
      const double mean = s1[c] / n, var = s2[c] / n - mean * mean;
      if (mean * mean > kShiftAbove * std::max(var, 0.0)) shifted = true;
      shift[c] = mean;
    }
    if (!shifted) return;
    // the shift rounded to the accumulation type, so that x - shift is computed as it is rebuilt below
    using A = at::opmath_type<scalar_t>;
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(static_cast<A>(shift[c]));
    std::vector<double> t1(C), t2(C);
    channel_moments<scalar_t>(x, g, shift.data(), t1.data(), t2.data());
    for (int64_t c = 0; c < C; ++c) {  // back to raw sums: sum x = t1 + n k, sum x^2 = t2 + k (2 t1 + n k)
      const double k = shift[c];
      s1[c] = t1[c] + n * k;
      s2[c] = t2[c] + k * (2.0 * t1[c] + n * k);
    }
  });
  return buf;
}

Tensor normalize(const Tensor& x_in, const Tensor& coef) {
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  Tensor y = at::empty_like(x, memory_format(x));
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_normalize", [&] {
    using A = at::opmath_type<scalar_t>;
    const std::vector<A> k = row_of<A>(coef, 0, g.C), s = row_of<A>(coef, 1, g.C), h = row_of<A>(coef, 2, g.C);
    const scalar_t* __restrict__ p = x.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ q = y.data_ptr<scalar_t>();
    const A* __restrict__ kp = k.data();
    const A* __restrict__ sp = s.data();
    const A* __restrict__ hp = h.data();
    const int64_t C = g.C;
    for_each_run(
        g,
        [&](int64_t c, int64_t begin, int64_t end) {
          const A kc = kp[c], sc = sp[c], hc = hp[c];
          for (int64_t i = begin; i < end; ++i) q[i] = static_cast<scalar_t>((static_cast<A>(p[i]) - kc) * sc + hc);
        },
        [&](int64_t begin) {
          for (int64_t c = 0; c < C; ++c)
            q[begin + c] = static_cast<scalar_t>((static_cast<A>(p[begin + c]) - kp[c]) * sp[c] + hp[c]);
        });
  });
  return y;
}

Tensor backward_stats(const Tensor& dy_in, const Tensor& x_in, const Tensor& center) {
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  const int64_t C = g.C;
  Tensor out = at::zeros({2, C}, x.options().dtype(at::kDouble));
  if (x.numel() == 0) return out;
  const Tensor dy = like_input(dy_in, x);
  double* s1 = out.data_ptr<double>();
  double* s2 = s1 + C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_backward_stats", [&] {
    using A = at::opmath_type<scalar_t>;
    const std::vector<A> k = row_of<A>(center.view({1, -1}), 0, C);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = dy.const_data_ptr<scalar_t>();
    const int64_t N = g.N, S = g.S;
    if (g.layout == Layout::kChannelsFirst) {
      at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(N * S, 1)), [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c)
          for (int64_t n = 0; n < N; ++n) {
            const int64_t off = (n * C + c) * S;
            dot_run<scalar_t, A>(pg + off, px + off, S, k[c], s1[c], s2[c]);
          }
      });
    } else {
      channels_last_reduce<A>(N * S, C, s1, s2, [&](int64_t r, A* a, A* b) {
        const scalar_t* xr = px + r * C;
        const scalar_t* gr = pg + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const A gv = static_cast<A>(gr[c]);
          a[c] += gv;
          b[c] += gv * (static_cast<A>(xr[c]) - k[c]);
        }
      });
    }
  });
  return out;
}

Tensor backward_input(const Tensor& dy_in, const Tensor& x_in, const Tensor& coef) {
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  Tensor dx = at::empty_like(x, memory_format(x));
  if (x.numel() == 0) return dx;
  const Tensor dy = like_input(dy_in, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_backward_input", [&] {
    using A = at::opmath_type<scalar_t>;
    const int64_t C = g.C;
    const std::vector<A> k = row_of<A>(coef, 0, C), a = row_of<A>(coef, 1, C), b = row_of<A>(coef, 2, C),
                         cc = row_of<A>(coef, 3, C);
    const scalar_t* __restrict__ px = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ pdy = dy.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ q = dx.data_ptr<scalar_t>();
    const A* __restrict__ kp = k.data();
    const A* __restrict__ ap = a.data();
    const A* __restrict__ bp = b.data();
    const A* __restrict__ cp = cc.data();
    for_each_run(
        g,
        [&](int64_t c, int64_t begin, int64_t end) {
          const A kc = kp[c], ac = ap[c], bc = bp[c], c0 = cp[c];
          for (int64_t i = begin; i < end; ++i)
            q[i] = static_cast<scalar_t>(static_cast<A>(pdy[i]) * ac + (static_cast<A>(px[i]) - kc) * bc + c0);
        },
        [&](int64_t begin) {
          for (int64_t c = 0; c < C; ++c)
            q[begin + c] = static_cast<scalar_t>(static_cast<A>(pdy[begin + c]) * ap[c] +
                                                 (static_cast<A>(px[begin + c]) - kp[c]) * bp[c] + cp[c]);
        });
  });
  return dx;
}

}  // namespace

// The kernels as operators of their own namespace; syncnorm/ops.py's custom ops call them for CPU tensors.
TORCH_LIBRARY(syncnorm_cpu, m) {
  m.def("batch_stats(Tensor x, int num_features) -> Tensor");
  m.def("normalize(Tensor x, Tensor coef) -> Tensor");
  m.def("backward_stats(Tensor dy, Tensor x, Tensor center) -> Tensor");
  m.def("backward_input(Tensor dy, Tensor x, Tensor coef) -> Tensor");
}

TORCH_LIBRARY_IMPL(syncnorm_cpu, CPU, m) {
  m.impl("batch_stats", &batch_stats);
  m.impl("normalize", &normalize);
  m.impl("backward_stats", &backward_stats);
  m.impl("backward_input", &backward_input);
}

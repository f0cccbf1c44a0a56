// syncnorm's CPU kernels: the synchronising BatchNorm path as four fused passes over the data.
//
// The Python path in syncnorm/stats.py and syncnorm/functional.py is the reference and stays in use on other
// devices (and on CPU when this extension is unavailable). It computes the same quantities with ATen operations:
// about sixty of them per layer per forward + backward, each paying dispatch and allocation, and five to six
// memory passes. Here one training step of one layer is
//
//   forward   local_pack    one read of x: per-channel sum and sum of squares  -> fp64 [n, 0, S1, S2]
//             (all-reduce of that vector: all_reduce_packed)
//             finish        O(C): mean, M2, count, error flag, max |mean| / std
//             forward_apply O(C) + one read of x, one write of y: y = ((x - c0) - m1) * scale + shift'
//   backward  backward_reduce  one read of x and dy: per-channel sum dy, sum dy * x_hat -> [S_dy, S_dyx]
//             (all-reduce: all_reduce_packed)
//             backward_dx      one read of x and dy, one write of dx
//
// Sums are taken in the input's accumulation type (float for float/half/bfloat16, double for double) in SIMD lanes
// over blocks of at most 4096 values, and each block's total is added in double, so a channel of millions of
// values keeps fp32-level relative accuracy. As in stats.local_sums, a channel whose mean is large against its
// spread (mean^2 > 100 var) is summed again around its local mean, and the input is normalised around the
// fp32-rounded global mean c0 (an exact subtraction) when max |mean| / std > 64, so nothing cancels.
//
// Layouts: contiguous (N, C, *) and channels_last / channels_last_3d (and (N, C) 2-d input, which is (N, 1, C)).
// Anything else is made contiguous first. Nothing here touches torch.distributed.
//
// One call per training forward: train_step (SyncBatchNorm, BatchRenorm), window_step (CrossMiniBatchNorm) and
// cbn_step (CrossIterationBatchNorm: also the conv's weight-gradient statistics, the compensated history and its
// record), each issuing its one forward all-reduce. The all-reduces go over the same-host shared-memory channel
// directly when the group has one and the vector fits its slot, and otherwise through the Python reducer
// (syncnorm._ext._reduce -> syncnorm.comm.all_reduce_sum); see all_reduce_packed.

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <type_traits>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

constexpr int64_t kBlock = 4096;       // values per lane block before its total is added in double
constexpr double kShiftAbove = 100.0;  // = stats._SHIFT_ABOVE
constexpr double kCenterAbove = 64.0;  // = functional._CENTER_ABOVE

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
  return {Layout::kChannelsLast, N, C, S};  // the caller made sure x is channels_last(_3d) contiguous
}

// x itself when it is contiguous in a supported layout, else a contiguous copy.
Tensor supported(const Tensor& x) {
  if (x.is_contiguous()) return x;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return x;
  return x.contiguous();
}

at::MemoryFormat memory_format(const Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Explicit SIMD through GCC/Clang vector extensions (32-byte vectors: one AVX register, or two SSE registers when
// the CPU has no AVX). Reductions need it: without -ffast-math the compiler does not reassociate a scalar sum.
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

// s1 += sum(p - k), s2 += sum((p - k)^2) over n contiguous values (each block of kBlock values summed in A).
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

// s1 += sum(dy), s2 += sum(dy * ((x - c0) - m1)) over n contiguous values.
template <typename T, typename A>
inline void dot_run(const T* dy, const T* x, int64_t n, A c0, A m1, double& s1, double& s2) {
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
        b0 += g0 * ((load<V>(x + i) - c0) - m1);
        b1 += g1 * ((load<V>(x + i + W) - c0) - m1);
      }
      s1 += hsum<A>(a0 + a1);
      s2 += hsum<A>(b0 + b1);
    }
    for (; i < end; ++i) {
      const A g = static_cast<A>(dy[i]);
      ta += g;
      tb += g * ((static_cast<A>(x[i]) - c0) - m1);
    }
    s1 += ta;
    s2 += tb;
  }
}

// Per-channel reduction of a channels-last (R rows of C) pair of streams: f(row_ptr_offset, lanes...) is
// accumulated in A over blocks of rows, each block added in double into out1/out2. Threads split the rows.
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
    if (k) for (int64_t c = 0; c < C; ++c) kk[c] = static_cast<A>(k[c]);
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

Tensor f64(int64_t n, const Tensor& like) { return at::empty({n}, like.options().dtype(at::kDouble)); }

// An fp64 vector of n zeros, and an fp64 0-d tensor holding v, without at::zeros / at::full (each of those is a
// fill through TensorIterator, which costs more than the rest of a small layer's statistics).
Tensor f64_zeros(int64_t n, const Tensor& like) {
  Tensor t = f64(n, like);
  std::fill_n(t.data_ptr<double>(), n, 0.0);
  return t;
}
Tensor f64_scalar(double v, const Tensor& like) {
  Tensor t = at::empty({}, like.options().dtype(at::kDouble));
  *t.data_ptr<double>() = v;
  return t;
}

// In-place `t += 1` on a 0-d / one-element counter buffer: a direct write (and a version bump, as add_ does) when
// it is a contiguous int64 CPU tensor, add_ otherwise.
void increment(const Tensor& t) {
  if (t.scalar_type() == at::kLong && t.numel() == 1 && t.is_contiguous() && t.is_cpu()) {
    ++*t.data_ptr<int64_t>();
    t.unsafeGetTensorImpl()->bump_version();
  } else {
    at::NoGradGuard no_grad;
    t.add_(1);
  }
}

// The value of a one-element buffer as a double: read directly from a contiguous int64 / fp64 CPU tensor, through
// item() otherwise.
double scalar_value(const Tensor& t) {
  if (t.numel() == 1 && t.is_cpu() && t.is_contiguous()) {
    if (t.scalar_type() == at::kLong) return static_cast<double>(*t.const_data_ptr<int64_t>());
    if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  }
  return t.item<double>();
}

// The C values of an optional per-channel tensor as doubles (empty when absent), without a tensor allocation.
std::vector<double> as_doubles(const c10::optional<Tensor>& t, int64_t C) {
  std::vector<double> out;
  if (!t.has_value() || !t->defined()) return out;
  TORCH_CHECK(t->numel() == C, "expected ", C, " per-channel values, got ", t->numel());
  const Tensor v = t->is_contiguous() ? *t : t->contiguous();
  out.resize(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "syncnorm_as_doubles", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<double>(p[c]);
  });
  return out;
}

}  // namespace

// = stats.local_sums + stats._pack on CPU (no error, no payload): the fp64 vector [count, 0, sum x, sum x^2]
// this rank contributes to the forward all-reduce. Channels with mean^2 > 100 var are summed around their mean.
Tensor local_pack(const Tensor& x_in, int64_t num_features) {
  Tensor buf = f64_zeros(2 + 2 * num_features, x_in);
  const int64_t C = x_in.size(1);
  const int64_t count = C ? x_in.numel() / C : 0;
  if (count == 0) return buf;
  TORCH_CHECK(C == num_features, "local_pack: expected ", num_features, " channels, got ", C);
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  double* out = buf.data_ptr<double>();
  double* s1 = out + 2;
  double* s2 = out + 2 + C;
  out[0] = static_cast<double>(count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_local_pack", [&] {
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
    // round the shift to the accumulation type, so x - shift is computed exactly as it is rebuilt below
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

// = stats.Moments.merge (Chan et al.): exact moments of the union of two sets, all fp64; counts are 0-d.
std::tuple<Tensor, Tensor, Tensor> merge_moments(const Tensor& n1, const Tensor& mean1, const Tensor& m2_1,
                                                 const Tensor& n2, const Tensor& mean2, const Tensor& m2_2) {
  const int64_t C = mean1.numel();
  TORCH_CHECK(mean2.numel() == C && m2_1.numel() == C && m2_2.numel() == C, "merge_moments: expected ", C,
              " channels on both sides, got ", mean2.numel());
  const double a = n1.item<double>(), b = n2.item<double>(), n = a + b;
  const double safe = n > 0 ? n : 1.0;
  Tensor mean = f64(C, mean1), m2 = f64(C, mean1);
  const Tensor u1 = mean1.contiguous(), v1 = m2_1.contiguous(), u2 = mean2.contiguous(), v2 = m2_2.contiguous();
  const double *pu1 = u1.const_data_ptr<double>(), *pv1 = v1.const_data_ptr<double>();
  const double *pu2 = u2.const_data_ptr<double>(), *pv2 = v2.const_data_ptr<double>();
  double *pm = mean.data_ptr<double>(), *pq = m2.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double delta = pu2[c] - pu1[c];
    pm[c] = pu1[c] + delta * (b / safe);
    pq[c] = pv1[c] + pv2[c] + delta * delta * (a * b / safe);
  }
  return {f64_scalar(n, mean1), mean, m2};
}

// = the tail of stats.global_moments: from the summed vector to (n, mean, M2) in fp64 and the host-side
// (count, error flag, max |mean| / sqrt(var + eps)) that decide what every rank does next.
std::tuple<Tensor, Tensor, Tensor, double, double, double> finish(const Tensor& buf, int64_t C, double eps) {
  TORCH_CHECK(buf.scalar_type() == at::kDouble && buf.is_contiguous() && buf.numel() >= 2 + 2 * C,
              "finish: expected a contiguous fp64 vector of at least 2C + 2 values");
  const double* b = buf.const_data_ptr<double>();
  Tensor n = f64_scalar(b[0], buf);
  Tensor mean = f64(C, buf), m2 = f64(C, buf);
  double* pm = mean.data_ptr<double>();
  double* pq = m2.data_ptr<double>();
  const double safe_n = std::max(b[0], 1.0);
  double ratio = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double s1 = b[2 + c];
    pm[c] = s1 / safe_n;
    pq[c] = std::max(b[2 + C + c] - pm[c] * s1, 0.0);
    ratio = std::max(ratio, pm[c] * pm[c] / (pq[c] / safe_n + eps));
  }
  return {n, mean, m2, b[0], b[1], std::sqrt(ratio)};
}

// The training forward after the statistics: y = ((x - c0) - m1) * scale + shift per channel, with
// mean = c0 + m1 the normalising mean (c0 = its fp32 rounding when `center`, else 0), var = m2 / total,
// invstd = 1 / sqrt(var + eps), and for Batch Renorm (running statistics given)
//   r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1/r_max, r_max),
//   d = clip((mean - running_mean) / sqrt(running_var + eps), -d_max, d_max),
//   scale = w * r * invstd, shift = b + w * d   (w = 1, b = 0 when absent),
// else r = 1, d = 0. Returns y (x's dtype and memory format) and the fp64 (6, C) per-channel parameters
// [c0, m1, invstd, w_eff = w * r, r, d] the backward needs.
enum Param : int64_t { kC0 = 0, kM1, kInvstd, kWeff, kR, kD, kParams };

std::tuple<Tensor, Tensor> forward_apply(
    const Tensor& x_in, const Tensor& mean64, const Tensor& m2_64, int64_t total, bool center,
    const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, double eps,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var, double r_max,
    double d_max) {
  const int64_t C = mean64.numel();
  const bool renorm = running_mean.has_value();
  const bool fp64 = x_in.scalar_type() == at::kDouble;
  Tensor params = at::empty({kParams, C}, mean64.options());
  double* pp = params.data_ptr<double>();
  const std::vector<double> wd = as_doubles(weight, C), bd = as_doubles(bias, C);
  const std::vector<double> rmd = as_doubles(running_mean, C), rvd = as_doubles(running_var, C);
  std::vector<double> scale(C), shift(C);
  const double* pmean = mean64.const_data_ptr<double>();
  const double* pm2 = m2_64.const_data_ptr<double>();
  const double denom = static_cast<double>(std::max<int64_t>(total, 1));
  double* pc0 = pp + kC0 * C;
  for (int64_t c = 0; c < C; ++c) {
    // the statistics as the Python path normalises with them: rounded to the accumulation type
    const double mean = pmean[c];
    const double k = center ? (fp64 ? mean : static_cast<double>(static_cast<float>(mean))) : 0.0;
    const double m = fp64 ? mean - k : static_cast<double>(static_cast<float>(mean - k));
    const double var = fp64 ? pm2[c] / denom : static_cast<double>(static_cast<float>(pm2[c] / denom));
    const double inv = 1.0 / std::sqrt(var + eps);
    const double w = wd.empty() ? 1.0 : wd[c];
    const double b = bd.empty() ? 0.0 : bd[c];
    double rc = 1.0, dc = 0.0;
    if (renorm) {
      const double inv_sigma = 1.0 / std::sqrt(rvd[c] + eps);
      rc = std::clamp(std::sqrt(var + eps) * inv_sigma, 1.0 / r_max, r_max);
      dc = std::clamp((k + m - rmd[c]) * inv_sigma, -d_max, d_max);
    }
    const double we = renorm ? w * rc : w, sh = renorm ? b + w * dc : b;
    pp[kC0 * C + c] = k;
    pp[kM1 * C + c] = m;
    pp[kInvstd * C + c] = inv;
    pp[kWeff * C + c] = we;
    pp[kR * C + c] = rc;
    pp[kD * C + c] = dc;
    scale[c] = we * inv;
    shift[c] = sh - m * scale[c];  // y = (x - c0) * scale + shift
  }
  const Tensor x = supported(x_in);
  const Geometry g = geometry(x);
  Tensor y = at::empty_like(x, memory_format(x));
  if (x.numel() == 0) return {y, params};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_forward_apply", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    scalar_t* q = y.data_ptr<scalar_t>();
    std::vector<A> ka(C), sa(C), ha(C);
    for (int64_t c = 0; c < C; ++c) {
      ka[c] = static_cast<A>(pc0[c]);
      sa[c] = static_cast<A>(scale[c]);
      ha[c] = static_cast<A>(shift[c]);
    }
    const int64_t N = g.N, S = g.S;
    if (g.layout == Layout::kChannelsFirst) {
      at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row) {
          const int64_t c = row % C;
          const A k = ka[c], s = sa[c], h = ha[c];
          const scalar_t* src = p + row * S;
          scalar_t* dst = q + row * S;
          for (int64_t i = 0; i < S; ++i) dst[i] = static_cast<scalar_t>((static_cast<A>(src[i]) - k) * s + h);
        }
      });
    } else {
      at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row) {
          const scalar_t* src = p + row * C;
          scalar_t* dst = q + row * C;
          for (int64_t c = 0; c < C; ++c)
            dst[c] = static_cast<scalar_t>((static_cast<A>(src[c]) - ka[c]) * sa[c] + ha[c]);
        }
      });
    }
  });
  return {y, params};
}

// = functional.update_running_stats, in place (the caller skips a global count of 0): running_mean and
// running_var move toward the batch mean and the unbiased variance m2 / (count - 1) by `momentum`, or by
// 1 / num_batches_tracked (after its increment) when `cumulative`.
void update_running(const Tensor& running_mean, const Tensor& running_var,
                    const c10::optional<Tensor>& num_batches_tracked, const Tensor& mean64, const Tensor& m2_64,
                    int64_t global_count, double momentum, bool cumulative) {
  at::NoGradGuard no_grad;
  const bool nbt = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (nbt) increment(*num_batches_tracked);
  double factor = momentum;
  if (cumulative) factor = nbt ? 1.0 / scalar_value(*num_batches_tracked) : 0.0;
  const double denom = static_cast<double>(std::max<int64_t>(global_count - 1, 1));
  const int64_t C = mean64.numel();
  const double* pm = mean64.const_data_ptr<double>();
  const double* pq = m2_64.const_data_ptr<double>();
  auto lerp = [factor](double a, double b) {  // torch.lerp's formula
    return factor < 0.5 ? a + factor * (b - a) : b - (b - a) * (1.0 - factor);
  };
  auto move = [&](const Tensor& buf, bool var) {
    if (!buf.is_contiguous() || buf.numel() != C) {  // unusual buffers: the ATen ops
      Tensor target = var ? m2_64 / denom : mean64;
      buf.lerp_(target.to(buf.scalar_type()), factor);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "syncnorm_update_running", [&] {
      scalar_t* q = buf.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        const double target = static_cast<double>(static_cast<scalar_t>(var ? pq[c] / denom : pm[c]));
        q[c] = static_cast<scalar_t>(lerp(static_cast<double>(q[c]), target));
      }
    });
  };
  move(running_mean, false);
  move(running_var, true);
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

// The backward of the normalisation, given the forward's parameters (see forward_apply):
//   1. local sums per channel, in fp64: sum dy and sum dy * x_hat, x_hat = ((x - c0) - m1) * invstd;
//   2. the collective: [sum dy, sum dy * x_hat] packed in the accumulation dtype (fp32, or fp64 for fp64 input;
//      2C values, as on the Python path) and summed over the group by `reduce` (skipped when it is empty);
//   3. dx = scale * (dy - g_dy / total - x_hat * g_dy_xhat / total), scale = w_eff * invstd (when needs_dx);
//   4. the local weight and bias gradients sum dy * x_hat * r + sum dy * d and sum dy, in their dtypes.
// Returns (dx, dw, db), undefined where not needed.
template <typename Reduce>
std::tuple<Tensor, Tensor, Tensor> backward_all(const Tensor& grad_out, const Tensor& x_in, const Tensor& params,
                                                int64_t total, bool needs_dx, int64_t w_dtype, int64_t b_dtype,
                                                const Reduce& reduce) {
  const Tensor x = supported(x_in);
  const int64_t C = params.size(1);
  const double* pp = params.const_data_ptr<double>();
  const double *pc0 = pp + kC0 * C, *pm1 = pp + kM1 * C, *pinv = pp + kInvstd * C, *pw = pp + kWeff * C;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<double> sums(2 * C, 0.0);
  double* s1 = sums.data();
  double* s2 = s1 + C;
  Tensor dy;
  const Geometry g = geometry(x);
  if (x.numel() > 0) {
    const Tensor grad = grad_out.defined() ? grad_out : at::zeros_like(x);
    dy = (grad.scalar_type() == x.scalar_type() ? grad : grad.to(x.scalar_type())).contiguous(memory_format(x));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_backward_reduce", [&] {
      using A = at::opmath_type<scalar_t>;
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      const scalar_t* pg = dy.const_data_ptr<scalar_t>();
      const int64_t N = g.N, S = g.S;
      if (g.layout == Layout::kChannelsFirst) {
        at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(N * S, 1)), [&](int64_t b, int64_t e) {
          for (int64_t c = b; c < e; ++c) {
            const A k = static_cast<A>(pc0[c]), m = static_cast<A>(pm1[c]);
            for (int64_t n = 0; n < N; ++n) {
              const int64_t off = (n * C + c) * S;
              dot_run<scalar_t, A>(pg + off, px + off, S, k, m, s1[c], s2[c]);
            }
          }
        });
      } else {
        std::vector<A> k(C), m(C);
        for (int64_t c = 0; c < C; ++c) {
          k[c] = static_cast<A>(pc0[c]);
          m[c] = static_cast<A>(pm1[c]);
        }
        channels_last_reduce<A>(N * S, C, s1, s2, [&](int64_t r, A* a, A* b) {
          const scalar_t* xr = px + r * C;
          const scalar_t* gr = pg + r * C;
          for (int64_t c = 0; c < C; ++c) {
            const A gv = static_cast<A>(gr[c]);
            a[c] += gv;
            b[c] += gv * ((static_cast<A>(xr[c]) - k[c]) - m[c]);
          }
        });
      }
    });
    for (int64_t c = 0; c < C; ++c) s2[c] *= pinv[c];
  }
  Tensor dx, dw, db;
  if (needs_dx) {
    Tensor packed = at::empty({2 * C}, params.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "syncnorm_pack", [&] {
      scalar_t* q = packed.data_ptr<scalar_t>();
      for (int64_t i = 0; i < 2 * C; ++i) q[i] = static_cast<scalar_t>(sums[i]);
    });
    reduce(packed);
    std::vector<double> glob(2 * C);
    AT_DISPATCH_FLOATING_TYPES(acc, "syncnorm_unpack", [&] {
      const scalar_t* q = packed.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < 2 * C; ++i) glob[i] = static_cast<double>(q[i]);
    });
    dx = at::empty_like(x, memory_format(x));
    if (x.numel() > 0) {
      const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(total, 1));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "syncnorm_backward_dx", [&] {
        using A = at::opmath_type<scalar_t>;
        // dx = dy * a1 + ((x - c0) - m1) * a2 + a3
        std::vector<A> a1(C), a2(C), a3(C), k(C), m(C);
        for (int64_t c = 0; c < C; ++c) {
          const double scale = pw[c] * pinv[c];
          a1[c] = static_cast<A>(scale);
          a2[c] = static_cast<A>(-scale * pinv[c] * glob[C + c] * inv_n);
          a3[c] = static_cast<A>(-scale * glob[c] * inv_n);
          k[c] = static_cast<A>(pc0[c]);
          m[c] = static_cast<A>(pm1[c]);
        }
        const scalar_t* px = x.const_data_ptr<scalar_t>();
        const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
        scalar_t* q = dx.data_ptr<scalar_t>();
        const int64_t N = g.N, S = g.S;
        if (g.layout == Layout::kChannelsFirst) {
          at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t b, int64_t e) {
            for (int64_t row = b; row < e; ++row) {
              const int64_t c = row % C;
              const A b1 = a1[c], b2 = a2[c], b3 = a3[c], kc = k[c], mc = m[c];
              const int64_t off = row * S;
              for (int64_t i = 0; i < S; ++i)
                q[off + i] = static_cast<scalar_t>(static_cast<A>(pdy[off + i]) * b1 +
                                                   ((static_cast<A>(px[off + i]) - kc) - mc) * b2 + b3);
            }
          });
        } else {
          at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
            for (int64_t row = b; row < e; ++row) {
              const int64_t off = row * C;
              for (int64_t c = 0; c < C; ++c)
                q[off + c] = static_cast<scalar_t>(static_cast<A>(pdy[off + c]) * a1[c] +
                                                   ((static_cast<A>(px[off + c]) - k[c]) - m[c]) * a2[c] + a3[c]);
            }
          });
        }
      });
    }
  }
  const double *pr = pp + kR * C, *pd = pp + kD * C;
  auto fill = [&](int64_t dtype, bool weight_grad) {
    Tensor out = at::empty({C}, params.options().dtype(static_cast<at::ScalarType>(dtype)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "syncnorm_affine_grads", [&] {
      scalar_t* q = out.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        q[c] = static_cast<scalar_t>(weight_grad ? s2[c] * pr[c] + s1[c] * pd[c] : s1[c]);
    });
    return out;
  };
  if (w_dtype >= 0) dw = fill(w_dtype, true);
  if (b_dtype >= 0) db = fill(b_dtype, false);
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------------------- autograd node
//
// fused_norm is one C++ autograd node for the normalisation: forward = forward_apply, backward = backward_reduce,
// the backward all-reduce (all_reduce_packed: the shared-memory channel, or the Python reducer, so that
// syncnorm.comm stays the only caller of torch.distributed), then backward_dx and the local weight/bias
// gradients. The statistics are computed before it (local_pack, the forward all-reduce, finish) and enter as
// constants: the backward formula already contains their dependence on x.

namespace {

py::object* g_reducer = nullptr;  // never destroyed: it must outlive the interpreter's teardown

}  // namespace

// A direct route (see "same-host shared-memory all-reduce" below): all-reduces t over the channel `handle` and
// returns true, or returns false, with nothing exchanged, when t cannot go through its slot.
bool direct_all_reduce(const Tensor& t, int64_t handle);

namespace {

// Reducer keys: -1 is a group of one rank (no collective); a key with this bit set names a same-host channel
// (handle = key without the bit), which the kernels use directly for any vector that fits its slot; any other
// key, and a vector that does not fit, goes through the Python reducer (syncnorm._ext._reduce ->
// syncnorm.comm.all_reduce_sum). Both ways draw the channel's rounds from the same counter.
constexpr int64_t kDirectKey = int64_t(1) << 62;

// The all-reduce of a packed statistics vector, in place, under reducer key `key`. Callable with or without the
// GIL (the autograd engine runs the backward without it): the direct route waits without it, the Python reducer
// takes it. The key, and so the route, is fixed when the layer's forward runs (reducer_key).
void all_reduce_packed(const Tensor& t, int64_t key) {
  if (key < 0) return;
  if ((key & kDirectKey) && direct_all_reduce(t, key & ~kDirectKey)) return;
  py::gil_scoped_acquire gil;
  TORCH_CHECK(g_reducer != nullptr, "syncnorm: no reducer registered");
  (*g_reducer)(t, key);
}

// Every Tensor argument of an autograd node must be defined: an absent weight or bias travels as an empty tensor.
Tensor or_empty(const c10::optional<Tensor>& t, const Tensor& like) {
  return t.has_value() && t->defined() ? *t : at::empty({0}, like.options());
}
c10::optional<Tensor> nonempty_or_none(const Tensor& t) {
  return t.numel() ? c10::optional<Tensor>(t) : c10::nullopt;
}

struct FusedNorm : public torch::autograd::Function<FusedNorm> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, Tensor x, Tensor weight,
                                                Tensor bias, Tensor mean64, Tensor m2_64, int64_t total,
                                                bool center, double eps, c10::optional<Tensor> running_mean,
                                                c10::optional<Tensor> running_var, double r_max, double d_max,
                                                int64_t reducer) {
    auto [y, params] = forward_apply(x, mean64, m2_64, total, center, nonempty_or_none(weight),
                                     nonempty_or_none(bias), eps, running_mean, running_var, r_max, d_max);
    ctx->save_for_backward({x, params});
    ctx->set_materialize_grads(false);  // no zero-filled grad for the non-differentiable params output
    ctx->saved_data["total"] = total;
    ctx->saved_data["reducer"] = reducer;
    ctx->saved_data["w_dtype"] = weight.numel() ? static_cast<int64_t>(weight.scalar_type()) : int64_t(-1);
    ctx->saved_data["b_dtype"] = bias.numel() ? static_cast<int64_t>(bias.scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({params});
    return {y, params};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t reducer = ctx->saved_data["reducer"].toInt();
    auto reduce = [reducer](const Tensor& packed) { all_reduce_packed(packed, reducer); };
    const int64_t w_dtype = ctx->needs_input_grad(1) ? ctx->saved_data["w_dtype"].toInt() : int64_t(-1);
    const int64_t b_dtype = ctx->needs_input_grad(2) ? ctx->saved_data["b_dtype"].toInt() : int64_t(-1);
    auto [dx, dw, db] = backward_all(grads[0], saved[0], saved[1], ctx->saved_data["total"].toInt(),
                                     ctx->needs_input_grad(0), w_dtype, b_dtype, reduce);
    if (at::GradMode::is_enabled()) {
      // backward(create_graph=True): these gradients are computed from raw data and carry no graph, so a second
      // differentiation through them would silently drop this layer's terms. As torch's @once_differentiable does,
      // give them a node that raises if anything differentiates through it.
      torch::autograd::variable_list outs{dx, dw, db};
      for (auto& v : outs) {
        if (v.defined()) {
          v = v.detach();
          v.set_requires_grad(true);
        }
      }
      outs = torch::autograd::DelayedError(
                 "syncnorm: double backward through a syncnorm normalisation layer is not supported (its backward "
                 "is computed outside autograd); gradients of gradients, e.g. a gradient penalty with "
                 "create_graph=True, cannot flow through SyncBatchNorm, BatchRenorm, CrossIterationBatchNorm or "
                 "CrossMiniBatchNorm",
                 3)
                 .apply(std::move(outs));
      dx = outs[0];
      dw = outs[1];
      db = outs[2];
    }
    return {dx, dw, db, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

}  // namespace

// Returns y and the (6, C) fp64 parameters [c0, m1, invstd, w_eff, r, d] (see forward_apply).
std::tuple<Tensor, Tensor> fused_norm(const Tensor& x, const c10::optional<Tensor>& weight,
                                      const c10::optional<Tensor>& bias, const Tensor& mean64, const Tensor& m2_64,
                                      int64_t total, bool center, double eps,
                                      const c10::optional<Tensor>& running_mean,
                                      const c10::optional<Tensor>& running_var, double r_max, double d_max,
                                      int64_t reducer) {
  auto out = FusedNorm::apply(x, or_empty(weight, mean64), or_empty(bias, mean64), mean64, m2_64, total, center,
                              eps, running_mean, running_var, r_max, d_max, reducer);
  return {out[0], out[1]};
}

// The forward all-reduce of the packed statistics vector, in place (see all_reduce_packed); reducer < 0 (a group
// of one rank): none.
void forward_all_reduce(const Tensor& buf, int64_t reducer) { all_reduce_packed(buf, reducer); }

// Row i of a contiguous 2-d tensor: a 1-d tensor on the same storage, sharing its version counter (so an in-place
// change is still caught by autograd's saved-tensor check, as for a view), made without the dispatcher: select's
// view bookkeeping costs about a microsecond per call, a measurable share of a small layer.
namespace {
Tensor row_alias(const Tensor& t, int64_t i) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
  const int64_t size[1] = {t.size(1)}, stride[1] = {1};
  impl->set_sizes_and_strides(c10::IntArrayRef(size, 1), c10::IntArrayRef(stride, 1),
                              c10::optional<int64_t>(t.storage_offset() + i * t.size(1)));
  impl->set_version_counter(t.unsafeGetTensorImpl()->version_counter());
  return Tensor(std::move(impl));
}
}  // namespace

// One training forward of a layer without prior moments or payload (SyncBatchNorm, BatchRenorm), in one call:
// local_pack, the forward all-reduce (all_reduce_packed; reducer < 0: none), finish, then, unless a peer
// flagged an error (status 1) or the group holds exactly one value per channel (status 2), the fused_norm node and
// the running-statistics update (when running_mean is given and the global count is not 0). Batch Renorm's r and d
// compare the batch with renorm_mean / renorm_var (read before the update; none: no renorm).
// Returns (y, (status, n, mean, m2, count, flag, r, d)): r, d the fp64 Batch-Renorm factors (undefined without
// renorm); y, r, d are undefined when status != 0. The inner tuple holds no reference to y, so a layer can keep
// it (its NormInfo, built on demand) without keeping its output alive.
std::tuple<Tensor, std::tuple<int64_t, Tensor, Tensor, Tensor, int64_t, double, Tensor, Tensor>> train_step(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t num_features,
    double eps, int64_t reducer, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked, double momentum,
    bool cumulative, const c10::optional<Tensor>& renorm_mean, const c10::optional<Tensor>& renorm_var, double r_max,
    double d_max) {
  const bool renorm = renorm_mean.has_value() && renorm_mean->defined();
  Tensor buf = local_pack(x, num_features);
  forward_all_reduce(buf, reducer);
  auto [n, mean, m2, count_d, flag, ratio] = finish(buf, num_features, eps);
  const int64_t count = static_cast<int64_t>(std::llround(count_d));
  if (flag > 0 || count == 1)
    return {Tensor(), {flag > 0 ? 1 : 2, n, mean, m2, count, flag, Tensor(), Tensor()}};
  auto [y, params] = fused_norm(x, weight, bias, mean, m2, count, ratio > kCenterAbove && x.numel() > 0, eps,
                                renorm ? renorm_mean : c10::nullopt, renorm ? renorm_var : c10::nullopt, r_max,
                                d_max, reducer);
  if (running_mean.has_value() && running_mean->defined() && count > 0)
    update_running(*running_mean, *running_var, num_batches_tracked, mean, m2, count, momentum, cumulative);
  Tensor r, d;
  if (renorm) {
    r = row_alias(params, kR);
    d = row_alias(params, kD);
  }
  return {y, {0, n, mean, m2, count, flag, r, d}};
}

// CrossMiniBatchNorm's training forward in one call: as train_step without renorm, but the batch moments are
// merged with those of the accumulation window so far (window_count / window_mean / window_m2; count 0 at a
// window's start) before normalising, the merged moments are written back into the window buffers and
// window_forwards is incremented. The running statistics still follow the batch moments alone.
// Returns (status, y, n, mean, m2, count, flag, used_n, used_mean, used_m2); status as train_step's, with
// status 2 when the batch and the window together hold exactly one value per channel.
std::tuple<int64_t, Tensor, Tensor, Tensor, Tensor, int64_t, double, Tensor, Tensor, Tensor> window_step(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t num_features,
    double eps, int64_t reducer, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked, double momentum,
    bool cumulative, const Tensor& window_count, const Tensor& window_mean, const Tensor& window_m2,
    const Tensor& window_forwards) {
  Tensor buf = local_pack(x, num_features);
  forward_all_reduce(buf, reducer);
  auto [n, mean, m2, count_d, flag, ratio] = finish(buf, num_features, eps);
  const int64_t count = static_cast<int64_t>(std::llround(count_d));
  if (flag > 0) return {1, Tensor(), n, mean, m2, count, flag, Tensor(), Tensor(), Tensor()};
  const double prior = scalar_value(window_count);
  Tensor un = n, umean = mean, um2 = m2;
  if (prior > 0)
    std::tie(un, umean, um2) = merge_moments(window_count.to(at::kDouble), window_mean.to(at::kDouble),
                                             window_m2.to(at::kDouble), n, mean, m2);
  const int64_t total = count + static_cast<int64_t>(std::llround(prior));
  if (total == 1) return {2, Tensor(), n, mean, m2, count, flag, un, umean, um2};
  auto [y, params] = fused_norm(x, weight, bias, umean, um2, total, ratio > kCenterAbove && x.numel() > 0, eps,
                                c10::nullopt, c10::nullopt, 1.0, 0.0, reducer);
  if (running_mean.has_value() && running_mean->defined() && count > 0)
    update_running(*running_mean, *running_var, num_batches_tracked, mean, m2, count, momentum, cumulative);
  {
    at::NoGradGuard no_grad;
    // the layer's own fp64 buffers directly; ATen copies for any other dtype or layout
    auto store = [](const Tensor& dst, const Tensor& src) {
      if (dst.scalar_type() == at::kDouble && dst.is_contiguous() && dst.is_cpu() && dst.numel() == src.numel() &&
          src.scalar_type() == at::kDouble && src.is_contiguous()) {
        std::copy_n(src.const_data_ptr<double>(), src.numel(), dst.data_ptr<double>());
        dst.unsafeGetTensorImpl()->bump_version();
      } else {
        dst.copy_(src);
      }
    };
    store(window_count, un);
    store(window_mean, umean);
    store(window_m2, um2);
    increment(window_forwards);
  }
  return {0, y, n, mean, m2, count, flag, un, umean, um2};
}

// ----------------------------------------------------------------------------------------------------------------
// CrossIterationBatchNorm (= layers/cross_iteration.py's Python path, which stays the reference)
// ----------------------------------------------------------------------------------------------------------------
namespace {

Tensor doubles(const Tensor& t) {
  return t.scalar_type() == at::kDouble && t.is_contiguous() ? t : t.to(at::kDouble).contiguous();
}

// Element i of a 1-d (or 0-d, i = 0) buffer set to v: in place when it has dtype T and is contiguous (the layer's
// own buffers), through ATen otherwise.
template <typename T>
void set_element(const Tensor& t, int64_t i, T v) {
  if (t.scalar_type() == c10::CppTypeToScalarType<T>::value && t.is_contiguous())
    t.data_ptr<T>()[i] = v;
  else
    (t.dim() ? t.select(0, i) : t).fill_(v);
}

// Four lanes of a float or double array as doubles.
template <typename T>
inline Simd<double>::V lanes64(const T* p) {
  if constexpr (std::is_same_v<T, double>) {
    return load<Simd<double>::V>(p);
  } else {
    typedef float F4 __attribute__((vector_size(16)));
    return __builtin_convertvector(load<F4>(p), Simd<double>::V);
  }
}

// sum_k rows[r][k] * w[k] for the R rows at once, accumulated in double: w is read (and widened) once for all
// of them. R is a compile-time count, so the accumulators stay in registers.
template <int R, typename T, typename U>
inline void dots64(const T* const* rows, const U* w, int64_t n, double* out) {
  using V = Simd<double>::V;
  constexpr int64_t W = Simd<double>::W;
  int64_t i = 0;
  double t[R] = {};
  constexpr bool simd = (std::is_same_v<T, double> || std::is_same_v<T, float>) &&
                        (std::is_same_v<U, double> || std::is_same_v<U, float>);
  if constexpr (simd) {
    V acc[R] = {};
    for (; i + W <= n; i += W) {
      const V wv = lanes64(w + i);
      for (int r = 0; r < R; ++r) acc[r] += lanes64(rows[r] + i) * wv;
    }
    for (int r = 0; r < R; ++r) t[r] = hsum<double>(acc[r]);
  }
  for (; i < n; ++i) {
    const double wi = static_cast<double>(w[i]);
    for (int r = 0; r < R; ++r) t[r] += static_cast<double>(rows[r][i]) * wi;
  }
  for (int r = 0; r < R; ++r) out[r] = t[r];
}

// The compensation's products with the conv's current weights, for `slots` slots of the history starting at
// `first`: mean_out[s][c] = <dmean[first + s, group(c)], W_c> + b_c and var_out[s][c] = <dvar[first + s, c], W_c>
// (fp64 accumulation; (S, G, K) / (S, C, K) derivatives in their dtype, W (C_out, ...) in its own; when the two
// dtypes differ, W is read as doubles). Each channel's weights are read once per two slots (four rows).
void weight_products(const Tensor& dmean, const Tensor& dvar, const Tensor& weight, const std::vector<double>& b,
                     int64_t groups, int64_t first, int64_t slots, double* mean_out, double* var_out) {
  const int64_t C = dvar.size(1), K = dvar.size(2), per = C / groups;
  TORCH_CHECK(first >= 0 && first + slots <= dvar.size(0) && dmean.size(0) == dvar.size(0),
              "CrossIterationBatchNorm: history slots ", first, "..", first + slots, " out of range");
  TORCH_CHECK(dmean.size(1) == groups && dmean.size(2) == K && weight.numel() == C * K,
              "CrossIterationBatchNorm: history derivative buffers of shapes ", dmean.sizes(), " and ", dvar.sizes(),
              " do not match the attached conv (groups ", groups, ", weight of ", weight.numel(), " values)");
  const Tensor dm = dmean.contiguous(), dv = dvar.contiguous().to(dm.scalar_type());
  const Tensor w = weight.scalar_type() == dm.scalar_type() ? weight.contiguous() : doubles(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dm.scalar_type(), "syncnorm_weight_products", [&] {
    const scalar_t* pm = dm.const_data_ptr<scalar_t>();
    const scalar_t* pv = dv.const_data_ptr<scalar_t>();
    auto run = [&](auto* pw) {
      for (int64_t c = 0; c < C; ++c) {
        const auto* wc = pw + c * K;
        const double bc = b.empty() ? 0.0 : b[c];
        for (int64_t s = 0; s < slots; s += 2) {  // rows: mean s, var s (, mean s + 1, var s + 1)
          const int64_t slot = first + s;
          const scalar_t* rows[4] = {pm + (slot * groups + c / per) * K, pv + (slot * C + c) * K, nullptr, nullptr};
          double out[4];
          if (s + 1 < slots) {
            rows[2] = pm + ((slot + 1) * groups + c / per) * K;
            rows[3] = pv + ((slot + 1) * C + c) * K;
            dots64<4>(rows, wc, K, out);
            mean_out[(s + 1) * C + c] = out[2] + bc;
            var_out[(s + 1) * C + c] = out[3];
          } else {
            dots64<2>(rows, wc, K, out);
          }
          mean_out[s * C + c] = out[0] + bc;
          var_out[s * C + c] = out[1];
        }
      }
    };
    if (w.scalar_type() == at::kDouble)
      run(w.const_data_ptr<double>());
    else
      run(w.const_data_ptr<scalar_t>());
  });
}

// Sum over the batch and the output positions of every input patch of a conv (per input channel and kernel tap),
// in fp64. With S the batch-summed input, patch[c, k_1..k_d] = sum over output positions o of
// S[c, o_1 s_1 + k_1 d_1 - p_1, ...] (taps that fall in the zero padding add nothing). The sum is separable, so it
// is taken one spatial dim at a time, from the first (the inner loops then run over the contiguous remaining
// dims): a few passes over S instead of a conv weight-gradient.
Tensor patch_sums(const Tensor& xin, at::IntArrayRef out_size, at::IntArrayRef kernel, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = static_cast<int64_t>(kernel.size());
  const int64_t Cin = xin.size(1);
  // the batch-summed input (C_in, I_1..I_d), summed in xin's dtype (N values per element, as the reference path's
  // conv sums them) in xin's memory order, then widened to fp64
  const int64_t N = xin.size(0), CS = xin.numel() / std::max<int64_t>(N, 1), S = CS / std::max<int64_t>(Cin, 1);
  const bool cl = !xin.is_contiguous() && xin.is_contiguous(memory_format(xin));
  const Tensor src_x = cl || xin.is_contiguous() ? xin : xin.contiguous();
  Tensor cur = N > 0 ? f64(CS, xin) : f64_zeros(CS, xin);
  double* pcur = cur.data_ptr<double>();
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(src_x.scalar_type(), "syncnorm_patch_sums", [&] {
      const scalar_t* p = src_x.const_data_ptr<scalar_t>();
      // in blocks that stay in L1 across the N images; the same sums, in the same order (image 0, 1, ...)
      constexpr int64_t kBlock = 2048;
      std::vector<scalar_t> block(std::min<int64_t>(kBlock, CS));
      std::vector<scalar_t> transposed(cl ? CS : 0);
      for (int64_t j0 = 0; j0 < CS; j0 += kBlock) {
        const int64_t len = std::min<int64_t>(kBlock, CS - j0);
        scalar_t* q = block.data();
        std::copy(p + j0, p + j0 + len, q);
        for (int64_t n = 1; n < N; ++n) {
          const scalar_t* pn = p + n * CS + j0;
          for (int64_t j = 0; j < len; ++j) q[j] += pn[j];
        }
        if (cl) {
          std::copy(q, q + len, transposed.data() + j0);
        } else {
          for (int64_t j = 0; j < len; ++j) pcur[j0 + j] = static_cast<double>(q[j]);
        }
      }
      if (cl) {  // the summed input is (I_1..I_d, C_in)
        const scalar_t* q = transposed.data();
        for (int64_t i = 0; i < S; ++i)
          for (int64_t c = 0; c < Cin; ++c) pcur[c * S + i] = static_cast<double>(q[i * Cin + c]);
      }
    });
  }
  // cur is (outer, I_j, inner) with outer = C_in * k_1..k_{j-1} and inner = I_{j+1}..I_d; it becomes
  // (outer, k_j, inner)
  int64_t outer = Cin;
  for (int64_t j = 0; j < nd; ++j) {
    const int64_t I = xin.size(2 + j), Kj = kernel[j], O = out_size[j];
    const int64_t st = stride[j], dil = dilation[j], pad = padding[j];
    const int64_t inner = cur.numel() / (outer * I);
    Tensor next = f64_zeros(outer * Kj * inner, cur);
    const double* src = cur.const_data_ptr<double>();
    double* dst = next.data_ptr<double>();
    for (int64_t k = 0; k < Kj; ++k) {
      // output positions o whose tap k reads inside the input: 0 <= o * st + k * dil - pad < I
      const int64_t need = pad - k * dil;  // o * st >= need
      const int64_t lo = need > 0 ? (need + st - 1) / st : 0;
      const int64_t top = I - 1 + pad - k * dil;  // o * st <= top
      const int64_t hi = top < 0 ? -1 : std::min(O - 1, top / st);
      if (hi < lo) continue;
      const int64_t i0 = lo * st + k * dil - pad;  // first input position read
      for (int64_t a = 0; a < outer; ++a) {
        double* to = dst + (a * Kj + k) * inner;
        if (inner == 1) {
          const double* from = src + a * I + i0;
          double t = 0;
          for (int64_t o = lo; o <= hi; ++o, from += st) t += *from;
          *to = t;
        } else {
          const double* from = src + (a * I + i0) * inner;
          for (int64_t o = lo; o <= hi; ++o, from += st * inner)
            for (int64_t b = 0; b < inner; ++b) to[b] += from[b];
        }
      }
    }
    cur = next;
    outer *= Kj;
  }
  return cur.view({Cin, outer / Cin});
}

// This rank's weight-gradient statistics of the conv that produced x from conv_input (= _local_grad_sums),
// written as fp64 into out: the sum over the batch and the output positions of each input patch, per conv group
// (G * K values), then per channel c the sum of x_c * patch (C * K values). When some channel's local mean is
// large against its spread (mean^2 > 100 var, from the local sums in `local`), x is shifted by each channel's
// first value k_c (sum (x - k) * patch + k * sum patch) so that the sum keeps its digits. conv_input comes padded
// when the conv pads with a mode other than zeros (or with a string); `padding` is then 0.
void conv_grad_sums(const Tensor& conv_input, const Tensor& x, const Tensor& conv_weight, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, const double* local,
                    double* out) {
  const int64_t C = x.size(1), K = conv_weight.numel() / conv_weight.size(0), nd = x.dim() - 2;
  if (x.numel() == 0) {
    std::fill(out, out + (groups + C) * K, 0.0);
    return;
  }
  at::NoGradGuard no_grad;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor xin = conv_input.detach().to(acc);
  const Tensor y = x.detach().to(acc);
  bool shift = false;
  const double n = local[0];
  for (int64_t c = 0; c < C && !shift; ++c) {
    const double mean = local[2 + c] / n, var = local[2 + C + c] / n - mean * mean;
    shift = mean * mean > kShiftAbove * std::max(var, 0.0);
  }
  Tensor k, yk = y;
  if (shift) {
    k = y.select(0, 0);
    for (int64_t d = 0; d < nd; ++d) k = k.select(1, 0);  // (C,): each channel's first value
    std::vector<int64_t> kshape(x.dim(), 1);
    kshape[1] = C;
    yk = y - k.view(kshape);
  }
  const std::vector<int64_t> zeros(nd, 0);
  const Tensor wlike = conv_weight.scalar_type() == acc ? conv_weight.detach()
                                                        : at::empty({1}, xin.options()).expand(conv_weight.sizes());
  const Tensor cross = std::get<1>(at::convolution_backward(yk, xin, wlike, c10::nullopt, stride, padding, dilation,
                                                            false, zeros, groups, {false, true, false}));
  const Tensor p64 = patch_sums(xin, x.sizes().slice(2), conv_weight.sizes().slice(2), stride, padding, dilation);
  const Tensor cc = cross.contiguous();
  const double* pp = p64.const_data_ptr<double>();
  std::copy(pp, pp + groups * K, out);
  double* cross_out = out + groups * K;
  const Tensor k64 = shift ? k.to(at::kDouble).contiguous() : Tensor();
  const double* pk = shift ? k64.const_data_ptr<double>() : nullptr;
  const int64_t per = C / groups;
  AT_DISPATCH_FLOATING_TYPES(cc.scalar_type(), "syncnorm_conv_grad_sums", [&] {
    const scalar_t* pc = cc.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const double* patch_c = pp + (c / per) * K;
      const double kc = shift ? pk[c] : 0.0;
      for (int64_t j = 0; j < K; ++j) cross_out[c * K + j] = static_cast<double>(pc[c * K + j]) + kc * patch_c[j];
    }
  });
}


}  // namespace

// CrossIterationBatchNorm's training forward in one call (the steps of its Python _train_forward):
//  1. local_pack, plus (when `record` and a conv is given) the conv's weight-gradient statistics as payload;
//  2. the forward all-reduce (all_reduce_packed); finish;
//  3. (use_history, `filled` slots recorded) the pooled history, each slot compensated to the conv's current
//     weights when a conv is given and the slot is compensable, merged with the batch;
//  4. the fused_norm node with the merged moments; the running statistics from the batch moments (count > 0);
//  5. (record, count > 0) the batch's moments, derivatives and their products with this step's weights written
//     into slot history_next, which then advances; history_filled grows to at most the number of slots;
//  6. step += 1.
// Returns (status, y, n, mean, m2, count, flag, used_n, used_mean, used_m2, message) with status 0 (done), 1 (a
// peer flagged an error), 2 (one value per channel in the batch and the history together) or 3 (the weight-gradient
// statistics failed on this rank, `message` says why: the rank still joined the collective, with the error flag set,
// so its peers return status 1 instead of waiting). Nothing is written when status != 0.
std::tuple<int64_t, Tensor, Tensor, Tensor, Tensor, int64_t, double, Tensor, Tensor, Tensor, std::string> cbn_step(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t num_features,
    double eps, int64_t reducer, const c10::optional<Tensor>& running_mean,
    const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& num_batches_tracked, double momentum,
    bool cumulative, const std::vector<Tensor>& history, int64_t filled, bool use_history, bool record,
    const c10::optional<Tensor>& conv_input, const c10::optional<Tensor>& conv_weight,
    const c10::optional<Tensor>& conv_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(history.size() == 11, "cbn_step: expected 11 history buffers");
  const Tensor &h_count = history[0], &h_mean = history[1], &h_var = history[2], &h_mean_at = history[3],
               &h_var_at = history[4], &h_comp = history[5], &h_dmean = history[6], &h_dvar = history[7],
               &h_next = history[8], &h_filled = history[9], &h_step = history[10];
  const int64_t C = num_features, slots = h_count.numel();
  filled = std::clamp<int64_t>(filled, 0, slots);  // a hand-edited checkpoint must not make the loops overrun
  const bool conv = conv_weight.has_value() && conv_weight->defined();
  const int64_t K = conv ? conv_weight->numel() / conv_weight->size(0) : 0;
  const int64_t payload = conv && record ? (groups + C) * K : 0;
  Tensor buf = local_pack(x, C);
  std::string failure;  // why the weight-gradient statistics could not be computed on this rank
  if (payload) {
    Tensor full = at::empty({buf.numel() + payload}, buf.options());
    std::copy(buf.const_data_ptr<double>(), buf.const_data_ptr<double>() + buf.numel(), full.data_ptr<double>());
    try {
      conv_grad_sums(*conv_input, x, *conv_weight, stride, padding, dilation, groups, buf.const_data_ptr<double>(),
                     full.data_ptr<double>() + buf.numel());
    } catch (const c10::Error& e) {
      failure = e.what_without_backtrace();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (!failure.empty()) {  // still join the collective, as an invalid input would: count 0, error flag set
      full.zero_();
      full.data_ptr<double>()[1] = 1.0;
    }
    buf = full;
  }
  forward_all_reduce(buf, reducer);
  auto [n, mean, m2, count_d, flag, ratio] = finish(buf, C, eps);
  const int64_t count = static_cast<int64_t>(std::llround(count_d));
  if (!failure.empty()) return {3, Tensor(), n, mean, m2, count, flag, Tensor(), Tensor(), Tensor(), failure};
  if (flag > 0) return {1, Tensor(), n, mean, m2, count, flag, Tensor(), Tensor(), Tensor(), ""};

  const Tensor cw = conv ? conv_weight->detach() : Tensor();
  const std::vector<double> cb = conv ? as_doubles(conv_bias, C) : std::vector<double>();
  Tensor un = n, umean = mean, um2 = m2;
  double prior_count = 0;
  if (use_history && filled > 0) {
    // the compensated, pooled history (= _compensated_prior)
    const Tensor cnt = doubles(h_count), hm = doubles(h_mean), hv = doubles(h_var);
    const Tensor hma = doubles(h_mean_at), hva = doubles(h_var_at);
    const Tensor ok = h_comp.scalar_type() == at::kBool && h_comp.is_contiguous() ? h_comp : h_comp.to(at::kBool).contiguous();
    std::vector<double> tm(filled * C), tv(filled * C);
    const double *pc = cnt.const_data_ptr<double>(), *pm = hm.const_data_ptr<double>();
    const double *pv = hv.const_data_ptr<double>(), *pma = hma.const_data_ptr<double>();
    const double* pva = hva.const_data_ptr<double>();
    const bool* pok = ok.const_data_ptr<bool>();
    if (conv) weight_products(h_dmean, h_dvar, cw, cb, groups, 0, filled, tm.data(), tv.data());
    for (int64_t s = 0; s < filled; ++s) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = s * C + c;
        const double dmu = conv && pok[s] ? tm[i] - pma[i] : 0.0;
        const double dvar = conv && pok[s] ? tv[i] - pva[i] : 0.0;
        tm[i] = pm[i] + dmu;
        tv[i] = std::max(pv[i] + dvar - dmu * dmu, 0.0);
      }
    }
    double total = 0;
    for (int64_t s = 0; s < filled; ++s) total += pc[s];
    Tensor pmean = f64(C, mean), pm2 = f64(C, mean);
    double *qm = pmean.data_ptr<double>(), *qq = pm2.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      double mu = 0;
      for (int64_t s = 0; s < filled; ++s) mu += (pc[s] / total) * tm[s * C + c];
      double q = 0;
      for (int64_t s = 0; s < filled; ++s) {
        const double dlt = tm[s * C + c] - mu;
        q += pc[s] * (tv[s * C + c] + dlt * dlt);
      }
      qm[c] = mu;
      qq[c] = q;
    }
    prior_count = total;
    std::tie(un, umean, um2) = merge_moments(f64_scalar(total, mean), pmean, pm2, n, mean, m2);
  }
  const int64_t used_total = count + static_cast<int64_t>(std::llround(prior_count));
  if (used_total == 1) return {2, Tensor(), n, mean, m2, count, flag, un, umean, um2, ""};
  auto [y, params] = fused_norm(x, weight, bias, umean, um2, used_total, ratio > kCenterAbove && x.numel() > 0, eps,
                                c10::nullopt, c10::nullopt, 1.0, 0.0, reducer);
  if (running_mean.has_value() && running_mean->defined() && count > 0)
    update_running(*running_mean, *running_var, num_batches_tracked, mean, m2, count, momentum, cumulative);
  at::NoGradGuard no_grad;
  if (record && count > 0) {
    // (= _record) the batch's global moments and, with a conv, d mu / d W = mean patch, d sigma^2 / d W =
    // 2 (sum x * patch - mu * sum patch) / n, rounded to the buffers' dtype, and their products with this step's
    // weights taken from the rounded values
    const int64_t slot = h_next.scalar_type() == at::kLong ? *h_next.const_data_ptr<int64_t>() : h_next.item<int64_t>();
    TORCH_CHECK(slot >= 0 && slot < slots, "cbn_step: history_next out of range");
    // the per-channel rows: straight into fp64 buffers (the layer's own), through ATen for any other dtype
    auto put = [&](const Tensor& buf, const double* row) {
      if (buf.scalar_type() == at::kDouble && buf.is_contiguous())
        std::copy(row, row + C, buf.data_ptr<double>() + slot * C);
      else
        buf.select(0, slot).copy_(at::from_blob(const_cast<double*>(row), {C}, mean.options()));
    };
    set_element<double>(h_count, slot, count_d);
    put(h_mean, mean.const_data_ptr<double>());
    std::vector<double> row(C);
    const double* pq = m2.const_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) row[c] = pq[c] / count_d;
    put(h_var, row.data());
    if (conv) {
      const double* sums = buf.const_data_ptr<double>() + 2 + 2 * C;
      const double* patch = sums;
      const double* cross = sums + groups * K;
      const double* pmu = mean.const_data_ptr<double>();
      const int64_t per = C / groups;
      auto fill = [&](auto* qdm, auto* qdv) {
        using T = std::remove_pointer_t<decltype(qdm)>;
        for (int64_t j = 0; j < groups * K; ++j) qdm[j] = static_cast<T>(patch[j] / count_d);
        for (int64_t c = 0; c < C; ++c) {
          const double* pc = patch + (c / per) * K;
          for (int64_t j = 0; j < K; ++j)
            qdv[c * K + j] = static_cast<T>(2.0 * (cross[c * K + j] - pmu[c] * pc[j]) / count_d);
        }
      };
      TORCH_CHECK(h_dmean.numel() == slots * groups * K && h_dvar.numel() == slots * C * K,
                  "CrossIterationBatchNorm: history derivative buffers of shapes ", h_dmean.sizes(), " and ",
                  h_dvar.sizes(), " do not match the attached conv");
      if (h_dmean.is_contiguous() && h_dvar.is_contiguous() && h_dmean.scalar_type() == h_dvar.scalar_type()) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h_dvar.scalar_type(), "syncnorm_record", [&] {
          fill(h_dmean.data_ptr<scalar_t>() + slot * groups * K, h_dvar.data_ptr<scalar_t>() + slot * C * K);
        });
      } else {
        Tensor dm = f64(groups * K, mean), dv = f64(C * K, mean);
        fill(dm.data_ptr<double>(), dv.data_ptr<double>());
        h_dmean.select(0, slot).copy_(dm.view({groups, K}));
        h_dvar.select(0, slot).copy_(dv.view({C, K}));
      }
      std::vector<double> pm(C), pv(C);
      weight_products(h_dmean, h_dvar, cw, cb, groups, slot, 1, pm.data(), pv.data());
      put(h_mean_at, pm.data());
      put(h_var_at, pv.data());
      set_element<bool>(h_comp, slot, true);
    } else {
      std::fill(row.begin(), row.end(), 0.0);
      put(h_mean_at, row.data());
      put(h_var_at, row.data());
      set_element<bool>(h_comp, slot, false);
    }
    set_element<int64_t>(h_next, 0, (slot + 1) % slots);
    set_element<int64_t>(h_filled, 0, std::min(filled + 1, slots));
  }
  if (h_step.scalar_type() == at::kLong)
    set_element<int64_t>(h_step, 0, *h_step.const_data_ptr<int64_t>() + 1);
  else
    h_step.add_(1);
  return {0, y, n, mean, m2, count, flag, un, umean, um2, ""};
}

void set_reducer(py::object fn) {
  if (g_reducer == nullptr) g_reducer = new py::object();
  *g_reducer = std::move(fn);
}

// ------------------------------------------------------------------------- same-host shared-memory all-reduce
//
// syncnorm.comm uses this for the statistics path's small vectors when every rank of a gloo group runs on this
// host (a gloo all-reduce costs about 2 ms per call on a 2-core VM, against ~50 us for a loopback round trip).
// The region, mapped by every rank of the group, holds one 64-byte line per rank with the number of the last
// round that rank posted (and, per bank, the byte size and dtype it posted, which every peer checks), then two banks of `world` slots of `capacity` bytes. Round k (1, 2, ...) writes this
// rank's vector into bank k % 2, posts k (release), waits until every rank has posted k (acquire), and sums the
// slots in rank order, so every rank computes bit-identical results. Bank k % 2 is free again at round k + 2: a
// rank posts k + 1 only after it has read bank k % 2, and nobody enters round k + 2 before seeing k + 1 posted
// by everyone.

// Called without the GIL (see with_route): waiting for the peers must not block this process's other Python
// threads.
void shm_all_reduce(int64_t base, int64_t rank, int64_t world, int64_t round, int64_t capacity, const Tensor& t,
                    double timeout_s, bool header_only) {
  // header_only: post and check t's byte size and dtype, move no data (the caller then all-reduces t through the
  // backend). Used for a tensor that cannot go through the slot, so that a peer whose matching call did go through
  // shared memory (a mismatched call) raises here on every rank instead of both waiting in different transports.
  if (!header_only) {
    TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "shm_all_reduce: expected a contiguous CPU tensor");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "shm_all_reduce: expected float32 or float64, got ", t.scalar_type());
  }
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  TORCH_CHECK(header_only || bytes <= capacity, "shm_all_reduce: ", bytes, " bytes exceed the slot capacity ",
              capacity);
  char* region = reinterpret_cast<char*>(base);
  auto posted = [&](int64_t r) { return reinterpret_cast<std::atomic<int64_t>*>(region + 64 * r); };
  // beside each rank's counter: the byte size and dtype it posted in this round, checked by every peer, so that
  // mismatched calls raise (as gloo does) instead of summing stale bytes; one pair per bank, because a peer may
  // already post round k + 1 while this rank still reads round k (never k + 2: see above)
  auto shape = [&](int64_t r) { return reinterpret_cast<int64_t*>(region + 64 * r + 8 + 16 * (round & 1)); };
  char* bank = region + 64 * world + (round & 1) * world * capacity;
  if (!header_only) std::memcpy(bank + rank * capacity, t.data_ptr(), bytes);
  shape(rank)[0] = bytes;
  shape(rank)[1] = static_cast<int64_t>(t.scalar_type());
  posted(rank)->store(round, std::memory_order_release);
  {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < world; ++r) {
      int64_t spins = 0;
      while (posted(r)->load(std::memory_order_acquire) < round) {
        // spin briefly, then yield, then sleep: a long wait (a peer evaluating or checkpointing) must not keep
        // a core busy that the peer may need
        ++spins;
        if (spins > 200000) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        } else if (spins > 64) {
          sched_yield();
        }
        if ((spins & 1023) == 0) {
          const double waited =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          TORCH_CHECK(waited < timeout_s, "syncnorm: rank ", r, " of the process group did not reach the "
                      "shared-memory all-reduce (round ", round, ") within ", timeout_s, " s; did it fail or "
                      "skip a synchronising layer? (SYNCNORM_SHM_TIMEOUT sets the limit, SYNCNORM_SHM=0 uses gloo)");
        }
      }
    }
  }
  for (int64_t r = 0; r < world; ++r) {
    TORCH_CHECK(shape(r)[0] == bytes && shape(r)[1] == static_cast<int64_t>(t.scalar_type()),
                "syncnorm: shared-memory all-reduce mismatch in round ", round, ": this rank (", rank, ") sent ",
                t.numel(), " values of ", t.scalar_type(), ", rank ", r, " sent ", shape(r)[0], " bytes of dtype ",
                c10::toString(static_cast<at::ScalarType>(shape(r)[1])),
                "; every rank must call the same layers with the same channel counts and dtypes");
  }
  if (header_only) return;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "syncnorm_shm_all_reduce", [&] {
    scalar_t* out = t.data_ptr<scalar_t>();
    const int64_t n = t.numel();
    const scalar_t* first = reinterpret_cast<const scalar_t*>(bank);
    for (int64_t i = 0; i < n; ++i) out[i] = first[i];
    for (int64_t r = 1; r < world; ++r) {
      const scalar_t* slot = reinterpret_cast<const scalar_t*>(bank + r * capacity);
      for (int64_t i = 0; i < n; ++i) out[i] += slot[i];
    }
  });
}

// Channels as the kernels see them: one route per channel syncnorm.comm opens (never closed: comm keeps every
// channel's mapping alive), with the channel's round counter. Every exchange on a channel, from Python
// (shm_round) or from the kernels (direct_all_reduce), takes its round number here, under the route's lock.
namespace {
struct ShmRoute {
  int64_t base, rank, world, capacity;
  double timeout;
  std::atomic<int64_t> round{0};  // advanced under `lock`; read without it (shm_rounds)
  std::mutex lock;
};
std::mutex g_routes_lock;
std::vector<std::unique_ptr<ShmRoute>>* g_routes = nullptr;  // never destroyed (see g_reducer)
std::atomic<bool> g_skip_direct{false};

ShmRoute& route(int64_t handle) {
  std::lock_guard<std::mutex> guard(g_routes_lock);
  TORCH_CHECK(g_routes != nullptr && handle >= 0 && handle < static_cast<int64_t>(g_routes->size()),
              "syncnorm: unknown shared-memory channel ", handle);
  return *(*g_routes)[handle];
}

// fn(route) under the route's lock, with the GIL released first when this thread holds it (a forward, or a call
// from Python; the autograd engine runs the backward without it). The lock is never taken, nor held while
// waiting for peers, with the GIL: a thread holding it never needs the GIL, so it cannot deadlock against one
// that holds the GIL, and the process's other Python threads keep running while this rank waits. The lock is
// released before the GIL is taken back (destruction order).
template <class F>
auto with_route(int64_t handle, F&& fn) {
  c10::optional<py::gil_scoped_release> no_gil;
  if (PyGILState_Check()) no_gil.emplace();
  ShmRoute& r = route(handle);
  std::lock_guard<std::mutex> guard(r.lock);
  return fn(r);
}
}  // namespace

int64_t shm_open(int64_t base, int64_t rank, int64_t world, int64_t capacity, double timeout_s) {
  TORCH_CHECK(base != 0 && world > 1 && rank >= 0 && rank < world && capacity > 0 && timeout_s > 0,
              "shm_open: invalid channel");
  std::lock_guard<std::mutex> guard(g_routes_lock);
  if (g_routes == nullptr) g_routes = new std::vector<std::unique_ptr<ShmRoute>>();
  auto r = std::make_unique<ShmRoute>();
  r->base = base;
  r->rank = rank;
  r->world = world;
  r->capacity = capacity;
  r->timeout = timeout_s;
  g_routes->push_back(std::move(r));
  return static_cast<int64_t>(g_routes->size()) - 1;
}

// One round on channel `handle` (see shm_all_reduce); header_only as there.
void shm_round(int64_t handle, const Tensor& t, bool header_only) {
  with_route(handle, [&](ShmRoute& r) {
    shm_all_reduce(r.base, r.rank, r.world, ++r.round, r.capacity, t, r.timeout, header_only);
  });
}

// Rounds channel `handle` has taken so far (tests: one per synchronising layer per forward and per backward).
int64_t shm_rounds(int64_t handle) { return route(handle).round.load(); }

// Benchmarks only (bench_syncbn's "collective skipped"): while set, the kernels' direct rounds return at once
// without exchanging anything, so a layer's own compute can be timed in a real multi-rank group. Never set in
// training: the ranks' statistics would differ.
void set_skip_direct_rounds(bool skip) { g_skip_direct.store(skip); }

bool direct_all_reduce(const Tensor& t, int64_t handle) {
  const int64_t capacity = route(handle).capacity;  // fixed at shm_open
  if (!t.is_cpu() || !t.is_contiguous() || (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) ||
      t.numel() * static_cast<int64_t>(t.element_size()) > capacity)
    return false;  // the same test as syncnorm.comm.all_reduce_sum's; that path announces it, then uses gloo
  if (g_skip_direct.load(std::memory_order_relaxed)) return true;
  with_route(handle, [&](ShmRoute& r) {
    shm_all_reduce(r.base, r.rank, r.world, ++r.round, r.capacity, t, r.timeout, false);
  });
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "syncnorm CPU kernels (see syncnorm/csrc/norm_cpu.cpp)";
  m.def("local_pack", &local_pack);
  m.def("finish", &finish);
  m.def("merge_moments", &merge_moments);
  m.def("update_running", &update_running);
  m.def("fused_norm", &fused_norm);
  m.def("train_step", &train_step);
  m.def("window_step", &window_step);
  m.def("cbn_step", &cbn_step);
  m.def("set_reducer", &set_reducer);
  m.def("shm_open", &shm_open);
  m.def("shm_round", &shm_round, py::arg("handle"), py::arg("t"), py::arg("header_only") = false);
  m.def("shm_rounds", &shm_rounds);
  m.def("set_skip_direct_rounds", &set_skip_direct_rounds);
}

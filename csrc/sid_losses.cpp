// Fused SiD losses (DESIGN.md §3, §4) on the CPU, registered as torch ops `sid_fast_cpp::*`.
// Same math as kernels/sid_generator_loss.py and kernels/fake_score_loss.py (see their docstrings).
// One pass per direction: the forward reads each latent once; the backward reads each once and writes every
// gradient once. Work is split into (sample, chunk of CHUNK elements) jobs over ATen's parallel_for (OpenMP).
// Inside a job the loop runs LANES independent float accumulators, which the compiler vectorises without
// reassociating anything, so the sums are the same bit for bit whatever the vector width or thread count: lanes
// are added in a fixed order, chunks are reduced in double in a fixed order. On x86-64 with GCC/Clang the loops
// are compiled twice, for AVX2+FMA and for the baseline ISA, and the AVX2 copy runs when the CPU has it.
// Latent tensors share one dtype (float, half or bfloat16) and are contiguous; t and coef are float (B,).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SID_HAVE_AVX2_COPY 1
#define SID_AVX2 __attribute__((target("avx2,fma")))
#else
#define SID_HAVE_AVX2_COPY 0
#define SID_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SID_INLINE inline __attribute__((always_inline))
#else
#define SID_INLINE inline
#endif

namespace {

constexpr int64_t CHUNK = 4096;
constexpr int LANES = 16;

bool cpu_has_avx2() {
#if SID_HAVE_AVX2_COPY
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

void check_latents(const std::vector<at::Tensor>& tensors) {
  const auto& first = tensors[0];
  TORCH_CHECK(first.dim() >= 1 && first.size(0) > 0, "sid_fast_cpp: latents must be (B, ...) with B > 0");
  for (const auto& tensor : tensors) {
    TORCH_CHECK(tensor.device().is_cpu(), "sid_fast_cpp: CPU tensors expected");
    TORCH_CHECK(tensor.sizes() == first.sizes(), "sid_fast_cpp: latent shapes differ: ", tensor.sizes(), " vs ", first.sizes());
    TORCH_CHECK(tensor.scalar_type() == first.scalar_type(), "sid_fast_cpp: latent dtypes differ");
    TORCH_CHECK(tensor.is_contiguous(), "sid_fast_cpp: latents must be contiguous");
  }
}

void check_per_sample(const at::Tensor& tensor, int64_t batch, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat && tensor.dim() == 1 && tensor.size(0) == batch && tensor.is_contiguous(),
              "sid_fast_cpp: ", name, " must be a contiguous float tensor of shape (", batch, ")");
}

// Sum chunk partials (B, chunks) in order into a float (B,) tensor.
at::Tensor reduce_chunks(const std::vector<double>& partial, int64_t batch, int64_t chunks) {
  auto out = at::empty({batch}, at::TensorOptions().dtype(at::kFloat));
  auto* data = out.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    data[b] = static_cast<float>(total);
  }
  return out;
}

// Element loads and stores in fp32. bfloat16 goes through its bits: a shift to load, round-to-nearest-even with
// NaN kept quiet (0x7FC0, as c10::BFloat16(float)) to store, written with selects instead of c10's branch so that
// the loops vectorise (through c10's conversions they stayed scalar: 0.7 ms instead of 0.1 ms for a 4 MB backward).
template <typename T>
SID_INLINE float load(const T* data, int64_t i) { return static_cast<float>(data[i]); }

template <>
SID_INLINE float load<c10::BFloat16>(const c10::BFloat16* data, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(data)[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <typename T>
SID_INLINE void store(T* data, int64_t i, float value) { data[i] = static_cast<T>(value); }

template <>
SID_INLINE void store<c10::BFloat16>(c10::BFloat16* data, int64_t i, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  reinterpret_cast<uint16_t*>(data)[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

template <typename T>
SID_INLINE float lanes_total(const T (&acc)[LANES], float tail) {
  float total = tail;
  for (int j = 0; j < LANES; ++j) total += acc[j];
  return total;
}

// ---------------------------------------------------------------- the per-element math, one place for all loops

struct GeneratorCoefs {
  float ks, kf, a;
};

// ℓ = d·[(y_r − x_g) − α d], y = x_t − t v, v = u + κ (c − u)
SID_INLINE float generator_element(float xt, float xg, float u_r, float c_r, float u_f, float c_f, float time,
                                   const GeneratorCoefs& k) {
  const float v_r = u_r + k.ks * (c_r - u_r), v_f = u_f + k.kf * (c_f - u_f);
  const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
  return d * ((y_r - xg) - k.a * d);
}

template <typename scalar_t>
struct GeneratorPointers {
  const scalar_t *x_t, *x_g, *tu, *tc, *fu, *fc;
};

template <typename scalar_t>
struct GeneratorGradPointers {
  scalar_t *x_t, *x_g, *tu, *tc, *fu, *fc;
};

template <typename scalar_t>
SID_INLINE float generator_forward_body(const GeneratorPointers<scalar_t>& p, int64_t begin, int64_t end, float time,
                                        const GeneratorCoefs& k) {
  float acc[LANES] = {};
  int64_t i = begin;
  for (; i + LANES <= end; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const int64_t e = i + j;
      acc[j] += generator_element(load(p.x_t, e), load(p.x_g, e), load(p.tu, e), load(p.tc, e), load(p.fu, e),
                                  load(p.fc, e), time, k);
    }
  }
  float tail = 0.0f;
  for (; i < end; ++i)
    tail += generator_element(load(p.x_t, i), load(p.x_g, i), load(p.tu, i), load(p.tc, i), load(p.fu, i), load(p.fc, i),
                              time, k);
  return lanes_total(acc, tail);
}

// Gradients of one element: g[0..5] = ∂/∂(x_t, x_g, u_r, c_r, u_f, c_f); adds ∂/∂t and ℓ to the accumulators.
SID_INLINE void generator_backward_element(float xt, float xg, float u_r, float c_r, float u_f, float c_f, float time,
                                           float c, const GeneratorCoefs& k, float (&g)[6], float& acc_t,
                                           float& acc_sum) {
  const float v_r = u_r + k.ks * (c_r - u_r), v_f = u_f + k.kf * (c_f - u_f);
  const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
  const float gap = y_r - xg;
  const float g_yr = c * (gap + (1.0f - 2.0f * k.a) * d), g_yf = c * (2.0f * k.a * d - gap);
  const float g_vr = -time * g_yr, g_vf = -time * g_yf;
  g[0] = g_yr + g_yf;
  g[1] = -c * d;
  g[2] = g_vr - k.ks * g_vr;
  g[3] = k.ks * g_vr;
  g[4] = g_vf - k.kf * g_vf;
  g[5] = k.kf * g_vf;
  acc_t += -(v_r * g_yr + v_f * g_yf);
  acc_sum += d * (gap - k.a * d);
}

// Loads, arithmetic and stores of a block run as separate loops over local arrays, so that the compiler needs no
// proof that the gradient buffers do not overlap the inputs to vectorise each of them.
template <typename scalar_t>
SID_INLINE void generator_backward_body(const GeneratorPointers<scalar_t>& p, const GeneratorGradPointers<scalar_t>& g,
                                        int64_t begin, int64_t end, float time, float c, const GeneratorCoefs& k,
                                        float* out_t, float* out_sum) {
  const scalar_t* in[6] = {p.x_t, p.x_g, p.tu, p.tc, p.fu, p.fc};
  scalar_t* out[6] = {g.x_t, g.x_g, g.tu, g.tc, g.fu, g.fc};
  float acc_t[LANES] = {}, acc_sum[LANES] = {};
  float tail_t = 0.0f, tail_sum = 0.0f;
  for (int64_t i = begin; i < end; i += LANES) {
    const int width = static_cast<int>(std::min<int64_t>(LANES, end - i));
    float x[6][LANES], grad[6][LANES];
    if (width == LANES) {
      for (int q = 0; q < 6; ++q)
        for (int j = 0; j < LANES; ++j) x[q][j] = load(in[q], i + j);
      for (int j = 0; j < LANES; ++j) {
        float gj[6];
        generator_backward_element(x[0][j], x[1][j], x[2][j], x[3][j], x[4][j], x[5][j], time, c, k, gj, acc_t[j],
                                   acc_sum[j]);
        for (int q = 0; q < 6; ++q) grad[q][j] = gj[q];
      }
      for (int q = 0; q < 6; ++q)
        for (int j = 0; j < LANES; ++j) store(out[q], i + j, grad[q][j]);
    } else {  // the ragged tail, element by element, into its own accumulators
      for (int j = 0; j < width; ++j) {
        float gj[6];
        generator_backward_element(load(in[0], i + j), load(in[1], i + j), load(in[2], i + j), load(in[3], i + j),
                                   load(in[4], i + j), load(in[5], i + j), time, c, k, gj, tail_t, tail_sum);
        for (int q = 0; q < 6; ++q) store(out[q], i + j, gj[q]);
      }
    }
  }
  *out_t = lanes_total(acc_t, tail_t);
  *out_sum = lanes_total(acc_sum, tail_sum);
}

// r = u + κ1 (c − u) − (ε − x_g)
SID_INLINE float fake_residual(float u, float c, float xg, float noise, float k) {
  return (u + k * (c - u)) - (noise - xg);
}

template <typename scalar_t>
SID_INLINE float fake_forward_body(const scalar_t* pu, const scalar_t* pc, const scalar_t* pg, const scalar_t* pn,
                                   int64_t begin, int64_t end, float k) {
  float acc[LANES] = {};
  int64_t i = begin;
  for (; i + LANES <= end; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const int64_t e = i + j;
      const float r = fake_residual(load(pu, e), load(pc, e), load(pg, e), load(pn, e), k);
      acc[j] += r * r;
    }
  }
  float tail = 0.0f;
  for (; i < end; ++i) {
    const float r = fake_residual(load(pu, i), load(pc, i), load(pg, i), load(pn, i), k);
    tail += r * r;
  }
  return lanes_total(acc, tail);
}

// Gradients of one element: g[0..3] = ∂/∂(u, c, x_g, ε) of grad · r².
SID_INLINE void fake_backward_element(float u, float c, float xg, float noise, float k, float grad, float (&g)[4]) {
  const float g_r = 2.0f * grad * fake_residual(u, c, xg, noise, k);
  g[0] = g_r - k * g_r;
  g[1] = k * g_r;
  g[2] = g_r;
  g[3] = -g_r;
}

template <typename scalar_t>
SID_INLINE void fake_backward_body(const scalar_t* pu, const scalar_t* pc, const scalar_t* pg, const scalar_t* pn,
                                   scalar_t* gu, scalar_t* gc, scalar_t* gg, scalar_t* gn, int64_t begin, int64_t end,
                                   float k, float grad) {
  const scalar_t* in[4] = {pu, pc, pg, pn};
  scalar_t* out[4] = {gu, gc, gg, gn};
  for (int64_t i = begin; i < end; i += LANES) {  // loads, arithmetic, stores as separate loops (see above)
    const int width = static_cast<int>(std::min<int64_t>(LANES, end - i));
    if (width == LANES) {
      float x[4][LANES], g[4][LANES];
      for (int q = 0; q < 4; ++q)
        for (int j = 0; j < LANES; ++j) x[q][j] = load(in[q], i + j);
      for (int j = 0; j < LANES; ++j) {
        float gj[4];
        fake_backward_element(x[0][j], x[1][j], x[2][j], x[3][j], k, grad, gj);
        for (int q = 0; q < 4; ++q) g[q][j] = gj[q];
      }
      for (int q = 0; q < 4; ++q)
        for (int j = 0; j < LANES; ++j) store(out[q], i + j, g[q][j]);
    } else {
      for (int j = 0; j < width; ++j) {
        float gj[4];
        fake_backward_element(load(pu, i + j), load(pc, i + j), load(pg, i + j), load(pn, i + j), k, grad, gj);
        for (int q = 0; q < 4; ++q) store(out[q], i + j, gj[q]);
      }
    }
  }
}

// ---------------------------------------------------------------- ISA copies: the bodies inlined with each target

#define SID_ISA_COPIES(NAME, RET, PARAMS, ARGS)                                   \
  template <typename scalar_t>                                                    \
  RET NAME##_base PARAMS { return NAME##_body<scalar_t> ARGS; }                   \
  template <typename scalar_t>                                                    \
  SID_AVX2 RET NAME##_avx2 PARAMS { return NAME##_body<scalar_t> ARGS; }          \
  template <typename scalar_t>                                                    \
  RET NAME PARAMS {                                                               \
    return cpu_has_avx2() ? NAME##_avx2<scalar_t> ARGS : NAME##_base<scalar_t> ARGS; \
  }

SID_ISA_COPIES(generator_forward, float,
               (const GeneratorPointers<scalar_t>& p, int64_t begin, int64_t end, float time, const GeneratorCoefs& k),
               (p, begin, end, time, k))
SID_ISA_COPIES(generator_backward, void,
               (const GeneratorPointers<scalar_t>& p, const GeneratorGradPointers<scalar_t>& g, int64_t begin,
                int64_t end, float time, float c, const GeneratorCoefs& k, float* out_t, float* out_sum),
               (p, g, begin, end, time, c, k, out_t, out_sum))
SID_ISA_COPIES(fake_forward, float,
               (const scalar_t* pu, const scalar_t* pc, const scalar_t* pg, const scalar_t* pn, int64_t begin,
                int64_t end, float k),
               (pu, pc, pg, pn, begin, end, k))
SID_ISA_COPIES(fake_backward, void,
               (const scalar_t* pu, const scalar_t* pc, const scalar_t* pg, const scalar_t* pn, scalar_t* gu,
                scalar_t* gc, scalar_t* gg, scalar_t* gn, int64_t begin, int64_t end, float k, float grad),
               (pu, pc, pg, pn, gu, gc, gg, gn, begin, end, k, grad))

// ---------------------------------------------------------------- the ops

// Runs fn(job, b, begin, end) for every (sample, chunk) job, element range [begin, end) in flat indices.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t n, int64_t chunks, const Fn& fn) {
  at::parallel_for(0, batch * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t job = first; job < last; ++job) {
      const int64_t b = job / chunks, start = (job % chunks) * CHUNK, stop = std::min(n, start + CHUNK);
      fn(job, b, b * n + start, b * n + stop);
    }
  });
}

// §3: per-sample Σ ℓ
at::Tensor generator_forward_op(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu, const at::Tensor& tc,
                                const at::Tensor& fu, const at::Tensor& fc, const at::Tensor& t, double teacher_scale,
                                double fake_scale, double alpha) {
  check_latents({x_t, x_g, tu, tc, fu, fc});
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  check_per_sample(t, batch, "t");
  std::vector<double> partial(batch * chunks, 0.0);
  const GeneratorCoefs k{static_cast<float>(teacher_scale), static_cast<float>(fake_scale), static_cast<float>(alpha)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_forward", [&] {
    const GeneratorPointers<scalar_t> p{x_t.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), tu.data_ptr<scalar_t>(),
                                        tc.data_ptr<scalar_t>(), fu.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>()};
    const float* pt = t.data_ptr<float>();
    for_each_chunk(batch, n, chunks, [&](int64_t job, int64_t b, int64_t begin, int64_t end) {
      partial[job] = generator_forward<scalar_t>(p, begin, end, pt[b], k);
    });
  });
  return reduce_chunks(partial, batch, chunks);
}

// Gradients of Σ_b coef_b Σ ℓ: [g_x_t, g_x_g, g_u_r, g_c_r, g_u_f, g_c_f, Σ ∂/∂t (B,), Σ ℓ (B,)]
std::vector<at::Tensor> generator_backward_op(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu,
                                              const at::Tensor& tc, const at::Tensor& fu, const at::Tensor& fc,
                                              const at::Tensor& t, const at::Tensor& coef, double teacher_scale,
                                              double fake_scale, double alpha) {
  check_latents({x_t, x_g, tu, tc, fu, fc});
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  check_per_sample(t, batch, "t");
  check_per_sample(coef, batch, "coef");
  std::vector<at::Tensor> grads;
  for (int g = 0; g < 6; ++g) grads.push_back(at::empty_like(x_t));
  std::vector<double> partial_t(batch * chunks, 0.0), partial_sum(batch * chunks, 0.0);
  const GeneratorCoefs k{static_cast<float>(teacher_scale), static_cast<float>(fake_scale), static_cast<float>(alpha)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_backward", [&] {
    const GeneratorPointers<scalar_t> p{x_t.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), tu.data_ptr<scalar_t>(),
                                        tc.data_ptr<scalar_t>(), fu.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>()};
    const GeneratorGradPointers<scalar_t> g{grads[0].data_ptr<scalar_t>(), grads[1].data_ptr<scalar_t>(),
                                            grads[2].data_ptr<scalar_t>(), grads[3].data_ptr<scalar_t>(),
                                            grads[4].data_ptr<scalar_t>(), grads[5].data_ptr<scalar_t>()};
    const float *pt = t.data_ptr<float>(), *pc = coef.data_ptr<float>();
    for_each_chunk(batch, n, chunks, [&](int64_t job, int64_t b, int64_t begin, int64_t end) {
      float sum_t = 0.0f, sum = 0.0f;
      generator_backward<scalar_t>(p, g, begin, end, pt[b], pc[b], k, &sum_t, &sum);
      partial_t[job] = sum_t;
      partial_sum[job] = sum;
    });
  });
  grads.push_back(reduce_chunks(partial_t, batch, chunks));
  grads.push_back(reduce_chunks(partial_sum, batch, chunks));
  return grads;
}

// §3 fake-score loss: per-sample Σ r²
at::Tensor fake_forward_op(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g, const at::Tensor& noise,
                           double scale) {
  check_latents({vu, vc, x_g, noise});
  const int64_t batch = vu.size(0), n = vu.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(batch * chunks, 0.0);
  const float k = scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_forward", [&] {
    const scalar_t *pu = vu.data_ptr<scalar_t>(), *pc = vc.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(),
                   *pn = noise.data_ptr<scalar_t>();
    for_each_chunk(batch, n, chunks, [&](int64_t job, int64_t, int64_t begin, int64_t end) {
      partial[job] = fake_forward<scalar_t>(pu, pc, pg, pn, begin, end, k);
    });
  });
  return reduce_chunks(partial, batch, chunks);
}

// Gradients of Σ_b grad_b Σ r²: [g_u, g_c, g_x_g, g_noise]
std::vector<at::Tensor> fake_backward_op(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g,
                                         const at::Tensor& noise, const at::Tensor& grad, double scale) {
  check_latents({vu, vc, x_g, noise});
  const int64_t batch = vu.size(0), n = vu.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  check_per_sample(grad, batch, "grad");
  std::vector<at::Tensor> grads;
  for (int g = 0; g < 4; ++g) grads.push_back(at::empty_like(vu));
  const float k = scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_backward", [&] {
    const scalar_t *pu = vu.data_ptr<scalar_t>(), *pc = vc.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(),
                   *pn = noise.data_ptr<scalar_t>();
    scalar_t *gu = grads[0].data_ptr<scalar_t>(), *gc = grads[1].data_ptr<scalar_t>(), *gg = grads[2].data_ptr<scalar_t>(),
             *gn = grads[3].data_ptr<scalar_t>();
    const float* pgrad = grad.data_ptr<float>();
    for_each_chunk(batch, n, chunks, [&](int64_t, int64_t b, int64_t begin, int64_t end) {
      fake_backward<scalar_t>(pu, pc, pg, pn, gu, gc, gg, gn, begin, end, k, pgrad[b]);
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY(sid_fast_cpp, m) {
  m.def("generator_forward(Tensor x_t, Tensor x_g, Tensor tu, Tensor tc, Tensor fu, Tensor fc, Tensor t, "
        "float teacher_scale, float fake_scale, float alpha) -> Tensor");
  m.def("generator_backward(Tensor x_t, Tensor x_g, Tensor tu, Tensor tc, Tensor fu, Tensor fc, Tensor t, Tensor coef, "
        "float teacher_scale, float fake_scale, float alpha) -> Tensor[]");
  m.def("fake_forward(Tensor vu, Tensor vc, Tensor x_g, Tensor noise, float scale) -> Tensor");
  m.def("fake_backward(Tensor vu, Tensor vc, Tensor x_g, Tensor noise, Tensor grad, float scale) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(sid_fast_cpp, CPU, m) {
  m.impl("generator_forward", &generator_forward_op);
  m.impl("generator_backward", &generator_backward_op);
  m.impl("fake_forward", &fake_forward_op);
  m.impl("fake_backward", &fake_backward_op);
}

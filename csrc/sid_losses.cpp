// Fused SiD losses (DESIGN.md §3, §4) on the CPU with OpenMP, registered as torch ops `sid_fast_cpp::*`.
// Same math as kernels/sid_generator_loss.py and kernels/fake_score_loss.py (see their docstrings); float
// arithmetic per element (SIMD-vectorised), float sums within a chunk of CHUNK elements, chunks reduced in
// double in a fixed order (deterministic for any thread count).
// Latent tensors share one dtype (float, half or bfloat16) and are contiguous; t and coef are float (B,).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t CHUNK = 4096;

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

// §3: per-sample Σ ℓ, ℓ = d·[(y_r − x_g) − α d], y = x_t − t v, v = u + κ (c − u)
at::Tensor generator_forward(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu, const at::Tensor& tc,
                             const at::Tensor& fu, const at::Tensor& fc, const at::Tensor& t, double teacher_scale,
                             double fake_scale, double alpha) {
  check_latents({x_t, x_g, tu, tc, fu, fc});
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  check_per_sample(t, batch, "t");
  std::vector<double> partial(batch * chunks, 0.0);
  const float ks = teacher_scale, kf = fake_scale, a = alpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_forward", [&] {
    const scalar_t *px = x_t.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(), *ptu = tu.data_ptr<scalar_t>(),
                   *ptc = tc.data_ptr<scalar_t>(), *pfu = fu.data_ptr<scalar_t>(), *pfc = fc.data_ptr<scalar_t>();
    const float* pt = t.data_ptr<float>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / chunks, start = (job % chunks) * CHUNK, stop = std::min(n, start + CHUNK);
        const float time = pt[b];
        float acc = 0.0f;
_Pragma("omp simd reduction(+ : acc)")
        for (int64_t i = b * n + start; i < b * n + stop; ++i) {
          const float xt = px[i], u_r = ptu[i], u_f = pfu[i];
          const float v_r = u_r + ks * (static_cast<float>(ptc[i]) - u_r);
          const float v_f = u_f + kf * (static_cast<float>(pfc[i]) - u_f);
          const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
          acc += d * ((y_r - static_cast<float>(pg[i])) - a * d);
        }
        partial[job] = acc;
      }
    });
  });
  return reduce_chunks(partial, batch, chunks);
}

// Gradients of Σ_b coef_b Σ ℓ: [g_x_t, g_x_g, g_u_r, g_c_r, g_u_f, g_c_f, Σ ∂/∂t (B,), Σ ℓ (B,)]
std::vector<at::Tensor> generator_backward(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu,
                                           const at::Tensor& tc, const at::Tensor& fu, const at::Tensor& fc,
                                           const at::Tensor& t, const at::Tensor& coef, double teacher_scale,
                                           double fake_scale, double alpha) {
  check_latents({x_t, x_g, tu, tc, fu, fc});
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  check_per_sample(t, batch, "t");
  check_per_sample(coef, batch, "coef");
  std::vector<at::Tensor> grads;
  for (int k = 0; k < 6; ++k) grads.push_back(at::empty_like(x_t));
  std::vector<double> partial_t(batch * chunks, 0.0), partial_sum(batch * chunks, 0.0);
  const float ks = teacher_scale, kf = fake_scale, a = alpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_backward", [&] {
    const scalar_t *px = x_t.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(), *ptu = tu.data_ptr<scalar_t>(),
                   *ptc = tc.data_ptr<scalar_t>(), *pfu = fu.data_ptr<scalar_t>(), *pfc = fc.data_ptr<scalar_t>();
    scalar_t *gx = grads[0].data_ptr<scalar_t>(), *gg = grads[1].data_ptr<scalar_t>(), *gtu = grads[2].data_ptr<scalar_t>(),
             *gtc = grads[3].data_ptr<scalar_t>(), *gfu = grads[4].data_ptr<scalar_t>(), *gfc = grads[5].data_ptr<scalar_t>();
    const float *pt = t.data_ptr<float>(), *pc = coef.data_ptr<float>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / chunks, start = (job % chunks) * CHUNK, stop = std::min(n, start + CHUNK);
        const float time = pt[b], c = pc[b];
        float acc_t = 0.0f, acc_sum = 0.0f;
_Pragma("omp simd reduction(+ : acc_t, acc_sum)")
        for (int64_t i = b * n + start; i < b * n + stop; ++i) {
          const float xt = px[i], u_r = ptu[i], u_f = pfu[i];
          const float v_r = u_r + ks * (static_cast<float>(ptc[i]) - u_r);
          const float v_f = u_f + kf * (static_cast<float>(pfc[i]) - u_f);
          const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
          const float gap = y_r - static_cast<float>(pg[i]);
          const float g_yr = c * (gap + (1.0f - 2.0f * a) * d), g_yf = c * (2.0f * a * d - gap);
          const float g_vr = -time * g_yr, g_vf = -time * g_yf;
          gx[i] = g_yr + g_yf;
          gg[i] = -c * d;
          gtu[i] = g_vr - ks * g_vr;
          gtc[i] = ks * g_vr;
          gfu[i] = g_vf - kf * g_vf;
          gfc[i] = kf * g_vf;
          acc_t += -(v_r * g_yr + v_f * g_yf);
          acc_sum += d * (gap - a * d);
        }
        partial_t[job] = acc_t;
        partial_sum[job] = acc_sum;
      }
    });
  });
  grads.push_back(reduce_chunks(partial_t, batch, chunks));
  grads.push_back(reduce_chunks(partial_sum, batch, chunks));
  return grads;
}

// §3 fake-score loss: per-sample Σ r², r = u + κ1 (c − u) − (ε − x_g)
at::Tensor fake_forward(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g, const at::Tensor& noise,
                        double scale) {
  check_latents({vu, vc, x_g, noise});
  const int64_t batch = vu.size(0), n = vu.numel() / batch, chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(batch * chunks, 0.0);
  const float k = scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_forward", [&] {
    const scalar_t *pu = vu.data_ptr<scalar_t>(), *pc = vc.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(),
                   *pn = noise.data_ptr<scalar_t>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t b = job / chunks, start = (job % chunks) * CHUNK, stop = std::min(n, start + CHUNK);
        float acc = 0.0f;
_Pragma("omp simd reduction(+ : acc)")
        for (int64_t i = b * n + start; i < b * n + stop; ++i) {
          const float u = pu[i];
          const float r = (u + k * (static_cast<float>(pc[i]) - u)) - (static_cast<float>(pn[i]) - static_cast<float>(pg[i]));
          acc += r * r;
        }
        partial[job] = acc;
      }
    });
  });
  return reduce_chunks(partial, batch, chunks);
}

// Gradients of Σ_b grad_b Σ r²: [g_u, g_c, g_x_g, g_noise]
std::vector<at::Tensor> fake_backward(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g,
                                      const at::Tensor& noise, const at::Tensor& grad, double scale) {
  check_latents({vu, vc, x_g, noise});
  const int64_t batch = vu.size(0), n = vu.numel() / batch;
  check_per_sample(grad, batch, "grad");
  std::vector<at::Tensor> grads;
  for (int k = 0; k < 4; ++k) grads.push_back(at::empty_like(vu));
  const float k = scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_backward", [&] {
    const scalar_t *pu = vu.data_ptr<scalar_t>(), *pc = vc.data_ptr<scalar_t>(), *pg = x_g.data_ptr<scalar_t>(),
                   *pn = noise.data_ptr<scalar_t>();
    scalar_t *gu = grads[0].data_ptr<scalar_t>(), *gc = grads[1].data_ptr<scalar_t>(), *gg = grads[2].data_ptr<scalar_t>(),
             *gn = grads[3].data_ptr<scalar_t>();
    const float* pgrad = grad.data_ptr<float>();
    at::parallel_for(0, batch * n, CHUNK, [&](int64_t begin, int64_t end) {
_Pragma("omp simd")
      for (int64_t i = begin; i < end; ++i) {
        const float u = pu[i];
        const float r = (u + k * (static_cast<float>(pc[i]) - u)) - (static_cast<float>(pn[i]) - static_cast<float>(pg[i]));
        const float g_r = 2.0f * pgrad[i / n] * r;
        gu[i] = g_r - k * g_r;
        gc[i] = k * g_r;
        gg[i] = g_r;
        gn[i] = -g_r;
      }
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
  m.impl("generator_forward", &generator_forward);
  m.impl("generator_backward", &generator_backward);
  m.impl("fake_forward", &fake_forward);
  m.impl("fake_backward", &fake_backward);
}

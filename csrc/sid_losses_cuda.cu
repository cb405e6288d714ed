// CUDA implementations of the `sid_fast_cpp::*` fused SiD losses (DESIGN.md §3, §4); the schemas and the CPU
// versions live in sid_losses.cpp, the math is documented in kernels/sid_generator_loss.py and
// kernels/fake_score_loss.py. Built only when CUDA and nvcc are present (kernels/cpp.py). Grid (chunks, B),
// THREADS x ITEMS elements per block, fp32 arithmetic, per-(sample, chunk) partials summed by the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int THREADS = 256;
constexpr int ITEMS = 8;
constexpr int64_t CHUNK = THREADS * ITEMS;

// Sum over the block; the result is valid in thread 0. Safe to call several times in one kernel.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[THREADS / 32];
  __syncthreads();
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffff, value, offset);
  return value;
}

template <typename scalar_t>
__global__ void generator_forward_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ x_g,
                                         const scalar_t* __restrict__ tu, const scalar_t* __restrict__ tc,
                                         const scalar_t* __restrict__ fu, const scalar_t* __restrict__ fc,
                                         const float* __restrict__ t, float* __restrict__ partial, int64_t n,
                                         float ks, float kf, float alpha) {
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x, base = b * n;
  const float time = t[b];
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = chunk * CHUNK + k * THREADS + threadIdx.x;
    if (j < n) {
      const int64_t i = base + j;
      const float u_r = static_cast<float>(tu[i]), u_f = static_cast<float>(fu[i]), xt = static_cast<float>(x_t[i]);
      const float v_r = u_r + ks * (static_cast<float>(tc[i]) - u_r);
      const float v_f = u_f + kf * (static_cast<float>(fc[i]) - u_f);
      const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
      acc += d * ((y_r - static_cast<float>(x_g[i])) - alpha * d);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b * chunks + chunk] = acc;
}

template <typename scalar_t>
__global__ void generator_backward_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ x_g,
                                          const scalar_t* __restrict__ tu, const scalar_t* __restrict__ tc,
                                          const scalar_t* __restrict__ fu, const scalar_t* __restrict__ fc,
                                          const float* __restrict__ t, const float* __restrict__ coef,
                                          scalar_t* __restrict__ gx, scalar_t* __restrict__ gg,
                                          scalar_t* __restrict__ gtu, scalar_t* __restrict__ gtc,
                                          scalar_t* __restrict__ gfu, scalar_t* __restrict__ gfc,
                                          float* __restrict__ partial_t, float* __restrict__ partial_sum, int64_t n,
                                          float ks, float kf, float alpha) {
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x, base = b * n;
  const float time = t[b], c = coef[b];
  float acc_t = 0.0f, acc_sum = 0.0f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = chunk * CHUNK + k * THREADS + threadIdx.x;
    if (j < n) {
      const int64_t i = base + j;
      const float u_r = static_cast<float>(tu[i]), u_f = static_cast<float>(fu[i]), xt = static_cast<float>(x_t[i]);
      const float v_r = u_r + ks * (static_cast<float>(tc[i]) - u_r);
      const float v_f = u_f + kf * (static_cast<float>(fc[i]) - u_f);
      const float y_r = xt - time * v_r, y_f = xt - time * v_f, d = y_r - y_f;
      const float gap = y_r - static_cast<float>(x_g[i]);
      const float g_yr = c * (gap + (1.0f - 2.0f * alpha) * d), g_yf = c * (2.0f * alpha * d - gap);
      const float g_vr = -time * g_yr, g_vf = -time * g_yf;
      gx[i] = static_cast<scalar_t>(g_yr + g_yf);
      gg[i] = static_cast<scalar_t>(-c * d);
      gtu[i] = static_cast<scalar_t>(g_vr - ks * g_vr);
      gtc[i] = static_cast<scalar_t>(ks * g_vr);
      gfu[i] = static_cast<scalar_t>(g_vf - kf * g_vf);
      gfc[i] = static_cast<scalar_t>(kf * g_vf);
      acc_t += -(v_r * g_yr + v_f * g_yf);
      acc_sum += d * (gap - alpha * d);
    }
  }
  acc_t = block_sum(acc_t);
  if (threadIdx.x == 0) partial_t[b * chunks + chunk] = acc_t;
  acc_sum = block_sum(acc_sum);
  if (threadIdx.x == 0) partial_sum[b * chunks + chunk] = acc_sum;
}

template <typename scalar_t>
__global__ void fake_forward_kernel(const scalar_t* __restrict__ vu, const scalar_t* __restrict__ vc,
                                    const scalar_t* __restrict__ x_g, const scalar_t* __restrict__ noise,
                                    float* __restrict__ partial, int64_t n, float scale) {
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x, base = b * n;
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = chunk * CHUNK + k * THREADS + threadIdx.x;
    if (j < n) {
      const int64_t i = base + j;
      const float u = static_cast<float>(vu[i]);
      const float r = (u + scale * (static_cast<float>(vc[i]) - u)) -
                      (static_cast<float>(noise[i]) - static_cast<float>(x_g[i]));
      acc += r * r;
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b * chunks + chunk] = acc;
}

template <typename scalar_t>
__global__ void fake_backward_kernel(const scalar_t* __restrict__ vu, const scalar_t* __restrict__ vc,
                                     const scalar_t* __restrict__ x_g, const scalar_t* __restrict__ noise,
                                     const float* __restrict__ grad, scalar_t* __restrict__ gu,
                                     scalar_t* __restrict__ gc, scalar_t* __restrict__ gg,
                                     scalar_t* __restrict__ gn, int64_t n, float scale) {
  const int64_t b = blockIdx.y, chunk = blockIdx.x, base = b * n;
  const float g = grad[b];
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t j = chunk * CHUNK + k * THREADS + threadIdx.x;
    if (j < n) {
      const int64_t i = base + j;
      const float u = static_cast<float>(vu[i]);
      const float r = (u + scale * (static_cast<float>(vc[i]) - u)) -
                      (static_cast<float>(noise[i]) - static_cast<float>(x_g[i]));
      const float g_r = 2.0f * g * r;
      gu[i] = static_cast<scalar_t>(g_r - scale * g_r);
      gc[i] = static_cast<scalar_t>(scale * g_r);
      gg[i] = static_cast<scalar_t>(g_r);
      gn[i] = static_cast<scalar_t>(-g_r);
    }
  }
}

void check_cuda(const std::vector<at::Tensor>& tensors) {
  const auto& first = tensors[0];
  for (const auto& tensor : tensors) {
    TORCH_CHECK(tensor.is_cuda() && tensor.device() == first.device(), "sid_fast_cpp (CUDA): tensors on one GPU expected");
    TORCH_CHECK(tensor.sizes() == first.sizes() && tensor.scalar_type() == first.scalar_type() && tensor.is_contiguous(),
                "sid_fast_cpp (CUDA): latents must share shape and dtype and be contiguous");
  }
}

dim3 grid_for(int64_t batch, int64_t n) { return dim3(static_cast<unsigned>((n + CHUNK - 1) / CHUNK), static_cast<unsigned>(batch)); }

at::Tensor generator_forward_cuda(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu, const at::Tensor& tc,
                                  const at::Tensor& fu, const at::Tensor& fc, const at::Tensor& t, double ks, double kf,
                                  double alpha) {
  check_cuda({x_t, x_g, tu, tc, fu, fc});
  const c10::cuda::CUDAGuard guard(x_t.device());
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch;
  const dim3 grid = grid_for(batch, n);
  auto partial = at::empty({batch, static_cast<int64_t>(grid.x)}, x_t.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_forward_cuda", [&] {
    generator_forward_kernel<scalar_t><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        x_t.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), tu.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(),
        fu.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(), t.data_ptr<float>(), partial.data_ptr<float>(), n, ks, kf, alpha);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1);
}

std::vector<at::Tensor> generator_backward_cuda(const at::Tensor& x_t, const at::Tensor& x_g, const at::Tensor& tu,
                                                const at::Tensor& tc, const at::Tensor& fu, const at::Tensor& fc,
                                                const at::Tensor& t, const at::Tensor& coef, double ks, double kf,
                                                double alpha) {
  check_cuda({x_t, x_g, tu, tc, fu, fc});
  const c10::cuda::CUDAGuard guard(x_t.device());
  const int64_t batch = x_t.size(0), n = x_t.numel() / batch;
  const dim3 grid = grid_for(batch, n);
  std::vector<at::Tensor> grads;
  for (int k = 0; k < 6; ++k) grads.push_back(at::empty_like(x_t));
  auto partial_t = at::empty({batch, static_cast<int64_t>(grid.x)}, x_t.options().dtype(at::kFloat));
  auto partial_sum = at::empty_like(partial_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "generator_backward_cuda", [&] {
    generator_backward_kernel<scalar_t><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        x_t.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), tu.data_ptr<scalar_t>(), tc.data_ptr<scalar_t>(),
        fu.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(), t.data_ptr<float>(), coef.data_ptr<float>(),
        grads[0].data_ptr<scalar_t>(), grads[1].data_ptr<scalar_t>(), grads[2].data_ptr<scalar_t>(),
        grads[3].data_ptr<scalar_t>(), grads[4].data_ptr<scalar_t>(), grads[5].data_ptr<scalar_t>(),
        partial_t.data_ptr<float>(), partial_sum.data_ptr<float>(), n, ks, kf, alpha);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grads.push_back(partial_t.sum(1));
  grads.push_back(partial_sum.sum(1));
  return grads;
}

at::Tensor fake_forward_cuda(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g, const at::Tensor& noise,
                             double scale) {
  check_cuda({vu, vc, x_g, noise});
  const c10::cuda::CUDAGuard guard(vu.device());
  const int64_t batch = vu.size(0), n = vu.numel() / batch;
  const dim3 grid = grid_for(batch, n);
  auto partial = at::empty({batch, static_cast<int64_t>(grid.x)}, vu.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_forward_cuda", [&] {
    fake_forward_kernel<scalar_t><<<grid, THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        vu.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
        partial.data_ptr<float>(), n, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(1);
}

std::vector<at::Tensor> fake_backward_cuda(const at::Tensor& vu, const at::Tensor& vc, const at::Tensor& x_g,
                                           const at::Tensor& noise, const at::Tensor& grad, double scale) {
  check_cuda({vu, vc, x_g, noise});
  const c10::cuda::CUDAGuard guard(vu.device());
  const int64_t batch = vu.size(0), n = vu.numel() / batch;
  std::vector<at::Tensor> grads;
  for (int k = 0; k < 4; ++k) grads.push_back(at::empty_like(vu));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vu.scalar_type(), "fake_backward_cuda", [&] {
    fake_backward_kernel<scalar_t><<<grid_for(batch, n), THREADS, 0, at::cuda::getCurrentCUDAStream()>>>(
        vu.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), x_g.data_ptr<scalar_t>(), noise.data_ptr<scalar_t>(),
        grad.data_ptr<float>(), grads[0].data_ptr<scalar_t>(), grads[1].data_ptr<scalar_t>(),
        grads[2].data_ptr<scalar_t>(), grads[3].data_ptr<scalar_t>(), n, scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(sid_fast_cpp, CUDA, m) {
  m.impl("generator_forward", &generator_forward_cuda);
  m.impl("generator_backward", &generator_backward_cuda);
  m.impl("fake_forward", &fake_forward_cuda);
  m.impl("fake_backward", &fake_backward_cuda);
}

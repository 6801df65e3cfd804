// CUDA fused BatchNorm + ReLU + global average pool (SPEC section 4). x is (B, C, HW) contiguous.
//   statistics: one block per channel, two passes (mean, then centred squares), deterministic reductions
//   forward:    one warp per (b, c): out = 1/HW sum_hw relu(x * scale + shift), scale = w invstd,
//               shift = bias - mean * scale; the BN and ReLU outputs are never written
//   backward:   one block per channel: dy = g/HW [y > 0]; d bias = sum dy; d w = sum dy xhat;
//               dx = scale (dy - [training] (d bias + xhat d w) / N)
// The running-statistic update (as nn.BatchNorm2d: momentum, unbiased variance) is a few (C,) tensor ops.
#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512) channel_moments_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                                       acc_t* __restrict__ var, int64_t B, int64_t C, int64_t HW) {
  __shared__ acc_t ws[kWarp];
  const int64_t c = blockIdx.x, N = B * HW;
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += acc_t(x[((i / HW) * C + c) * HW + i % HW]);
  const acc_t mu = block_sum1(s, ws) / acc_t(N);
  acc_t q = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    acc_t d = acc_t(x[((i / HW) * C + c) * HW + i % HW]) - mu;
    q += d * d;
  }
  q = block_sum1(q, ws);
  if (threadIdx.x == 0) {
    mean[c] = mu;
    var[c] = q / acc_t(N);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_relu_pool_fwd_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
                                        const acc_t* __restrict__ bias, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ invstd, scalar_t* __restrict__ out, int64_t B,
                                        int64_t C, int64_t HW) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;  // (b, c) flattened
  const int lane = threadIdx.x % kWarp;
  if (row >= B * C) return;  // whole warps exit together
  const int64_t c = row % C;
  const acc_t scale = weight[c] * invstd[c], shift = bias[c] - mean[c] * scale;
  const scalar_t* p = x + row * HW;
  acc_t s = 0;
  for (int64_t k = lane; k < HW; k += kWarp) s += max(acc_t(p[k]) * scale + shift, acc_t(0));
  s = warp_sum(s);
  if (lane == 0) out[row] = scalar_t(s / acc_t(HW));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512) bn_relu_pool_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                                        const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                        scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_weight,
                                        acc_t* __restrict__ grad_bias, int64_t B, int64_t C, int64_t HW,
                                        bool training) {
  __shared__ acc_t ws[2 * kWarp];
  const int64_t c = blockIdx.x, N = B * HW;
  const acc_t mu = mean[c], is = invstd[c];
  const acc_t scale = weight[c] * is, shift = bias[c] - mu * scale, inv_hw = acc_t(1) / acc_t(HW);
  acc_t r[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t b = i / HW, idx = (b * C + c) * HW + i % HW;
    const acc_t v = acc_t(x[idx]);
    const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[b * C + c]) * inv_hw : acc_t(0);
    r[0] += dy;
    r[1] += dy * (v - mu) * is;
  }
  block_sum<2>(r, ws);
  if (threadIdx.x == 0) {
    grad_bias[c] = r[0];
    grad_weight[c] = r[1];
  }
  const acc_t mb = training ? r[0] / acc_t(N) : acc_t(0), mw = training ? r[1] / acc_t(N) : acc_t(0);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t b = i / HW, idx = (b * C + c) * HW + i % HW;
    const acc_t v = acc_t(x[idx]);
    const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[b * C + c]) * inv_hw : acc_t(0);
    grad_x[idx] = scalar_t(scale * (dy - mb - (v - mu) * is * mw));
  }
}

int reduce_threads(int64_t N) { return N >= 4096 ? 512 : N >= 1024 ? 256 : 128; }

}  // namespace

Tensor3 bn_relu_pool_fwd(HCD_BN_FWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "bn_relu_pool: x must be a CUDA (B, C, H, W) tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = compute_dtype({x.scalar_type(), weight.scalar_type(), bias.scalar_type()});
  const Tensor xc = (dt == at::kDouble ? x.to(dt) : x).contiguous();
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  const Tensor w = weight.to(dt).contiguous(), bb = bias.to(dt).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor mean, invstd;
  Tensor out = at::empty({B, C}, xc.options());
  if (B * C == 0) return {out.to(x.scalar_type()), at::zeros({C}, w.options()), at::ones({C}, w.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_bn_relu_pool_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(at::CppTypeToScalarType<acc_t>::value == dt, "bn_relu_pool: fp64 parameters need fp64 x");
    if (training) {
      TORCH_CHECK(B * HW > 1, "bn_relu_pool: expected more than 1 value per channel when training, got input of size ",
                  x.sizes());
      mean = at::empty({C}, w.options());
      Tensor var = at::empty({C}, w.options());
      channel_moments_kernel<scalar_t, acc_t><<<C, reduce_threads(B * HW), 0, stream>>>(
          xc.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), B, C, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      invstd = bn_update_running_stats(mean, var, running_mean, running_var, B * HW, momentum, eps, dt);
    } else {
      std::tie(mean, invstd) = bn_eval_stats(running_mean, running_var, eps, dt);
    }
    const int threads = 256;
    const int64_t blocks = (B * C * kWarp + threads - 1) / threads;
    bn_relu_pool_fwd_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, C, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.to(x.scalar_type()), mean, invstd};
}

Tensor3 bn_relu_pool_bwd(HCD_BN_BWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = save_mean.scalar_type();
  const Tensor xc = (dt == at::kDouble ? x.to(dt) : x).contiguous();
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  const Tensor w = weight.to(dt).contiguous(), bb = bias.to(dt).contiguous();
  const Tensor g = grad_out.to(xc.scalar_type()).contiguous();
  const Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  Tensor gx = at::empty_like(xc), gw = at::empty({C}, w.options()), gb = at::empty({C}, w.options());
  if (B * C == 0) return {gx.to(x.scalar_type()).contiguous(grad_x_format(x)), gw.zero_().to(weight.scalar_type()), gb.zero_().to(bias.scalar_type())};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_bn_relu_pool_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(at::CppTypeToScalarType<acc_t>::value == dt, "bn_relu_pool: fp64 parameters need fp64 x");
    bn_relu_pool_bwd_kernel<scalar_t, acc_t><<<C, reduce_threads(B * HW), 0, stream>>>(
        g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(),
        mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), gw.data_ptr<acc_t>(),
        gb.data_ptr<acc_t>(), B, C, HW, training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // grad_x: dense in x's memory format (the op contract, hcd_fast/ops/bn_relu_pool.py).
  return {gx.to(x.scalar_type()).contiguous(grad_x_format(x)), gw.to(weight.scalar_type()),
          gb.to(bias.scalar_type())};
}

}  // namespace hcd_fast::cuda

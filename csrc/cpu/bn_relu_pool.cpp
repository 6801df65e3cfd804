// CPU entry of the fused BatchNorm + ReLU + GAP: statistics, running-stat update (as nn.BatchNorm2d:
// momentum update with the unbiased batch variance), and the parallel loop over channels.
// The per-element math is in bn_relu_pool_kernel.h.
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace hcd_fast::cpu {

namespace {
// Runs f(c0, c1) over all channels in parallel. HW == 1 uses whole kHw1Block channel blocks (the vectorised
// across-channel kernels), so a channel's code path, hence its result, never depends on the thread count.
template <typename F>
void for_channels(int64_t B, int64_t C, int64_t HW, const F& f) {
  if (HW == 1) {
    const int64_t blocks = (C + kHw1Block - 1) / kHw1Block;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(B * kHw1Block, 1));
    at::parallel_for(0, blocks, grain, [&](int64_t j0, int64_t j1) {
      f(j0 * kHw1Block, std::min(j1 * kHw1Block, C));
    });
  } else {
    at::parallel_for(0, C, std::max<int64_t>(1, 32768 / std::max<int64_t>(B * HW, 1)), f);
  }
}
}  // namespace

Tensor3 bn_relu_pool_fwd(HCD_BN_FWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.dim() == 4, "bn_relu_pool: x must be (B, C, H, W)");
  const auto dt = compute_dtype({x.scalar_type(), weight.scalar_type(), bias.scalar_type()});
  const Tensor xc = x.to(dt).contiguous();
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  const Tensor w = weight.to(dt).contiguous(), b = bias.to(dt).contiguous();
  const bool hw1 = HW == 1;
  Tensor mean, invstd;
  if (training) {
    TORCH_CHECK(B * HW > 1, "bn_relu_pool: expected more than 1 value per channel when training, got input of size ",
                x.sizes());
    mean = at::empty({C}, xc.options());
    Tensor var = at::empty({C}, xc.options());
    for_channels(B, C, HW, [&](int64_t c0, int64_t c1) {
      const KernelTable& k = kernels();
      if (dt == at::kDouble) {
        if (hw1) k.channel_moments_hw1_d(xc.data_ptr<double>(), B, C, mean.data_ptr<double>(), var.data_ptr<double>(), c0, c1);
        else k.channel_moments_d(xc.data_ptr<double>(), B, C, HW, mean.data_ptr<double>(), var.data_ptr<double>(), c0, c1);
      } else {
        if (hw1) k.channel_moments_hw1_f(xc.data_ptr<float>(), B, C, mean.data_ptr<float>(), var.data_ptr<float>(), c0, c1);
        else k.channel_moments_f(xc.data_ptr<float>(), B, C, HW, mean.data_ptr<float>(), var.data_ptr<float>(), c0, c1);
      }
    });
    invstd = bn_update_running_stats(mean, var, running_mean, running_var, B * HW, momentum, eps, dt);
  } else {
    std::tie(mean, invstd) = bn_eval_stats(running_mean, running_var, eps, dt);
  }
  Tensor out = at::empty({B, C}, xc.options());
  for_channels(B, C, HW, [&](int64_t c0, int64_t c1) {
    auto go = [&](auto tag) {
      using T = decltype(tag);
      BnReluPoolArgs<T> a{};
      a.x = xc.data_ptr<T>(), a.weight = w.data_ptr<T>(), a.bias = b.data_ptr<T>();
      a.mean = mean.data_ptr<T>(), a.invstd = invstd.data_ptr<T>(), a.out = out.data_ptr<T>();
      a.B = B, a.C = C, a.HW = HW, a.training = training;
      const KernelTable& k = kernels();
      if constexpr (std::is_same_v<T, float>) (hw1 ? k.bn_relu_pool_fwd_hw1_f : k.bn_relu_pool_fwd_f)(a, c0, c1);
      else (hw1 ? k.bn_relu_pool_fwd_hw1_d : k.bn_relu_pool_fwd_d)(a, c0, c1);
    };
    if (dt == at::kDouble) go(double{});
    else go(float{});
  });
  return {out.to(x.scalar_type()), mean, invstd};
}

Tensor3 bn_relu_pool_bwd(HCD_BN_BWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = save_mean.scalar_type();
  const Tensor xc = x.to(dt).contiguous();
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  const Tensor w = weight.to(dt).contiguous(), b = bias.to(dt).contiguous();
  const Tensor g = grad_out.to(dt).contiguous();
  const Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  Tensor gx = at::empty_like(xc), gw = at::empty({C}, xc.options()), gb = at::empty({C}, xc.options());
  const bool hw1 = HW == 1;
  for_channels(B, C, HW, [&](int64_t c0, int64_t c1) {
    auto go = [&](auto tag) {
      using T = decltype(tag);
      BnReluPoolArgs<T> a{};
      a.x = xc.data_ptr<T>(), a.weight = w.data_ptr<T>(), a.bias = b.data_ptr<T>();
      a.mean = mean.data_ptr<T>(), a.invstd = invstd.data_ptr<T>();
      a.grad_out = g.data_ptr<T>(), a.grad_x = gx.data_ptr<T>();
      a.grad_weight = gw.data_ptr<T>(), a.grad_bias = gb.data_ptr<T>();
      a.B = B, a.C = C, a.HW = HW, a.training = training;
      const KernelTable& k = kernels();
      if constexpr (std::is_same_v<T, float>) (hw1 ? k.bn_relu_pool_bwd_hw1_f : k.bn_relu_pool_bwd_f)(a, c0, c1);
      else (hw1 ? k.bn_relu_pool_bwd_hw1_d : k.bn_relu_pool_bwd_d)(a, c0, c1);
    };
    if (dt == at::kDouble) go(double{});
    else go(float{});
  });
  // grad_x: dense in x's memory format (the op contract, hcd_fast/ops/bn_relu_pool.py).
  return {gx.to(x.scalar_type()).contiguous(grad_x_format(x)), gw.to(weight.scalar_type()),
          gb.to(bias.scalar_type())};
}

}  // namespace hcd_fast::cpu

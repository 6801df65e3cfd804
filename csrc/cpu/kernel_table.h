// Instantiates every CPU kernel body under the current CPU_CAPABILITY and collects them in a table.
#pragma once
#include "cpu/bn_relu_pool_kernel.h"
#include "cpu/kernels.h"
#include "cpu/sub_logit_loss_kernel.h"

namespace hcd_fast::cpu::CPU_CAPABILITY {
inline KernelTable make_table(const char* name) {
  KernelTable t;
  t.sub_logit_loss_samples_f = &sub_logit_loss_samples_kernel<float>;
  t.sub_logit_loss_samples_d = &sub_logit_loss_samples_kernel<double>;
  t.sub_logit_loss_rows_f = &sub_logit_loss_rows_kernel<float>;
  t.sub_logit_loss_rows_d = &sub_logit_loss_rows_kernel<double>;
  t.sub_logit_loss_bwd_f = &sub_logit_loss_bwd_kernel<float>;
  t.sub_logit_loss_bwd_d = &sub_logit_loss_bwd_kernel<double>;
  t.channel_moments_f = &channel_moments_kernel<float>;
  t.channel_moments_d = &channel_moments_kernel<double>;
  t.bn_relu_pool_fwd_f = &bn_relu_pool_fwd_kernel<float>;
  t.bn_relu_pool_fwd_d = &bn_relu_pool_fwd_kernel<double>;
  t.bn_relu_pool_bwd_f = &bn_relu_pool_bwd_kernel<float>;
  t.bn_relu_pool_bwd_d = &bn_relu_pool_bwd_kernel<double>;
  t.channel_moments_hw1_f = &channel_moments_hw1_kernel<float>;
  t.channel_moments_hw1_d = &channel_moments_hw1_kernel<double>;
  t.bn_relu_pool_fwd_hw1_f = &bn_relu_pool_fwd_hw1_kernel<float>;
  t.bn_relu_pool_fwd_hw1_d = &bn_relu_pool_fwd_hw1_kernel<double>;
  t.bn_relu_pool_bwd_hw1_f = &bn_relu_pool_bwd_hw1_kernel<float>;
  t.bn_relu_pool_bwd_hw1_d = &bn_relu_pool_bwd_hw1_kernel<double>;
  t.name = name;
  return t;
}
}  // namespace hcd_fast::cpu::CPU_CAPABILITY

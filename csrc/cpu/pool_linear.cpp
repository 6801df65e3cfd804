// CPU pool_linear: GAP(conv1x1(x) + b) computed as W @ mean_hw(x) + b (exact: both maps are linear), so the
// H*W-times larger conv output is never formed. The GEMM goes to ATen's BLAS.
#include "ops.h"

namespace hcd_fast::cpu {

Tensor2 pool_linear(HCD_POOL_LINEAR_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dt = compute_dtype({x.scalar_type(), weight.scalar_type(), bias.scalar_type()});
  const Tensor pooled = x.to(dt).mean({2, 3});                                   // (B, C)
  const Tensor out = at::addmm(bias.to(dt), pooled, weight.to(dt).t());          // (B, D)
  return {out.to(x.scalar_type()), pooled};
}

}  // namespace hcd_fast::cpu

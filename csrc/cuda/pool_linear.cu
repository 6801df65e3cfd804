// CUDA pool_linear: GAP(conv1x1(x) + b) = W mean_hw(x) + b (exact: both maps are linear). A warp per (b, c)
// pools in fp32 (the H*W-times larger conv output is never formed), then one cuBLAS GEMM (through ATen, on
// the current stream) applies W and the bias.
#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void spatial_mean_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ pooled, int64_t rows,
                                    int64_t HW) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const scalar_t* p = x + row * HW;
  acc_t s = 0;
  for (int64_t k = lane; k < HW; k += kWarp) s += acc_t(p[k]);
  s = warp_sum(s);
  if (lane == 0) pooled[row] = s / acc_t(HW);
}

}  // namespace

Tensor2 pool_linear(HCD_POOL_LINEAR_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "pool_linear: x must be a CUDA (B, C, H, W) tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = compute_dtype({x.scalar_type(), weight.scalar_type(), bias.scalar_type()});
  const Tensor xc = (dt == at::kDouble ? x.to(dt) : x).contiguous();
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  Tensor pooled = at::empty({B, C}, xc.options().dtype(dt));
  if (B * C > 0) {
    const int threads = 256;
    const int64_t blocks = (B * C * kWarp + threads - 1) / threads;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_pool_linear", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      spatial_mean_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          xc.data_ptr<scalar_t>(), pooled.data_ptr<acc_t>(), B * C, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    pooled.zero_();
  }
  const Tensor out = at::addmm(bias.to(dt), pooled, weight.to(dt).t());
  return {out.to(x.scalar_type()), pooled};
}

}  // namespace hcd_fast::cuda

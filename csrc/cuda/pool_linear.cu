// CUDA pool_linear: GAP(conv1x1(x) + b) = W mean_hw(x) + b (exact: both maps are linear). The spatial mean is
// taken in fp32 (fp64 for fp64) straight from x in its memory format (the H*W-times larger conv output is
// never formed, x is never copied): NCHW-contiguous x, one warp per (b, c) row of HW values; channels_last x,
// channels_last_pool_kernel (a block per (b, 32-channel tile), coalesced over C). Other strides are copied to
// NCHW. Then one cuBLAS GEMM (through ATen, on the current stream) applies W and the bias.
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
  const auto read = map_layout(dt == at::kDouble ? x.to(dt) : x);  // .to keeps the memory format
  const Tensor& xc = read.first;
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3);
  Tensor pooled = at::empty({B, C}, xc.options().dtype(dt));
  if (B * C > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_pool_linear", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      if (read.second == MapLayout::NCHW) {
        const int threads = 256;
        const int64_t blocks = (B * C * kWarp + threads - 1) / threads;
        spatial_mean_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
            xc.data_ptr<scalar_t>(), pooled.data_ptr<acc_t>(), B * C, HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        launch_channels_last_pool<false, scalar_t, acc_t, acc_t>(xc.data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                                                                 nullptr, pooled.data_ptr<acc_t>(), B, C, HW, stream);
      }
    });
  } else {
    pooled.zero_();
  }
  const Tensor out = at::addmm(bias.to(dt), pooled, weight.to(dt).t());
  return {out.to(x.scalar_type()), pooled};
}

}  // namespace hcd_fast::cuda

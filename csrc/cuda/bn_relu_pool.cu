// CUDA fused BatchNorm + ReLU + global average pool (SPEC section 4). x is (B, C, H, W), read in place in
// either memory format (see map_layout in common.cuh): NCHW-contiguous, or channels_last (NHWC, the trainer's
// default on CUDA), never copied; any other strides are copied to NCHW first.
//   statistics: two passes (mean, then centred squares), deterministic reductions
//               NCHW: one block per channel;  NHWC: per-(row chunk, channel tile) partials, then one thread
//               per channel adds the partials in chunk order
//   forward:    out = 1/HW sum_hw relu(x * scale + shift), scale = w invstd, shift = bias - mean * scale;
//               NCHW: one warp per (b, c);  NHWC: channels_last_pool_kernel (a block per (b, channel tile));
//               the BN and ReLU outputs are never written
//   backward:   dy = g/HW [y > 0]; d bias = sum dy; d w = sum dy xhat; dx = scale (dy - [training] (d bias +
//               xhat d w) / N); NCHW: one block per channel; NHWC: partials and totals as for the statistics,
//               then an elementwise dx pass; dx has x's memory format
// No per-element 64-bit division: flat indices advance with FlatCursor, NHWC rows are the flat (b, hw) index.
// The running-statistic update (as nn.BatchNorm2d: momentum, unbiased variance) and invstd: one small kernel
// (running_stats_kernel; the same arithmetic as bn_update_running_stats in ops.h, which took ~8 ATen launches).
#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

// ---- NCHW: x[(b * C + c) * HW + hw] --------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(512) channel_moments_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ mean,
                                       acc_t* __restrict__ var, int64_t B, int64_t C, int64_t HW) {
  __shared__ acc_t ws[kWarp];
  const int64_t c = blockIdx.x, N = B * HW;
  acc_t s = 0;
  FlatCursor p(threadIdx.x, blockDim.x, HW);  // (p.b, p.j) = divmod(i, HW)
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x, p.advance()) s += acc_t(x[(p.b * C + c) * HW + p.j]);
  const acc_t mu = block_sum1(s, ws) / acc_t(N);
  acc_t q = 0;
  FlatCursor p2(threadIdx.x, blockDim.x, HW);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x, p2.advance()) {
    acc_t d = acc_t(x[(p2.b * C + c) * HW + p2.j]) - mu;
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
  const int64_t c = row % C;  // once per thread
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
  FlatCursor p(threadIdx.x, blockDim.x, HW);  // (p.b, p.j) = divmod(i, HW)
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x, p.advance()) {
    const int64_t idx = (p.b * C + c) * HW + p.j;
    const acc_t v = acc_t(x[idx]);
    const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[p.b * C + c]) * inv_hw : acc_t(0);
    r[0] += dy;
    r[1] += dy * (v - mu) * is;
  }
  block_sum<2>(r, ws);
  if (threadIdx.x == 0) {
    grad_bias[c] = r[0];
    grad_weight[c] = r[1];
  }
  const acc_t mb = training ? r[0] / acc_t(N) : acc_t(0), mw = training ? r[1] / acc_t(N) : acc_t(0);
  FlatCursor p2(threadIdx.x, blockDim.x, HW);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x, p2.advance()) {
    const int64_t idx = (p2.b * C + c) * HW + p2.j;
    const acc_t v = acc_t(x[idx]);
    const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[p2.b * C + c]) * inv_hw : acc_t(0);
    grad_x[idx] = scalar_t(scale * (dy - mb - (v - mu) * is * mw));
  }
}

int reduce_threads(int64_t N) { return N >= 4096 ? 512 : N >= 1024 ? 256 : 128; }

// ---- NHWC: x[r * C + c], r = b * HW + hw in [0, N), N = B * HW ------------------------------------------
// Grid (R, ceil(C / kTileC)) with R = ceil(N / chunk) row chunks, block (kTileC, kTileR); partial sums go to
// partial[k][chunk index][c] and column_total_kernel adds them in chunk order.

// partial[blockIdx.x][c] = sum over the chunk's rows of x (center == nullptr) or of (x - center[c])^2.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileC * kTileR)
    nhwc_moments_partial_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ center,
                                acc_t* __restrict__ partial, int64_t N, int64_t C, int64_t chunk) {
  __shared__ acc_t red[kTileR][kTileC];
  const int64_t c = int64_t(blockIdx.y) * kTileC + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * chunk, r1 = r0 + chunk < N ? r0 + chunk : N;
  acc_t s = 0;
  if (c < C) {
    const acc_t mu = center != nullptr ? center[c] : acc_t(0);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileR) {
      const acc_t v = acc_t(x[r * C + c]);
      if (center != nullptr) {
        const acc_t d = v - mu;
        s += d * d;
      } else {
        s += v;
      }
    }
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = 0;
#pragma unroll
    for (int k = 0; k < kTileR; ++k) t += red[k][threadIdx.x];
    partial[int64_t(blockIdx.x) * C + c] = t;
  }
}

// partial[0][chunk][c] = sum dy, partial[1][chunk][c] = sum dy xhat over the chunk's rows (R = gridDim.x).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileC * kTileR)
    nhwc_bwd_partial_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                            const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                            const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                            acc_t* __restrict__ partial, int64_t N, int64_t C, int64_t HW, int64_t chunk) {
  __shared__ acc_t red[2][kTileR][kTileC];
  const int64_t c = int64_t(blockIdx.y) * kTileC + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * chunk, r1 = r0 + chunk < N ? r0 + chunk : N;
  acc_t s0 = 0, s1 = 0;
  if (c < C) {
    const acc_t mu = mean[c], is = invstd[c];
    const acc_t scale = weight[c] * is, shift = bias[c] - mu * scale, inv_hw = acc_t(1) / acc_t(HW);
    FlatCursor p(r0 + threadIdx.y, kTileR, HW);  // p.b = sample of row r
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileR, p.advance()) {
      const acc_t v = acc_t(x[r * C + c]);
      const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[p.b * C + c]) * inv_hw : acc_t(0);
      s0 += dy;
      s1 += dy * (v - mu) * is;
    }
  }
  red[0][threadIdx.y][threadIdx.x] = s0;
  red[1][threadIdx.y][threadIdx.x] = s1;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t0 = 0, t1 = 0;
#pragma unroll
    for (int k = 0; k < kTileR; ++k) {
      t0 += red[0][k][threadIdx.x];
      t1 += red[1][k][threadIdx.x];
    }
    partial[int64_t(blockIdx.x) * C + c] = t0;
    partial[(int64_t(gridDim.x) + blockIdx.x) * C + c] = t1;
  }
}

// out[c] = (sum_{k < R} partial[k][c]) / count, k in increasing order (one thread per channel, coalesced).
template <typename acc_t>
__global__ void column_total_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t R,
                                    int64_t C, acc_t count) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  acc_t t = 0;
  for (int64_t k = 0; k < R; ++k) t += partial[k * C + c];
  out[c] = t / count;
}

// grad_x[r * C + c] = scale (dy - mb - xhat mw), mb = [training] d bias / N, mw = [training] d w / N.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileC * kTileR)
    nhwc_bwd_dx_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                       const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                       const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                       const acc_t* __restrict__ grad_weight, const acc_t* __restrict__ grad_bias,
                       scalar_t* __restrict__ grad_x, int64_t N, int64_t C, int64_t HW, int64_t chunk,
                       bool training) {
  const int64_t c = int64_t(blockIdx.y) * kTileC + threadIdx.x;
  if (c >= C) return;  // no shared memory, no barrier
  const int64_t r0 = int64_t(blockIdx.x) * chunk, r1 = r0 + chunk < N ? r0 + chunk : N;
  const acc_t mu = mean[c], is = invstd[c];
  const acc_t scale = weight[c] * is, shift = bias[c] - mu * scale, inv_hw = acc_t(1) / acc_t(HW);
  const acc_t mb = training ? grad_bias[c] / acc_t(N) : acc_t(0), mw = training ? grad_weight[c] / acc_t(N) : acc_t(0);
  FlatCursor p(r0 + threadIdx.y, kTileR, HW);  // p.b = sample of row r
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kTileR, p.advance()) {
    const acc_t v = acc_t(x[r * C + c]);
    const acc_t dy = v * scale + shift > acc_t(0) ? acc_t(grad_out[p.b * C + c]) * inv_hw : acc_t(0);
    grad_x[r * C + c] = scalar_t(scale * (dy - mb - (v - mu) * is * mw));
  }
}

// Grid of the NHWC row-chunk kernels; R = number of chunks.
dim3 nhwc_grid(int64_t R, int64_t C) {
  TORCH_CHECK(C <= kMaxTiledChannels, "bn_relu_pool: at most ", kMaxTiledChannels, " channels, got ", C);
  return dim3(unsigned(R), unsigned((C + kTileC - 1) / kTileC));
}

template <typename acc_t>
void launch_column_total(const acc_t* partial, acc_t* out, int64_t R, int64_t C, int64_t count, cudaStream_t stream) {
  const int threads = 256;
  column_total_kernel<acc_t><<<unsigned((C + threads - 1) / threads), threads, 0, stream>>>(partial, out, R, C,
                                                                                            acc_t(count));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// running <- (1 - momentum) running + momentum * batch statistic (the variance unbiased), computed in acc_t and
// rounded once into the statistics' dtype, and invstd = 1 / sqrt(var + eps): one launch for every channel. The
// scalars come in as the ATen form (ops.h: bn_update_running_stats) rounds them: 1 - momentum and
// momentum * unbias formed in double, then cast.
template <typename stat_t, typename acc_t>
__global__ void running_stats_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                                     stat_t* __restrict__ running_mean, stat_t* __restrict__ running_var,
                                     acc_t* __restrict__ invstd, int64_t C, acc_t keep, acc_t momentum,
                                     acc_t momentum_unbias, acc_t eps) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  running_mean[c] = stat_t(acc_t(running_mean[c]) * keep + mean[c] * momentum);
  running_var[c] = stat_t(acc_t(running_var[c]) * keep + var[c] * momentum_unbias);
  invstd[c] = acc_t(1) / sqrt(var[c] + eps);
}

// The training-mode update of running_mean/running_var and invstd (see running_stats_kernel); the ATen form for
// statistics that are not dense vectors.
Tensor update_running_stats(const Tensor& mean, const Tensor& var, Tensor& running_mean, Tensor& running_var,
                            int64_t count, double momentum, double eps, at::ScalarType dt, cudaStream_t stream) {
  if (!running_mean.is_contiguous() || !running_var.is_contiguous() ||
      running_mean.scalar_type() != running_var.scalar_type())
    return bn_update_running_stats(mean, var, running_mean, running_var, count, momentum, eps, dt);
  const int64_t C = mean.numel();
  Tensor invstd = at::empty_like(mean);
  if (C == 0) return invstd;
  const double unbias = double(count) / double(count - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "hcd_fast_bn_running_stats", [&] {
    using stat_t = scalar_t;
    const int threads = 256;
    const unsigned blocks = unsigned((C + threads - 1) / threads);
    auto launch = [&](auto zero) {
      using acc_t = decltype(zero);
      running_stats_kernel<stat_t, acc_t><<<blocks, threads, 0, stream>>>(
          mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), running_mean.data_ptr<stat_t>(),
          running_var.data_ptr<stat_t>(), invstd.data_ptr<acc_t>(), C, acc_t(1.0 - momentum), acc_t(momentum),
          acc_t(momentum * unbias), acc_t(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dt == at::kDouble)
      launch(double(0));
    else
      launch(float(0));
  });
  return invstd;
}

}  // namespace

Tensor3 bn_relu_pool_fwd(HCD_BN_FWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "bn_relu_pool: x must be a CUDA (B, C, H, W) tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = compute_dtype({x.scalar_type(), weight.scalar_type(), bias.scalar_type()});
  const auto read = map_layout(dt == at::kDouble ? x.to(dt) : x);  // .to keeps the memory format
  const Tensor& xc = read.first;
  const MapLayout layout = read.second;
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3), N = B * HW;
  const Tensor w = weight.to(dt).contiguous(), bb = bias.to(dt).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor mean, invstd;
  Tensor out = at::empty({B, C}, xc.options());
  if (B * C == 0) return {out.to(x.scalar_type()), at::zeros({C}, w.options()), at::ones({C}, w.options())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_bn_relu_pool_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(at::CppTypeToScalarType<acc_t>::value == dt, "bn_relu_pool: fp64 parameters need fp64 x");
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    if (training) {
      TORCH_CHECK(N > 1, "bn_relu_pool: expected more than 1 value per channel when training, got input of size ",
                  x.sizes());
      mean = at::empty({C}, w.options());
      Tensor var = at::empty({C}, w.options());
      if (layout == MapLayout::NCHW) {
        channel_moments_kernel<scalar_t, acc_t><<<C, reduce_threads(N), 0, stream>>>(
            xp, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), B, C, HW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const int64_t chunk = nhwc_row_chunk(N), R = (N + chunk - 1) / chunk;
        const dim3 grid = nhwc_grid(R, C), block(kTileC, kTileR);
        Tensor partial = at::empty({R, C}, w.options());
        nhwc_moments_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            xp, nullptr, partial.data_ptr<acc_t>(), N, C, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_column_total(partial.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), R, C, N, stream);
        nhwc_moments_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            xp, mean.data_ptr<acc_t>(), partial.data_ptr<acc_t>(), N, C, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_column_total(partial.data_ptr<acc_t>(), var.data_ptr<acc_t>(), R, C, N, stream);
      }
      invstd = update_running_stats(mean, var, running_mean, running_var, N, momentum, eps, dt, stream);
    } else {
      std::tie(mean, invstd) = bn_eval_stats(running_mean, running_var, eps, dt);
    }
    if (layout == MapLayout::NCHW) {
      const int threads = 256;
      const int64_t blocks = (B * C * kWarp + threads - 1) / threads;
      bn_relu_pool_fwd_kernel<scalar_t, acc_t><<<blocks, threads, 0, stream>>>(
          xp, w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
          out.data_ptr<scalar_t>(), B, C, HW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      launch_channels_last_pool<true>(xp, w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(), mean.data_ptr<acc_t>(),
                                      invstd.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), B, C, HW, stream);
    }
  });
  return {out.to(x.scalar_type()), mean, invstd};
}

Tensor3 bn_relu_pool_bwd(HCD_BN_BWD_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = save_mean.scalar_type();
  const auto read = map_layout(dt == at::kDouble ? x.to(dt) : x);  // .to keeps the memory format
  const Tensor& xc = read.first;
  const MapLayout layout = read.second;
  const int64_t B = xc.size(0), C = xc.size(1), HW = xc.size(2) * xc.size(3), N = B * HW;
  const Tensor w = weight.to(dt).contiguous(), bb = bias.to(dt).contiguous();
  const Tensor g = grad_out.to(xc.scalar_type()).contiguous();
  const Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  // dx in the layout the kernels read x in (channels_last for channels_last x).
  Tensor gx = at::empty(xc.sizes(), xc.options().memory_format(layout == MapLayout::NHWC
                                                                     ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  Tensor gw = at::empty({C}, w.options()), gb = at::empty({C}, w.options());
  if (B * C == 0 || HW == 0)  // no element: zero sums, empty dx
    return {gx.to(x.scalar_type()).contiguous(grad_x_format(x)), gw.zero_().to(weight.scalar_type()), gb.zero_().to(bias.scalar_type())};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hcd_fast_bn_relu_pool_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(at::CppTypeToScalarType<acc_t>::value == dt, "bn_relu_pool: fp64 parameters need fp64 x");
    if (layout == MapLayout::NCHW) {
      bn_relu_pool_bwd_kernel<scalar_t, acc_t><<<C, reduce_threads(N), 0, stream>>>(
          g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), gx.data_ptr<scalar_t>(), gw.data_ptr<acc_t>(),
          gb.data_ptr<acc_t>(), B, C, HW, training);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t chunk = nhwc_row_chunk(N), R = (N + chunk - 1) / chunk;
      const dim3 grid = nhwc_grid(R, C), block(kTileC, kTileR);
      Tensor partial = at::empty({2, R, C}, w.options());
      acc_t* pp = partial.data_ptr<acc_t>();
      nhwc_bwd_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), pp, N, C, HW, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_column_total(pp, gb.data_ptr<acc_t>(), R, C, 1, stream);
      launch_column_total(pp + R * C, gw.data_ptr<acc_t>(), R, C, 1, stream);
      nhwc_bwd_dx_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), bb.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), gw.data_ptr<acc_t>(), gb.data_ptr<acc_t>(),
          gx.data_ptr<scalar_t>(), N, C, HW, chunk, training);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // grad_x: dense in x's memory format (the op contract, hcd_fast/ops/bn_relu_pool.py).
  return {gx.to(x.scalar_type()).contiguous(grad_x_format(x)), gw.to(weight.scalar_type()),
          gb.to(bias.scalar_type())};
}

}  // namespace hcd_fast::cuda

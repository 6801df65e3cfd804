// Shared helpers of the hcd_fast CUDA kernels: deterministic warp/block reductions, launch checks, and the
// channels_last (NHWC) pooling kernel of bn_relu_pool and pool_linear.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <utility>

namespace hcd_fast::cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // Butterfly: every lane ends with the same total (each step adds the same two partials).
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums N values over the block; every thread gets the totals. ws: shared scratch of >= 32*N elements.
// Deterministic: fixed shuffle pattern, then every thread adds the warp partials in warp order.
template <int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T* ws) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // ws may still be read by a previous reduction
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) ws[i * kWarp + warp] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    T t = 0;
    for (int w = 0; w < warps; ++w) t += ws[i * kWarp + w];
    v[i] = t;
  }
}

template <typename T>
__device__ __forceinline__ T block_sum1(T v, T* ws) {
  T a[1] = {v};
  block_sum<1>(a, ws);
  return a[0];
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* ws) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) ws[warp] = v;
  __syncthreads();
  T m = ws[0];
  for (int w = 1; w < warps; ++w) m = max(m, ws[w]);
  return m;
}

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// Threads per block for a row of K elements: enough to cover the row a few elements per thread; at most
// kMaxRowThreads, which the row kernels declare in __launch_bounds__ so their register use always fits.
constexpr int kMaxRowThreads = 512;
inline int row_threads(int64_t K) {
  if (K <= 512) return 128;
  if (K <= 2048) return 256;
  return kMaxRowThreads;
}

// Walks the flat index i = b * inner + j of an (outer, inner) grid in steps of `step` with no division per
// step: (b, j) starts at divmod(i0, inner) and each advance adds divmod(step, inner), carrying at most once
// because both j and the added remainder are below inner. inner must be > 0.
struct FlatCursor {
  int64_t b, j;
  const int64_t db, dj, inner;
  __device__ __forceinline__ FlatCursor(int64_t i0, int64_t step, int64_t inner_)
      : b(i0 / inner_), j(i0 % inner_), db(step / inner_), dj(step % inner_), inner(inner_) {}
  __device__ __forceinline__ void advance() {
    j += dj;
    b += db;
    if (j >= inner) {
      j -= inner;
      ++b;
    }
  }
};

// channels_last (NHWC) maps: row r = b * HW + hw holds the C channels of one pixel contiguously. The kernels
// over them give each block a tile of kTileC consecutive channels (threadIdx.x: one warp reads 32 adjacent
// values of a row, coalesced) and kTileR rows at a time (threadIdx.y), then add the kTileR partials in
// threadIdx.y order: a fixed order, so results are identical run to run.
constexpr int kTileC = 32;
constexpr int kTileR = 8;

// Largest channel count the (.., ceil(C / kTileC)) grids address (gridDim.y <= 65535).
constexpr int64_t kMaxTiledChannels = int64_t(65535) * kTileC;

// Row chunks of the channels_last reductions: at most 512 chunks (grid.x) of at least 64 rows, a function
// of N only, so the partition (and the summation order) never depends on the device.
inline int64_t nhwc_row_chunk(int64_t N) { return std::max<int64_t>(64, (N + 511) / 512); }

// out[b, c] = 1/HW sum_hw f_c(x[b, hw, c]) for a channels_last x (B, HW, C): grid (B, ceil(C / kTileC)),
// block (kTileC, ty) with ty <= kTileR. f_c is ReLU(v * scale_c + shift_c) with scale_c = weight_c invstd_c,
// shift_c = bias_c - mean_c scale_c when kBnRelu (the BatchNorm+ReLU of bn_relu_pool), else the identity.
template <bool kBnRelu, typename scalar_t, typename acc_t, typename out_t>
__global__ void __launch_bounds__(kTileC * kTileR)
    channels_last_pool_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
                              const acc_t* __restrict__ bias, const acc_t* __restrict__ mean,
                              const acc_t* __restrict__ invstd, out_t* __restrict__ out, int64_t C, int64_t HW) {
  __shared__ acc_t part[kTileR][kTileC];
  const int64_t b = blockIdx.x, c = int64_t(blockIdx.y) * kTileC + threadIdx.x;
  acc_t s = 0;
  if (c < C) {
    acc_t scale = 1, shift = 0;
    if constexpr (kBnRelu) {
      scale = weight[c] * invstd[c];
      shift = bias[c] - mean[c] * scale;
    }
    const scalar_t* p = x + b * HW * C + c;
    for (int64_t hw = threadIdx.y; hw < HW; hw += blockDim.y) {
      const acc_t v = acc_t(p[hw * C]);
      if constexpr (kBnRelu)
        s += max(v * scale + shift, acc_t(0));
      else
        s += v;
    }
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = 0;
    for (int k = 0; k < int(blockDim.y); ++k) t += part[k][threadIdx.x];
    out[b * C + c] = out_t(t / acc_t(HW));
  }
}

// Rows per block (threadIdx.y extent) of channels_last_pool_kernel: no idle rows of threads when HW < kTileR.
inline int pool_rows(int64_t HW) { return HW >= 8 ? 8 : HW >= 4 ? 4 : HW >= 2 ? 2 : 1; }
static_assert(kTileR == 8, "pool_rows assumes kTileR == 8");

// Launches channels_last_pool_kernel for x (B, HW, C) (channels_last); C <= kMaxTiledChannels, B*C > 0.
template <bool kBnRelu, typename scalar_t, typename acc_t, typename out_t>
void launch_channels_last_pool(const scalar_t* x, const acc_t* weight, const acc_t* bias, const acc_t* mean,
                               const acc_t* invstd, out_t* out, int64_t B, int64_t C, int64_t HW,
                               cudaStream_t stream) {
  TORCH_CHECK(C <= kMaxTiledChannels && B <= int64_t(INT32_MAX), "channels_last pool: too many channels or samples");
  const dim3 grid(unsigned(B), unsigned((C + kTileC - 1) / kTileC)), block(kTileC, pool_rows(HW));
  channels_last_pool_kernel<kBnRelu, scalar_t, acc_t, out_t><<<grid, block, 0, stream>>>(x, weight, bias, mean,
                                                                                          invstd, out, C, HW);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Memory layout a (B, C, H, W) kernel reads without a copy.
enum class MapLayout { NCHW, NHWC };

// NCHW when x is contiguous (also the case H*W == 1 or C == 1, where both layouts coincide), NHWC when it is
// channels_last-contiguous, else NCHW after a copy. Returns the tensor to read and its layout.
inline std::pair<at::Tensor, MapLayout> map_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, MapLayout::NCHW};
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, MapLayout::NHWC};
  return {x.contiguous(), MapLayout::NCHW};
}

}  // namespace hcd_fast::cuda

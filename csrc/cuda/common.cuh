// Shared helpers of the hcd_fast CUDA kernels: deterministic warp/block reductions and launch checks.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime.h>

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

}  // namespace hcd_fast::cuda

// CUDA cfm: the Complementary Feature Mapper with cuBLAS, never materialising u = [h ; f_t]:
//   a  = W1[:, :D] h + W1[:, D:] f_t        two GEMMs into one fp32 output (the second with beta = 1)
//   hidden = relu(a + b1)                   epilogue kernel, rounded to the input dtype (as F.linear does)
//   z  = W2 hidden                          GEMM, fp32 output          (skipped when there is no W2)
//   zf = lambda_s (z + b2) + lambda_t z_t   epilogue kernel, broadcast over the n sub-logits
// GEMMs read the inputs in their own dtype (fp32/bf16/fp16 tensor cores) and accumulate and write in fp32
// (fp64 for fp64), on the current stream's cuBLAS handle.
#include <ATen/cuda/Exceptions.h>
#include <cublas_v2.h>

#include "cuda/common.cuh"
#include "ops.h"

namespace hcd_fast::cuda {
namespace {

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kDouble: return CUDA_R_64F;
    default: TORCH_CHECK(false, "cfm (cuda): unsupported dtype ", t);
  }
}

// Row-major out (rows x cols, fp32/fp64) (+)= in (rows x k) @ W[:, col0:col0+k]^T for row-major W (cols x ldw):
// in cuBLAS's column-major view, out^T (cols x rows) = op_T(W^T block) (cols x k) * in^T (k x rows).
void gemm_rows(const Tensor& in, const Tensor& W, int64_t col0, int64_t k, Tensor& out, bool accumulate) {
  const int64_t rows = in.size(0), cols = W.size(0), ldw = W.size(1);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const bool fp64 = out.scalar_type() == at::kDouble;
  const float alpha_f = 1.f, beta_f = accumulate ? 1.f : 0.f;
  const double alpha_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const char* w_ptr = static_cast<const char*>(W.data_ptr()) + col0 * W.element_size();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(k),
      fp64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f),
      w_ptr, cuda_dtype(W.scalar_type()), int(ldw),
      in.data_ptr(), cuda_dtype(in.scalar_type()), int(in.size(1)),
      fp64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f),
      out.data_ptr(), cuda_dtype(out.scalar_type()), int(cols),
      fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <typename scalar_t, typename acc_t>
__global__ void bias_relu_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ bias,
                                 scalar_t* __restrict__ hidden, int64_t total, int64_t H) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    hidden[i] = scalar_t(max(a[i] + bias[i % H], acc_t(0)));
}

template <typename scalar_t, typename acc_t>
__global__ void fuse_teacher_kernel(const acc_t* __restrict__ z, const acc_t* __restrict__ bias,
                                    const scalar_t* __restrict__ zt, scalar_t* __restrict__ zf, int64_t total,
                                    int64_t nK, int64_t K, acc_t lambda_s, acc_t lambda_t) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / nK, j = i % nK;
    zf[i] = scalar_t(lambda_s * (z[i] + bias[j]) + lambda_t * acc_t(zt[b * K + j % K]));
  }
}

int64_t grid_for(int64_t total, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
}

}  // namespace

Tensor2 cfm(HCD_CFM_ARGS) {
  // The kernels choose their own precision: ATen calls inside must not be re-cast by an active autocast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(student_feat.is_cuda(), "cfm (cuda): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(student_feat.device());
  const auto out_dtype = at::promote_types(at::promote_types(student_feat.scalar_type(), teacher_feat.scalar_type()),
                                           at::promote_types(weight1.scalar_type(), teacher_logits.scalar_type()));
  const auto dt = compute_dtype({out_dtype});
  const Tensor h = student_feat.to(out_dtype).contiguous();
  const Tensor ft = teacher_feat.to(out_dtype).contiguous();
  const Tensor w1 = weight1.to(out_dtype).contiguous();
  const Tensor b1 = bias1.to(dt).contiguous();
  const Tensor zt = teacher_logits.to(out_dtype).contiguous();
  const int64_t B = h.size(0), D = h.size(1), Dt = ft.size(1), H = w1.size(0), K = zt.size(1);
  const int64_t nK = num_sub_logits * K;
  const auto acc_opts = h.options().dtype(dt);
  Tensor zf = at::empty({B, num_sub_logits, K}, h.options());
  Tensor a = at::empty({B, H}, acc_opts);
  if (B == 0) return {zf, at::empty({0}, h.options())};
  gemm_rows(h, w1, 0, D, a, /*accumulate=*/false);
  gemm_rows(ft, w1, D, Dt, a, /*accumulate=*/true);
  const bool has_hidden = weight2.has_value() && weight2->defined();
  Tensor hidden = has_hidden ? at::empty({B, H}, h.options()) : at::empty({0}, h.options());
  Tensor z = a, out_bias = b1;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "hcd_fast_cfm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (has_hidden) {
      bias_relu_kernel<scalar_t, acc_t><<<grid_for(B * H, threads), threads, 0, stream>>>(
          a.data_ptr<acc_t>(), b1.data_ptr<acc_t>(), hidden.data_ptr<scalar_t>(), B * H, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const Tensor w2 = weight2->to(out_dtype).contiguous();
      z = at::empty({B, nK}, acc_opts);
      gemm_rows(hidden, w2, 0, H, z, /*accumulate=*/false);
      out_bias = bias2->to(dt).contiguous();
    }
    fuse_teacher_kernel<scalar_t, acc_t><<<grid_for(B * nK, threads), threads, 0, stream>>>(
        z.data_ptr<acc_t>(), out_bias.data_ptr<acc_t>(), zt.data_ptr<scalar_t>(), zf.data_ptr<scalar_t>(), B * nK,
        nK, K, acc_t(lambda_student), acc_t(lambda_teacher));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {zf, hidden};
}

}  // namespace hcd_fast::cuda

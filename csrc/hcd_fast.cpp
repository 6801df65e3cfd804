// The one registration file of hcd_fast._C: the CPU and CUDA kernels of the hcd_fast ops, and a tiny Python
// module for build introspection. Each op's schema, fake kernel and autograd are defined once, in Python, by
// its op file (hcd_fast/ops/<op>.py; hcd_fast/ops/cpp_ops.py defines them under this namespace): the kernels
// below implement that contract (the dispatcher checks their C++ signatures against the schema).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "ops.h"
#include "cpu/kernels.h"

namespace hcd_fast::cpu {
std::string set_capability(const std::string& name);
}

TORCH_LIBRARY_IMPL(hcd_fast, CPU, m) {
  m.impl("sub_logit_loss", &hcd_fast::cpu::sub_logit_loss);
  m.impl("sub_logit_loss_backward", &hcd_fast::cpu::sub_logit_loss_backward);
  m.impl("bn_relu_pool_fwd", &hcd_fast::cpu::bn_relu_pool_fwd);
  m.impl("bn_relu_pool_bwd", &hcd_fast::cpu::bn_relu_pool_bwd);
  m.impl("pool_linear", &hcd_fast::cpu::pool_linear);
  m.impl("cfm", &hcd_fast::cpu::cfm);
  m.impl("cfm_backward", &hcd_fast::cpu::cfm_backward);
}

#ifdef HCD_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(hcd_fast, CUDA, m) {
  m.impl("sub_logit_loss", &hcd_fast::cuda::sub_logit_loss);
  m.impl("sub_logit_loss_backward", &hcd_fast::cuda::sub_logit_loss_backward);
  m.impl("bn_relu_pool_fwd", &hcd_fast::cuda::bn_relu_pool_fwd);
  m.impl("bn_relu_pool_bwd", &hcd_fast::cuda::bn_relu_pool_bwd);
  m.impl("pool_linear", &hcd_fast::cuda::pool_linear);
  m.impl("cfm", &hcd_fast::cuda::cfm);
  m.impl("cfm_backward", &hcd_fast::cuda::cfm_backward);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hcd_fast C++/CUDA kernels; the ops live in torch.ops.hcd_fast";
  m.def("with_cuda", []() {
#ifdef HCD_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("cfm_backward_epilogue_calls", []() -> int64_t {
#ifdef HCD_FAST_WITH_CUDA
    return hcd_fast::cuda::cfm_backward_epilogue_calls();
#else
    return 0;
#endif
  }, "CUDA cfm backward calls whose ReLU- and bias-gradient GEMMs ran as cuBLASLt epilogues (tests).");
  m.def("cpu_capability", []() { return std::string(hcd_fast::cpu::kernels().name); },
        "The CPU kernel build in use: 'avx2' or 'default'.");
  m.def("set_cpu_capability", &hcd_fast::cpu::set_capability,
        "Use the 'default' or the 'avx2' CPU kernels (tests); returns the one in use.");
}

// The AVX2+FMA build of the CPU kernel bodies, used only when the running CPU has both (kernels()).
// The whole translation unit is compiled for that target with a pragma, since setuptools has no per-file
// flags; only the table below is reachable from the rest of the extension, behind the run-time check.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma,f16c")
// GCC does not define the ISA macros for a target pragma; sleef.h and at::vec test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2 1
#include "cpu/kernel_table.h"

namespace hcd_fast::cpu {
const KernelTable* kernels_avx2() {
  static const KernelTable table = AVX2::make_table("avx2");
  return &table;
}
}  // namespace hcd_fast::cpu
#else
#include "cpu/kernels.h"
namespace hcd_fast::cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace hcd_fast::cpu
#endif

// The AVX2+FMA build of the CPU kernel bodies, used only when the running CPU has both (kernels()).
// The whole translation unit is compiled for that target with a pragma, since setuptools has no per-file
// flags; only the table below is reachable from the rest of the extension, behind the run-time check.
// GCC only (clang ignores GCC target pragmas): other compilers get the portable build alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Everything at::vec needs that is not ISA-specific is included before the pragma, so those inline
// functions are compiled for the baseline ISA here too (a linker-chosen copy can never hold AVX2 code).
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>

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

// Run-time choice of the CPU kernel table: AVX2+FMA when the CPU has it, else the portable build.
// HCD_FAST_CPU_CAPABILITY=default forces the portable one; set_capability() switches (for tests).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

namespace hcd_fast::cpu {
namespace {
bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  return kernels_avx2() != nullptr && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const KernelTable* initial() {
  const char* env = std::getenv("HCD_FAST_CPU_CAPABILITY");
  if (env && std::strcmp(env, "default") == 0) return &kernels_default();
  return cpu_has_avx2() ? kernels_avx2() : &kernels_default();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial()};
  return table;
}
}  // namespace

const KernelTable& kernels() { return *current().load(std::memory_order_relaxed); }

// Select "default" or "avx2" (if supported); returns the name now in use.
std::string set_capability(const std::string& name) {
  if (name == "default") {
    current().store(&kernels_default());
  } else if (name == "avx2") {
    if (!cpu_has_avx2()) throw std::runtime_error("hcd_fast: this CPU (or build) has no AVX2+FMA kernels");
    current().store(kernels_avx2());
  } else {
    throw std::invalid_argument("hcd_fast: capability must be 'default' or 'avx2', got '" + name + "'");
  }
  return kernels().name;
}

}  // namespace hcd_fast::cpu

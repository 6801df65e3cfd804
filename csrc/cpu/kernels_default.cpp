// The portable build of the CPU kernel bodies (at::vec's DEFAULT capability: whatever the compiler's
// baseline ISA gives, SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT 1
#include "cpu/kernel_table.h"

namespace hcd_fast::cpu {
const KernelTable& kernels_default() {
  static const KernelTable table = DEFAULT::make_table("default");
  return table;
}
}  // namespace hcd_fast::cpu

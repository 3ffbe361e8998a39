// The kernel table: one entry per kernel, slowest first (the last available one that is not
// an emulation is the default). Adding a kernel is its file under kernels/ plus one entry
// here. This file is built for baseline x86-64: the CPU checks must run on any CPU.
#include "../bfp.h"

namespace bfp {

static bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
static bool has_avx512() {
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}
static bool always() { return true; }

static const KernelDesc kTable[] = {
    {"scalar", false, always, 0, false, nullptr, nullptr, nullptr, nullptr},
#ifdef BFPACCEL_HAVE_AVX512_EMU
    {"avx512-emu", true, has_avx2, avx512emu::NR, false, avx512emu::panel_bytes, avx512emu::pack_panel,
     avx512emu::gemm, avx512emu::quantize_rows},
#endif
    {"avx2", false, has_avx2, avx2::NR, true, avx2::panel_bytes, avx2::pack_panel, avx2::gemm, nullptr},
    {"avx512", false, has_avx512, avx512::NR, false, avx512::panel_bytes, avx512::pack_panel, avx512::gemm,
     avx512::quantize_rows},
};

int kernel_count() { return int(sizeof(kTable) / sizeof(kTable[0])); }
const KernelDesc& kernel_at(int i) { return kTable[i]; }

}  // namespace bfp

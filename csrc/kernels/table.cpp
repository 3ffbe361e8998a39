// The kernel table: one entry per kernel, in order of preference (the last available one that
// is not an emulation is the default). Adding a kernel is its file under kernels/ plus one entry
// here. This file is built for baseline x86-64: the CPU checks must run on any CPU.
#include <cpuid.h>

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
// AMX-TILE, AMX-INT8 and AMX-BF16 with the tile state enabled in XCR0 (bits 17, 18; read
// directly: g++ 12's __builtin_cpu_supports does not know AMX), then the OS permission.
static bool has_amx() {
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (((d >> 22) & 1) == 0 || ((d >> 24) & 1) == 0 || ((d >> 25) & 1) == 0) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || ((c >> 27) & 1) == 0) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0x60000u) == 0x60000u && amx::os_ready();
}
static bool always() { return true; }

static const KernelDesc kTable[] = {
    {"scalar", false, always, 0, false, nullptr, nullptr, nullptr, nullptr, true, nullptr, nullptr, nullptr, nullptr,
     nullptr, nullptr},
#ifdef BFPACCEL_HAVE_AVX512_EMU
    {"avx512-emu", true, has_avx2, avx512emu::NR, false, avx512emu::panel_bytes, avx512emu::pack_panel,
     avx512emu::gemm, avx512emu::quantize_rows, true, avx512emu::dwconv,
     avx512emu::fake_quantize_elems, avx2::fn_row, avx2::softmax_row, avx512emu::stem_conv, avx512emu::max_window},
    {"amx-emu", true, has_avx2, amxemu::NR, false, amxemu::panel_bytes, amxemu::pack_panel, amxemu::gemm,
     avx512emu::quantize_rows, true, avx512emu::dwconv,
     avx512emu::fake_quantize_elems, avx2::fn_row, avx2::softmax_row, avx512emu::stem_conv, avx512emu::max_window},
#endif
    {"avx2", false, has_avx2, avx2::NR, true, avx2::panel_bytes, avx2::pack_panel, avx2::gemm, avx2::quantize_rows,
     true, avx2::dwconv, avx2::fake_quantize_elems, avx2::fn_row, avx2::softmax_row, avx2::stem_conv, nullptr,
     true, true},
    // amx before avx512: selectable, not the default -- on whole models (ResNet-50,
    // EfficientNet-Lite0, msfp16) it measured 5-10% slower than avx512 on a Sapphire-Rapids-class
    // CPU, 1.35-1.7x the time on a busier host of the same class: its tile loop streams A and B
    // from L2, its panels take 2.6x the weight bytes, and 16-element blocks keep the tiles a
    // quarter busy behind the per-block epilogue.
    {"amx", false, has_amx, amx::NR, false, amx::panel_bytes, amx::pack_panel, amx::gemm, avx512::quantize_rows, true,
     avx512::dwconv, avx512::fake_quantize_elems, avx512::fn_row, avx512::softmax_row, avx512::stem_conv, avx512::max_window},
    {"avx512", false, has_avx512, avx512::NR, false, avx512::panel_bytes, avx512::pack_panel, avx512::gemm,
     avx512::quantize_rows, true, avx512::dwconv,
     avx512::fake_quantize_elems, avx512::fn_row, avx512::softmax_row, avx512::stem_conv, avx512::max_window},
};

int kernel_count() { return int(sizeof(kTable) / sizeof(kTable[0])); }
const KernelDesc& kernel_at(int i) { return kTable[i]; }

}  // namespace bfp

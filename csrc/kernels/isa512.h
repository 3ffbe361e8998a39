// The AVX-512 kernels' sources are compiled twice: natively (namespace avx512, built with the
// AVX-512 flags) and, with BFP_AVX512_EMULATED, on SIMDe's portable AVX-512 (namespace
// avx512emu: the test-only "avx512-emu" / "amx-emu" kernels, see the CMake option
// BFPACCEL_AVX512_EMULATION), which checks their logic bit for bit on CPUs without AVX-512.
// Included first by each such source.
#pragma once

#ifdef BFP_AVX512_EMULATED
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define BFP_AVX512_NS avx512emu
#define BFP_NO_512_CVTPS_PH 1
#include <cmath>
#include <cstdint>
#include <cstring>
// vgetexpps / vscalefps as the hardware does them (MXCSR defaults: no DAZ/FTZ, round to
// nearest). SIMDe has no getexp and its scalef flushes subnormal inputs, which the hardware
// keeps; the GEMM tiles scale exact block sums by powers of two with them (avx512.cpp).
namespace bfp_emu {
inline float quiet(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    b |= 0x400000u;
    std::memcpy(&x, &b, 4);
    return x;
}
inline float indefinite() {  // the x86 default NaN of an invalid operation
    const uint32_t b = 0xffc00000u;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline float getexp(float x) {
    if (std::isnan(x)) return quiet(x);
    if (x == 0.0f) return -INFINITY;
    if (std::isinf(x)) return INFINITY;
    return float(std::ilogb(x));  // subnormals: the exponent of the normalized value
}
inline float scalef(float a, float b) {
    if (std::isnan(a)) return quiet(a);
    if (std::isnan(b)) return quiet(b);
    if (std::isinf(b)) {
        if ((a == 0.0f && b > 0) || (std::isinf(a) && b < 0)) return indefinite();
        return b > 0 ? (a == 0.0f ? a : std::copysign(INFINITY, a)) : (std::isinf(a) ? a : std::copysign(0.0f, a));
    }
    const float n = std::floor(b);
    return std::ldexp(a, n > 400.0f ? 400 : n < -400.0f ? -400 : int(n));  // one rounding
}
}  // namespace bfp_emu
static inline simde__m512 bfp_getexp_ps(simde__m512 x) {
    alignas(64) float v[16];
    simde_mm512_store_ps(v, x);
    for (float& f : v) f = bfp_emu::getexp(f);
    return simde_mm512_load_ps(v);
}
static inline simde__m512 bfp_scalef_ps(simde__m512 a, simde__m512 b) {
    alignas(64) float va[16], vb[16];
    simde_mm512_store_ps(va, a);
    simde_mm512_store_ps(vb, b);
    for (int i = 0; i < 16; ++i) va[i] = bfp_emu::scalef(va[i], vb[i]);
    return simde_mm512_load_ps(va);
}
#else
#include <immintrin.h>
#define BFP_AVX512_NS avx512
#define bfp_getexp_ps _mm512_getexp_ps
#define bfp_scalef_ps _mm512_scalef_ps
#endif

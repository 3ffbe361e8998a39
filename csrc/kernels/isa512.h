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
#else
#include <immintrin.h>
#define BFP_AVX512_NS avx512
#endif

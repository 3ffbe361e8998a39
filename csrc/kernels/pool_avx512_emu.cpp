// The AVX-512 max-pool reduction compiled on SIMDe (portable intrinsics) for the test-only
// "avx512-emu" and "amx-emu" kernels.
#define BFP_AVX512_EMULATED 1
#include "pool_avx512.cpp"

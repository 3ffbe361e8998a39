// The AVX-512 stem convolution compiled on SIMDe (portable intrinsics) for the test-only
// "avx512-emu" and "amx-emu" kernels.
#define BFP_AVX512_EMULATED 1
#include "stem_avx512.cpp"

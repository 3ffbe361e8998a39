// The AVX-512 kernel compiled on SIMDe (portable intrinsics) as the test-only "avx512-emu" kernel.
#define BFP_AVX512_EMULATED 1
#include "avx512.cpp"

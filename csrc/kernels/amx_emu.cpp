// The AMX kernel compiled on SIMDe (AVX-512) and amx_tile_emu.h (tiles) as the test-only
// "amx-emu" kernel.
#define BFP_AMX_EMULATED 1
#include "amx.cpp"

// Block quantizer (scalar, exact): shared by quantize(), fake_quantize(), conv activations.
#pragma once
#include "bfp.h"

namespace bfp {

// 32 random bits for element `index` under `seed` (splitmix64; see reference.py).
uint32_t stochastic_bits(uint64_t seed, uint64_t index);

// Quantizes the n elements x[k*xs] (flat indices idx0 + k*idxs, for stochastic rounding):
// writes each element's signed integer units and returns the block exponent (kNanExp if
// the block held NaN/Inf; then every unit is 0).
int16_t quantize_block(const float* x, int64_t xs, int n, uint64_t idx0, int64_t idxs, const FmtParams& f,
                       uint64_t seed, int64_t* units);

uint8_t encode_fp(int64_t units, const FmtParams& f);  // units -> OCP bit pattern
int64_t decode_fp(uint8_t code, const FmtParams& f);   // OCP bit pattern -> units

// code byte -> units, for either element kind
struct UnitsLut {
    int64_t v[256];
    explicit UnitsLut(const FmtParams& f);
    int64_t operator()(int8_t c) const { return v[uint8_t(c)]; }
};

}  // namespace bfp

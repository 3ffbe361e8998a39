// bfpaccel C++ core: plain data structures shared by the generic code and the ISA kernels.
//
// Everything here is POD + function declarations: the ISA translation units (compiled with
// -mavx2 / -mavx512*) include it, and must not instantiate inline STL code that the linker
// could pick for the generic code (it would then run AVX instructions on any CPU).
#pragma once

#include <cstddef>
#include <cstdint>

namespace bfp {

constexpr int16_t kNanExp = -32768;  // exponent of a block that held NaN/Inf

enum Rounding : int { kNearestEven = 0, kNearestAway = 1, kTowardZero = 2, kStochastic = 3 };
enum ElemKind : int { kInt = 0, kFp = 1 };

// The plain integers of formats.Format.kernel_params().
struct FmtParams {
    int block;        // elements per block
    int kind;         // kInt or kFp
    int mbits;        // p of int(p), m of fp(e, m)
    int ebits;        // e of fp(e, m)
    int bias;         // element exponent bias (fp)
    int specials;     // 0 none, 1 NaN only (E4M3), 2 Inf+NaN (E5M2)
    int unit_shift;   // value = units * 2^(E - unit_shift)
    int64_t max_units;
    int exp_min, exp_max;
    int emax_elem;
    int rounding;
    bool int8_units() const { return max_units <= 127; }
};

// ---------------------------------------------------------------- kernels & dispatch
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
Isa current_isa();
int num_threads();

// The rows operand of a GEMM: canonical dense rows [R][nb*Bp] of int8 units (Bp = block
// rounded up to a multiple of 4, zero padded), with per-(row, block) float scales
// 2^(E - unit_shift) (NaN for a NaN block, 1.0 for an all-zero block), the VNNI
// correction -128 * sum(units) and the range of the exponents of the non-zero blocks.
struct RowsView {
    int64_t R;
    int nb, Bp;
    const int8_t* u;        // [R][nb*Bp]
    const int16_t* u16;     // [R][nb*Bp] (AVX2 kernel) or null
    const float* scale;     // [R][nb]
    const int32_t* corr;    // [R][nb]
    const int32_t* emin;    // [R] min over non-zero, non-NaN blocks of (E - unit_shift)
    const int32_t* emax;    // [R]
};

// The columns operand: column c's units for tap t are nbt*Bp contiguous bytes at ptr[c*taps+t]
// (matmul: taps = 1 and the pointers are the canonical rows of B^T; conv: one pointer per
// kernel tap into the quantized, padded NHWC activation). Exponents alike.
struct ColsView {
    int64_t N;
    int taps, nbt, Bp;
    const int8_t* const* u;
    const int16_t* const* e;   // raw shared exponents (kNanExp marks NaN)
    int unit_shift;
    const uint8_t* prepacked;  // ISA panels made once (weights), or null: pack on the fly
    const int32_t* pmin;       // [panels] exponent range of prepacked panels
    const int32_t* pmax;
};

// Computes out[r*ldo + c] for rows [r0, r0+nr), cols [c0, c0+nc) exactly (FORMATS.md §6):
// used by every kernel for tiles whose exponents leave the fast path's exact range.
struct ExactTile {
    const void* ctx;
    void (*fn)(const void* ctx, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo);
};

struct GemmArgs {
    RowsView rows;
    ColsView cols;
    int bits_s;  // |S_b| < 2^bits_s for every block sum
    float* out;
    int64_t ldo;
    ExactTile exact;
    int nthreads;
};

namespace avx512 {
constexpr int NR = 32;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
}  // namespace avx512

namespace avx2 {
constexpr int NR = 16;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
// Quantizes n contiguous floats into int8 units (formats with max_units <= 127, rounding
// other than stochastic); returns the block exponent. Same results as quantize_block.
int16_t quantize_block_i8(const float* x, int n, const FmtParams& f, int8_t* units);
}  // namespace avx2

// Scale of a block for the fast kernels (see RowsView).
inline float block_scale(int16_t e, int unit_shift, bool all_zero) {
    if (e == kNanExp) return __builtin_nanf("");
    if (all_zero) return 1.0f;
    return __builtin_ldexpf(1.0f, int(e) - unit_shift);  // exact: E - unit_shift in [-143, 127]
}

}  // namespace bfp

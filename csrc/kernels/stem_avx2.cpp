// AVX2 stem convolution (StemArgs in bfp.h): the arithmetic of the AVX-512 one
// (stem_avx512.cpp) on 8 lanes. An input of at most 4 channels, every tap one block, on
// fake-quantized operands in fp32: the input's values are first written into the padded pixel
// array, then the output rows are computed from it.
//
// Numerics: for each output and each tap in order, t = x_0 * w_0 (+ x_c * w_c by FMA) is the
// block sum, exact (the caller checked the exponents), and acc = acc + t rounds once, as the
// datapath's accumulation does. Lanes are 8 output channels; a strip of NP output pixels keeps
// NP accumulators and the tap's CP weight vectors in registers (16 ymm registers: 8 + 3 + the
// broadcasts), the input values broadcast from the padded pixel array (no bounds tests: the
// padding ring holds zeros, and 0 * w adds +-0, which leaves an accumulator that started at +0
// unchanged).
#include <immintrin.h>

#include <cstring>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace avx2 {

void epi_rows(const VecEpilogue& e, float* out, int64_t rows, int nc, int64_t ldo);  // (avx2.cpp)

namespace {

// Output pixels [ox0, ox0 + NP) of the output row whose tap (0, 0) row of input starts at xr,
// output channels [c0, c0 + nl) (nl <= 8), into d (the row's output at channel c0). CP floats
// per input pixel; SW > 0: the stride is SW.
template <int CP, int NP, int SW>
static inline void strip(const StemArgs& a, const float* xr, int64_t ox0, const float* w, float* d, int nl) {
    const int64_t sw = SW ? SW : a.sw, rowf = a.Wp * CP;
    __m256 acc[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[j] = _mm256_setzero_ps();
    for (int ky = 0; ky < a.kh; ++ky) {
        const float* xrow = xr + int64_t(ky) * a.dh * rowf + ox0 * sw * CP;
        const float* wrow = w + int64_t(ky) * a.kw * CP * a.Op;
        for (int kx = 0; kx < a.kw; ++kx) {
            const float* wt = wrow + int64_t(kx) * CP * a.Op;
            __m256 wv[CP];
#pragma GCC unroll 4
            for (int c = 0; c < CP; ++c) wv[c] = _mm256_loadu_ps(wt + c * a.Op);
            const float* xp = xrow + int64_t(kx) * a.dw * CP;
#pragma GCC unroll 8
            for (int j = 0; j < NP; ++j) {
                const float* px = xp + j * sw * CP;
                __m256 t = _mm256_mul_ps(_mm256_broadcast_ss(px), wv[0]);
#pragma GCC unroll 4
                for (int c = 1; c < CP; ++c) t = _mm256_fmadd_ps(_mm256_broadcast_ss(px + c), wv[c], t);
                acc[j] = _mm256_add_ps(acc[j], t);
            }
        }
    }
    if (nl == 8) {
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j) _mm256_storeu_ps(d + j * a.O, acc[j]);
        return;
    }
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nl), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) _mm256_maskstore_ps(d + j * a.O, m, acc[j]);  // (unrolled: acc stays in registers)
}

// One output row: for each 8 output channels, strips of NP pixels; the last strip ends at the
// row's end (it may recompute pixels of the one before: the same raw values), a row shorter
// than NP one pixel at a time. Then the epilogue on the row, still in L1 (epi_rows).
template <int CP, int SW>
static void row(const StemArgs& a, int64_t n, int64_t oy) {
    constexpr int NP = 8;
    const float* xr = a.xq + (n * a.Hp + oy * a.sh) * a.Wp * CP;
    float* drow = a.out + (n * a.OH + oy) * a.OW * a.O;
    for (int64_t c0 = 0; c0 < a.O; c0 += 8) {
        const float* w = a.w + c0;
        float* d = drow + c0;
        const int nl = int(a.O - c0 < 8 ? a.O - c0 : 8);
        if (a.OW < NP) {
            for (int64_t ox = 0; ox < a.OW; ++ox) strip<CP, 1, SW>(a, xr, ox, w, d + ox * a.O, nl);
            continue;
        }
        for (int64_t ox = 0;; ox += NP) {
            if (ox + NP > a.OW) ox = a.OW - NP;
            strip<CP, NP, SW>(a, xr, ox, w, d + ox * a.O, nl);
            if (ox + NP == a.OW) break;
        }
    }
    if (a.epi) epi_rows(*a.epi, drow, a.OW, int(a.O), a.O);
}

// One input row's W pixels at o: each pixel's values, units * scale (exact)
template <int CP>
static void expand_values(const StemArgs& a, const int8_t* u, const float* s, float* o) {
    for (int64_t p = 0; p < a.W; ++p)
        for (int c = 0; c < CP; ++c) o[p * CP + c] = c < a.C ? float(u[p * 4 + c]) * s[p] : 0.0f;
}

}  // namespace

#include "stem_driver.inc"

}  // namespace avx2
}  // namespace bfp

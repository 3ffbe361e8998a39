// AVX-512 stem convolution (see StemArgs in bfp.h): an input of at most 4 channels, every tap
// one block, on fake-quantized operands in fp32. The input's values are first written into the
// padded pixel array (expand_row), then the output rows are computed from it.
//
// Numerics: for each output and each tap in order, t = x_0 * w_0 (+ x_c * w_c by FMA) is the
// block sum, exact (the caller checked the exponents), and acc = acc + t rounds once, as the
// datapath's accumulation does. Lanes are 16 output channels; a strip of NP output pixels keeps
// NP x OV accumulators and each tap's weights in registers, the input values are broadcast from
// the padded pixel array (no bounds tests: the padding ring holds zeros, and 0 * w adds +-0,
// which leaves an accumulator that started at +0 unchanged).
#include "isa512.h"  // native or emulated (avx512-emu) build

#include <cstring>
#include <utility>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace BFP_AVX512_NS {
namespace {

#include "epi512.inc"

// Output pixels [ox0, ox0 + NP) of the output row whose tap (0, 0) row of input starts at xr,
// output channels [c0, c0 + 16 * OV) (the last vector's first nl lanes stored), into d (the
// row's output at channel c0). CP floats per input pixel; SW > 0: the stride is SW.
template <int CP, int OV, int NP, int SW>
static inline void strip(const StemArgs& a, const float* xr, int64_t ox0, const float* w, float* d, int nl) {
    const int64_t sw = SW ? SW : a.sw, rowf = a.Wp * CP;
    __m512 acc[NP][OV];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j)
#pragma GCC unroll 4
        for (int v = 0; v < OV; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int ky = 0; ky < a.kh; ++ky) {
        const float* xrow = xr + int64_t(ky) * a.dh * rowf + ox0 * sw * CP;
        const float* wrow = w + int64_t(ky) * a.kw * CP * a.Op;
        for (int kx = 0; kx < a.kw; ++kx) {
            const float* wt = wrow + int64_t(kx) * CP * a.Op;
            __m512 wv[CP][OV];
#pragma GCC unroll 4
            for (int c = 0; c < CP; ++c)
#pragma GCC unroll 4
                for (int v = 0; v < OV; ++v) wv[c][v] = _mm512_loadu_ps(wt + c * a.Op + v * 16);
            const float* xp = xrow + int64_t(kx) * a.dw * CP;
#pragma GCC unroll 8
            for (int j = 0; j < NP; ++j) {
                const float* px = xp + j * sw * CP;
#pragma GCC unroll 4
                for (int v = 0; v < OV; ++v) {
                    __m512 t = _mm512_mul_ps(_mm512_set1_ps(px[0]), wv[0][v]);
#pragma GCC unroll 4
                    for (int c = 1; c < CP; ++c) t = _mm512_fmadd_ps(_mm512_set1_ps(px[c]), wv[c][v], t);
                    acc[j][v] = _mm512_add_ps(acc[j][v], t);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) {
#pragma GCC unroll 4
        for (int v = 0; v < OV - 1; ++v) _mm512_storeu_ps(d + j * a.O + v * 16, acc[j][v]);
        store_lanes(d + j * a.O + (OV - 1) * 16, acc[j][OV - 1], nl);
    }
}

// One output row, channels [c0, c0 + 16 * OV): strips of NP pixels; the last strip ends at the
// row's end (it may recompute pixels of the one before: the same raw values), a row shorter than
// NP one pixel at a time.
template <int CP, int OV, int SW>
static void row_group(const StemArgs& a, const float* xr, int64_t c0, float* drow) {
    constexpr int NP = OV <= 2 ? 8 : 4;
    const float* w = a.w + c0;
    float* d = drow + c0;
    const int nl = int(a.O - c0 - 16 * (OV - 1) < 16 ? a.O - c0 - 16 * (OV - 1) : 16);
    if (a.OW < NP) {
        for (int64_t ox = 0; ox < a.OW; ++ox) strip<CP, OV, 1, SW>(a, xr, ox, w, d + ox * a.O, nl);
        return;
    }
    for (int64_t ox = 0;; ox += NP) {
        if (ox + NP > a.OW) ox = a.OW - NP;
        strip<CP, OV, NP, SW>(a, xr, ox, w, d + ox * a.O, nl);
        if (ox + NP == a.OW) break;
    }
}

template <int CP, int SW>
static void row(const StemArgs& a, int64_t n, int64_t oy) {
    const float* xr = a.xq + (n * a.Hp + oy * a.sh) * a.Wp * CP;
    float* drow = a.out + (n * a.OH + oy) * a.OW * a.O;
    for (int64_t c0 = 0; c0 < a.O; c0 += 64) {
        const int64_t left = (a.O - c0 + 15) / 16;
        switch (left >= 4 ? 4 : int(left)) {
            case 4: row_group<CP, 4, SW>(a, xr, c0, drow); break;
            case 3: row_group<CP, 3, SW>(a, xr, c0, drow); break;
            case 2: row_group<CP, 2, SW>(a, xr, c0, drow); break;
            default: row_group<CP, 1, SW>(a, xr, c0, drow); break;
        }
    }
    // the epilogue on the row, still in L1
    if (a.epi)
        epi_rows(*a.epi, drow, a.OW, int(a.O), a.O);
}

// One input row's W pixels at o: each pixel's values, units * scale (exact), 4 pixels a vector
template <int CP>
static void expand_values(const StemArgs& a, const int8_t* u, const float* s, float* o) {
    const __m512i rep = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    // the lanes of channels < C (units past C are not read)
    const __mmask16 ch = __mmask16(0x1111 * ((1 << a.C) - 1));
    int64_t p = 0;
    for (; p + 4 <= a.W; p += 4) {
        const __m128i u16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + p * 4));  // 4 pixels' units
        const __m512i ui = _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(u16));
        const __m512 sv = _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(_mm_loadu_ps(s + p)));
        const __m512 v = _mm512_maskz_mul_ps(ch, _mm512_cvtepi32_ps(ui), sv);
        if constexpr (CP == 4) _mm512_storeu_ps(o + p * 4, v);
        else store_lanes(o + p * 3, _mm512_maskz_compress_ps(0x7777, v), 12);  // (a compress to memory is microcoded)
    }
    for (; p < a.W; ++p)
        for (int c = 0; c < CP; ++c) o[p * CP + c] = c < a.C ? float(u[p * 4 + c]) * s[p] : 0.0f;
}

}  // namespace

#include "stem_driver.inc"

}  // namespace BFP_AVX512_NS
}  // namespace bfp

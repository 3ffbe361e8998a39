// AVX2 kernel: int16 units, vpmaddwd (exact: |units| <= 127 so pair sums never saturate).
// Compiled with -mavx2 -mfma -mf16c. Rows are broadcast 2 units (int16) at a time; columns are
// packed into panels of NR=16. Per block: t = float(S) * col_scale, acc = fma(t, row_scale, acc)
// -- exact under the driver's per-tile range check, as in the AVX-512 kernel.
// Rows without a negative unit (RowsView::u8: a ReLU's output) take a byte path instead: 4
// units at a time, vpmaddubsw (unsigned row units x signed column units: a pair sum is at most
// 2 * 127 * 128 < 2^15, never saturated) then vpmaddwd by ones into the int32 sums -- the same
// block sums S, ~1.4x the multiply-adds per cycle of the int16 path on the same core.
// The conv epilogue (bias, residual, activation) is applied to each tile in registers.
#include <immintrin.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace avx2 {

#include "tile.inc"
#include "epi_avx2.inc"

#define MR_MAX 4
static constexpr int MR = 3;
static inline int tile_rows() { return MR; }  // rows per GEMM tile (the driver's; see avx512.cpp)
static constexpr int KSTEP = 2;  // k values per int32 lane of a panel

// Panel layout, per block b: [Bp/2][NR][2] int8 (2 units of one column; sign-extended to int16
// on load, which halves the bytes a memory-bound batch-1 layer streams), then [NR] float scales;
// after the nb blocks, the byte path's copy of the units: per block [Bp/4][NR][4] int8. A tile
// reads one of the two sections.
size_t panel_bytes(int nb, int Bp) { return size_t(nb) * (size_t(Bp) * NR + NR * 4) + size_t(nb) * Bp * NR; }

void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    const int Bp = c.Bp, B2 = Bp / 2, B4 = Bp / 4;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    int8_t* const q4base = reinterpret_cast<int8_t*>(dst + size_t(c.taps) * c.nbt * bstride);
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int t = 0; t < c.taps; ++t) {
        for (int bt = 0; bt < c.nbt; ++bt) {
            const int b = t * c.nbt + bt;
            int8_t* q = reinterpret_cast<int8_t*>(dst + b * bstride);
            float* sc = reinterpret_cast<float*>(dst + b * bstride + size_t(Bp) * NR);
            int8_t* q4 = q4base + size_t(b) * Bp * NR;
            for (int j = 0; j < NR; ++j) {
                if (j >= ncols) {
                    for (int k2 = 0; k2 < B2; ++k2) q[(k2 * NR + j) * 2] = q[(k2 * NR + j) * 2 + 1] = 0;
                    for (int k4 = 0; k4 < B4; ++k4) std::memset(q4 + (k4 * NR + j) * 4, 0, 4);
                    sc[j] = 1.0f;
                    continue;
                }
                const int8_t* src = c.u[(col0 + j) * c.taps + t] + bt * Bp;
                for (int k4 = 0; k4 < B4; ++k4) std::memcpy(q4 + (k4 * NR + j) * 4, src + 4 * k4, 4);
                int any = 0;
    #pragma GCC unroll 16
            for (int k2 = 0; k2 < B2; ++k2) {
                    q[(k2 * NR + j) * 2] = src[2 * k2];
                    q[(k2 * NR + j) * 2 + 1] = src[2 * k2 + 1];
                    any |= src[2 * k2] | src[2 * k2 + 1];
                }
                const int16_t e = c.e[(col0 + j) * c.taps + t][bt];
                sc[j] = block_scale(e, c.unit_shift, any == 0);
                if (e != kNanExp && any != 0) {
                    const int32_t ee = int32_t(e) - c.unit_shift;
                    if (ee < mn) mn = ee;
                    if (ee > mx) mx = ee;
                }
            }
        }
    }
    *emin = mn;
    *emax = mx;
}

// The lanes of r (v quantized) that Quant8 left out (bad), by the exact scalar path (rare: out of
// the format's exponent range, subnormal, NaN/Inf)
__attribute__((noinline, cold)) static __m256 fix_lanes(__m256 r, __m256 v, int bad, const FmtParams& f) {
    alignas(32) float t[8], raw[8];
    _mm256_store_ps(t, r);
    _mm256_store_ps(raw, v);
    for (int j = 0; j < 8; ++j)
        if (bad >> j & 1) t[j] = quantize_element(raw[j], f);
    return _mm256_load_ps(t);
}

// v's lanes as one-element blocks of f (q: its constants; P: its rounding path, or -1: q.path's)
template <int P>
__attribute__((always_inline)) static inline __m256 quantize8(const Quant8& q, __m256 v, const FmtParams& f) {
    int bad;
    const __m256 r = P < 0 ? q.quant_any(v, bad) : q.quant<P < 0 ? 0 : P>(v, bad);
    return __builtin_expect(bad == 0, 1) ? r : fix_lanes(r, v, bad, f);
}

// A full tile's rows (columns 0-7 in acc0, 8-15 in acc1) with the epilogue applied, written
// to out (each row's residual read first: it may be the output itself). The tile's columns
// have the same bias in every row; FQ: each value quantized last as a one-element block of
// ve.fq (the input of a depthwise conv; VecEpilogue::fq).
template <int VP, bool FQ, int mr>
__attribute__((always_inline)) static inline void store_rows_epi(const __m256 (&acc0)[mr], const __m256 (&acc1)[mr],
                                                                 float* out, int64_t ldo, const VecEpilogue& ve) {
    const float* b = ve.bias ? ve.bias_at(out) : nullptr;
    const float* r = ve.res ? ve.res + (out - ve.y) : nullptr;
    const __m256 vlo = _mm256_set1_ps(ve.lo), vhi = _mm256_set1_ps(ve.hi);
    const Quant8 q(FQ ? ve.fqc : ElemQuant{});
    if (FQ && ve.range) ve.range->set_untracked();  // (this epilogue does not track it)
    // bias, then a clip with lo <= hi (ReLU6; an expansion conv's epilogue): round(v + b), then
    // clip8 against the rounded bounds (as the AVX-512 epilogue's fast clip)
    if (b && !r && ve.act == 2 && ve.lo <= ve.hi) {
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        const __m256 lo = rnd<VP>(vlo), hi = rnd<VP>(vhi);
        auto rows = [&](auto path) __attribute__((always_inline)) {
            constexpr int P = decltype(path)::value;
            for (int i = 0; i < mr; ++i) {
                __m256 a0 = clip8(rnd<VP>(_mm256_add_ps(acc0[i], b0)), lo, hi);
                __m256 a1 = clip8(rnd<VP>(_mm256_add_ps(acc1[i], b1)), lo, hi);
                if constexpr (FQ) {
                    a0 = quantize8<P>(q, a0, *ve.fq);
                    a1 = quantize8<P>(q, a1, *ve.fq);
                }
                _mm256_storeu_ps(out + i * ldo, a0);
                _mm256_storeu_ps(out + i * ldo + 8, a1);
            }
        };
        if (FQ && q.path == kElemEven) rows(std::integral_constant<int, kElemEven>{});
        else rows(std::integral_constant<int, -1>{});
        return;
    }
    for (int i = 0; i < mr; ++i) {
        const float* ri = r ? r + i * ldo : nullptr;
        __m256 a0 = epi8<VP>(acc0[i], b, ri, ve.act, vlo, vhi);
        __m256 a1 = epi8<VP>(acc1[i], b ? b + 8 : nullptr, ri ? ri + 8 : nullptr, ve.act, vlo, vhi);
        if constexpr (FQ) {
            a0 = quantize8<-1>(q, a0, *ve.fq);
            a1 = quantize8<-1>(q, a1, *ve.fq);
        }
        _mm256_storeu_ps(out + i * ldo, a0);
        _mm256_storeu_ps(out + i * ldo + 8, a1);
    }
}

// The tile's mr x NR results (acc0: columns 0-7, acc1: 8-15) to out, through the epilogue ve
// when given (never with trans: run_gemm). A tile's 16 columns are contiguous in the output
// (VecEpilogue::cbs splits columns at multiples of 16).
template <int mr>
__attribute__((always_inline)) static inline void store_acc(const __m256 (&acc0)[mr], const __m256 (&acc1)[mr],
                                                            float* out, int64_t ldo, int nc, bool trans,
                                                            const VecEpilogue* ve) {
    if (ve && nc == NR && ve->fq) {
        if (ve->vp == 1) store_rows_epi<1, true>(acc0, acc1, out, ldo, *ve);
        else if (ve->vp == 2) store_rows_epi<2, true>(acc0, acc1, out, ldo, *ve);
        else store_rows_epi<0, true>(acc0, acc1, out, ldo, *ve);
        return;
    }
    if (ve && nc == NR) {
        if (ve->vp == 1) store_rows_epi<1, false>(acc0, acc1, out, ldo, *ve);
        else if (ve->vp == 2) store_rows_epi<2, false>(acc0, acc1, out, ldo, *ve);
        else store_rows_epi<0, false>(acc0, acc1, out, ldo, *ve);
        return;
    }
    if (nc == NR && !trans && !ve) {
        for (int i = 0; i < mr; ++i) {
            _mm256_storeu_ps(out + i * ldo, acc0[i]);
            _mm256_storeu_ps(out + i * ldo + 8, acc1[i]);
        }
        return;
    }
    alignas(32) float tmp[mr][NR];
    for (int i = 0; i < mr; ++i) {
        _mm256_store_ps(tmp[i], acc0[i]);
        _mm256_store_ps(tmp[i] + 8, acc1[i]);
    }
    if (ve) {  // a partial tile: the generic rows
        ve->rows_from(&tmp[0][0], NR, out, mr, nc, ldo);
        return;
    }
    store_tile(tmp, nc, out, ldo, trans);
}

// acc += float(S) * column scale * row scale for one block's sums (columns 0-7 in s0, 8-15 in s1;
// cs: the panel's column scales; sp[i][bt]: row i's scale)
template <int mr>
__attribute__((always_inline)) static inline void add_block(const __m256i (&s0)[mr], const __m256i (&s1)[mr],
                                                            const float* cs, const float* const (&sp)[mr], int bt,
                                                            __m256 (&acc0)[mr], __m256 (&acc1)[mr]) {
    const __m256 c0 = _mm256_load_ps(cs), c1 = _mm256_load_ps(cs + 8);
    for (int i = 0; i < mr; ++i) {
        const __m256 ra = _mm256_set1_ps(sp[i][bt]);
        acc0[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s0[i]), c0), ra, acc0[i]);
        acc1[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s1[i]), c1), ra, acc1[i]);
    }
}

// The byte path (rows without a negative unit): K4 > 0 the block's 4-unit steps known at
// compile time; 0: any block.
template <int mr, int K4>
static inline void run_tile_u8(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                               int nc, bool trans, const VecEpilogue* ve) {
    const int Bp = R.Bp, B4 = K4 > 0 ? K4 : Bp / 4, nbt = R.nbt;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    const uint8_t* const p4 = panel + size_t(R.taps) * nbt * bstride;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc0[mr], acc1[mr];
    for (int i = 0; i < mr; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int t = 0; t < R.taps; ++t) {
        const uint8_t* ap[mr];
        const float* sp[mr];
        for (int i = 0; i < mr; ++i) {
            const int64_t pix = R.roff[r0 + i] + R.toff[t];
            ap[i] = R.u8 + pix * nbt * Bp;
            sp[i] = R.scale + pix * nbt;
        }
        for (int bt = 0; bt < nbt; ++bt) {
            const size_t b = size_t(t) * nbt + bt;
            const uint8_t* pb = p4 + b * Bp * NR;
            __m256i s0[mr], s1[mr];
            for (int i = 0; i < mr; ++i) s0[i] = s1[i] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int k4 = 0; k4 < B4; ++k4) {
                const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb + k4 * 64));
                const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pb + k4 * 64 + 32));
                for (int i = 0; i < mr; ++i) {
                    int32_t w;
                    std::memcpy(&w, ap[i] + bt * Bp + 4 * k4, 4);
                    const __m256i av = _mm256_set1_epi32(w);
                    s0[i] = _mm256_add_epi32(s0[i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));
                    s1[i] = _mm256_add_epi32(s1[i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));
                    __asm__("" : "+x"(s0[i]), "+x"(s1[i]));  // running sums (see run_tile_k)
                }
            }
            add_block<mr>(s0, s1, reinterpret_cast<const float*>(panel + b * bstride + size_t(Bp) * NR), sp, bt, acc0,
                          acc1);
        }
    }
    store_acc<mr>(acc0, acc1, out, ldo, nc, trans, ve);
}

// KS > 0: the block's k-steps known at compile time (fully unrolled); 0: any block.
template <int mr, int KS>
static inline void run_tile_k(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                            int nc, bool trans, const VecEpilogue* ve) {
    if (R.u8) {
        run_tile_u8<mr, KS / 2>(R, r0, panel, out, ldo, nc, trans, ve);
        return;
    }
    const int Bp = R.Bp, B2 = KS > 0 ? KS : Bp / 2, nbt = R.nbt;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    __m256 acc0[mr], acc1[mr];
    for (int i = 0; i < mr; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int t = 0; t < R.taps; ++t) {
        const int16_t* ap[mr];
        const float* sp[mr];
        for (int i = 0; i < mr; ++i) {
            const int64_t pix = R.roff[r0 + i] + R.toff[t];
            ap[i] = static_cast<const int16_t*>(R.u) + pix * nbt * Bp;
            sp[i] = R.scale + pix * nbt;
        }
        for (int bt = 0; bt < nbt; ++bt) {
            const uint8_t* pb = panel + size_t(t * nbt + bt) * bstride;
            __m256i s0[mr], s1[mr];
            for (int i = 0; i < mr; ++i) s0[i] = s1[i] = _mm256_setzero_si256();
#pragma GCC unroll 16
            for (int k2 = 0; k2 < B2; ++k2) {
                const __m256i b0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32)));
                const __m256i b1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32 + 16)));
                for (int i = 0; i < mr; ++i) {
                    int32_t w;
                    std::memcpy(&w, ap[i] + bt * Bp + 2 * k2, 4);
                    const __m256i av = _mm256_set1_epi32(w);
                    s0[i] = _mm256_add_epi32(s0[i], _mm256_madd_epi16(b0, av));
                    s1[i] = _mm256_add_epi32(s1[i], _mm256_madd_epi16(b1, av));
                    // keep each accumulator a running sum in one register: without this GCC
                    // reassociates the unrolled adds into a tree and spills every product
                    __asm__("" : "+x"(s0[i]), "+x"(s1[i]));
                }
            }
            add_block<mr>(s0, s1, reinterpret_cast<const float*>(pb + size_t(Bp) * NR), sp, bt, acc0, acc1);
        }
    }
    store_acc<mr>(acc0, acc1, out, ldo, nc, trans, ve);
}


#include "driver.inc"

}  // namespace avx2
}  // namespace bfp

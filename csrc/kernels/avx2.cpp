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
#include <cmath>
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

// Quant8::quant<kElemEven> for lanes that are +-0 or normal with an exponent in range (see
// VecEpilogue::fq_fast): no range test; -0 becomes +0 by the add of +0
__attribute__((always_inline)) static inline __m256 quant_even_in_range(const Quant8& q, __m256 v) {
    const __m256i bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_setzero_ps()));
    __m256i r = _mm256_add_epi32(bits, q.half);
    r = _mm256_add_epi32(r, _mm256_min_epu32(_mm256_and_si256(bits, q.lsbbit), _mm256_set1_epi32(1)));
    r = _mm256_min_epu32(r, _mm256_or_si256(bits, q.mantm));  // a carry into the next binade: its largest pattern
    return _mm256_castsi256_ps(_mm256_and_si256(r, q.keep));
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
        if (FQ && ve.fq_fast) {  // no range test (VecEpilogue::fq_fast); a tile with a NaN: below
            __m256 nan = _mm256_setzero_ps();
            for (int i = 0; i < mr; ++i) {
                const __m256 a0 = clip8(rnd<VP>(_mm256_add_ps(acc0[i], b0)), lo, hi);
                const __m256 a1 = clip8(rnd<VP>(_mm256_add_ps(acc1[i], b1)), lo, hi);
                nan = _mm256_or_ps(nan, _mm256_cmp_ps(a0, a1, _CMP_UNORD_Q));
                _mm256_storeu_ps(out + i * ldo, quant_even_in_range(q, a0));
                _mm256_storeu_ps(out + i * ldo + 8, quant_even_in_range(q, a1));
            }
            if (__builtin_expect(_mm256_movemask_ps(nan) == 0, 1)) return;
        }
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

// One block's int32 sums S of rows i (int16 units from ap[i] + off) x the panel block at pb
// ([B2][NR][2] int8, sign-extended on load): columns 0-7 into s0[i], 8-15 into s1[i]. KS > 0:
// the block's k-steps known at compile time (fully unrolled), B2 then unused.
template <int mr, int KS>
__attribute__((always_inline)) static inline void block_sums16(const int16_t* const (&ap)[mr], int64_t off, int B2,
                                                               const uint8_t* pb, __m256i (&s0)[mr], __m256i (&s1)[mr]) {
    for (int i = 0; i < mr; ++i) s0[i] = s1[i] = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int k2 = 0; k2 < (KS > 0 ? KS : B2); ++k2) {
        const __m256i b0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32)));
        const __m256i b1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32 + 16)));
        for (int i = 0; i < mr; ++i) {
            int32_t w;
            std::memcpy(&w, ap[i] + off + 2 * k2, 4);
            const __m256i av = _mm256_set1_epi32(w);
            s0[i] = _mm256_add_epi32(s0[i], _mm256_madd_epi16(b0, av));
            s1[i] = _mm256_add_epi32(s1[i], _mm256_madd_epi16(b1, av));
            // keep each accumulator a running sum in one register: without this GCC
            // reassociates the unrolled adds into a tree and spills every product
            __asm__("" : "+x"(s0[i]), "+x"(s1[i]));
        }
    }
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
            block_sums16<mr, KS>(ap, bt * Bp, B2, pb, s0, s1);
            add_block<mr>(s0, s1, reinterpret_cast<const float*>(pb + size_t(Bp) * NR), sp, bt, acc0, acc1);
        }
    }
    store_acc<mr>(acc0, acc1, out, ldo, nc, trans, ve);
}

// ---- The epilogue of a raw tile in memory (the short-K rows below, BFP_EPI_BATCH) ----


// The epilogue of a raw tile at src (mr rows of nc columns, lds apart) written to out (ldo
// apart; column blocks through VecEpilogue::cbs): the arithmetic of store_rows_epi, a column
// vector's bias loaded once for the rows; columns past the last whole vector by rows_from.
// Each residual vector is read before that vector of out is written.
template <int VP, bool FQ>
static void epi_tile_t(const VecEpilogue& e, const float* src, int64_t lds, float* out, int mr, int nc, int64_t ldo) {
    const float* b = e.bias ? e.bias_at(out) : nullptr;
    const bool clipb = b && !e.res && e.act == 2 && e.lo <= e.hi;  // store_rows_epi's bias + clip form
    const bool fast = FQ && clipb && e.fq_fast;
    const __m256 vlo = _mm256_set1_ps(e.lo), vhi = _mm256_set1_ps(e.hi);
    const __m256 rlo = rnd<VP>(vlo), rhi = rnd<VP>(vhi);
    const Quant8 q(FQ ? e.fqc : ElemQuant{});
    if (FQ && e.range) e.range->set_untracked();  // (this epilogue does not track it)
    const auto at = [&](int64_t j) { return e.cbs ? (j >> 4) * e.cbs + (j & 15) : j; };
    const int nv = nc / 8 * 8;
    if constexpr (FQ) {
        // every vector by quant_even_in_range, NaNs noted on the way: a tile with one (a NaN
        // accumulator or bias) is done again below by the tested path
        if (fast) {
            __m256 nan = _mm256_setzero_ps();
            for (int j = 0; j < nv; j += 8) {
                float* const oj = out + at(j);
                const __m256 bv = _mm256_loadu_ps(b + j);
                for (int i = 0; i < mr; ++i) {
                    const __m256 v = clip8(rnd<VP>(_mm256_add_ps(_mm256_loadu_ps(src + i * lds + j), bv)), rlo, rhi);
                    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                    _mm256_storeu_ps(oj + i * ldo, quant_even_in_range(q, v));
                }
            }
            if (__builtin_expect(_mm256_movemask_ps(nan) == 0, 1)) {
                if (nv < nc) e.rows_from(const_cast<float*>(src) + nv, lds, out + at(nv), mr, nc - nv, ldo);
                return;
            }
        }
    }
    for (int j = 0; j < nv; j += 8) {
        float* const oj = out + at(j);
        if (clipb) {
            const __m256 bv = _mm256_loadu_ps(b + j);
            for (int i = 0; i < mr; ++i) {
                __m256 v = clip8(rnd<VP>(_mm256_add_ps(_mm256_loadu_ps(src + i * lds + j), bv)), rlo, rhi);
                if constexpr (FQ) v = quantize8<-1>(q, v, *e.fq);
                _mm256_storeu_ps(oj + i * ldo, v);
            }
            continue;
        }
        for (int i = 0; i < mr; ++i) {
            float* d = oj + i * ldo;
            __m256 v = epi8<VP>(_mm256_loadu_ps(src + i * lds + j), b ? b + j : nullptr, e.res ? e.res + (d - e.y) : nullptr,
                                e.act, vlo, vhi);
            if constexpr (FQ) v = quantize8<-1>(q, v, *e.fq);
            _mm256_storeu_ps(d, v);
        }
    }
    if (nv < nc)  // (src is a raw tile of the caller's: rows_from may overwrite it)
        e.rows_from(const_cast<float*>(src) + nv, lds, out + at(nv), mr, nc - nv, ldo);
}

static void epi_tile(const VecEpilogue& e, const float* src, int64_t lds, float* out, int mr, int nc, int64_t ldo) {
    const int vp = e.vp == 1 || e.vp == 2 ? e.vp : 0;
    if (e.fq) {
        if (vp == 1) epi_tile_t<1, true>(e, src, lds, out, mr, nc, ldo);
        else if (vp == 2) epi_tile_t<2, true>(e, src, lds, out, mr, nc, ldo);
        else epi_tile_t<0, true>(e, src, lds, out, mr, nc, ldo);
    } else {
        if (vp == 1) epi_tile_t<1, false>(e, src, lds, out, mr, nc, ldo);
        else if (vp == 2) epi_tile_t<2, false>(e, src, lds, out, mr, nc, ldo);
        else epi_tile_t<0, false>(e, src, lds, out, mr, nc, ldo);
    }
}

// The epilogue in place over rows already stored (rows x nc at out, ldo apart; the stem's output
// rows, pixels x channels): epi_tile a run of rows at a time, each column vector's bias loaded
// once for the run; widths that are not a multiple of 8 take VecEpilogue::rows.
void epi_rows(const VecEpilogue& e, float* out, int64_t rows, int nc, int64_t ldo) {
    if (nc % 8 || e.cbs) return e.rows(out, int(rows), nc, ldo);
    for (int64_t r = 0; r < rows; r += 4096)
        epi_tile(e, out + r * ldo, ldo, out + r * ldo, int(rows - r < 4096 ? rows - r : 4096), nc, ldo);
}

// ---- Short K (one tap, 1-4 blocks of 16 or 32 units: 1x1 convs of <= 4 * Bp channels, e.g. a
// MobileNet's expansions of 16-64 channels) ----
// A tile of up to kShortRows rows of int16 units (the driver's rows per tile for these GEMMs,
// BFP_SHORT_K_ROWS): the sums of one block at a time in registers (2 x 6 int32), then each
// block's scaled sums added to the raw tile in memory (L1) by the same fma as add_block, in
// the same block order: the same bits as run_tile_k. The epilogue then runs over the raw tile
// in memory (epi_tile), with its constants in registers, not beside 12 accumulators.
static constexpr int kShortRows = 6;

template <int mr, int KS>
__attribute__((always_inline)) static inline void short_k_raw(const RowsView& R, int64_t r0, const uint8_t* panel,
                                                              float* buf, int64_t ldb) {
    const int Bp = R.Bp, nbt = R.nbt;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    const int16_t* ap[mr];
    const float* sp[mr];
    for (int i = 0; i < mr; ++i) {
        const int64_t pix = R.roff[r0 + i] + R.toff[0];
        ap[i] = static_cast<const int16_t*>(R.u) + pix * nbt * Bp;
        sp[i] = R.scale + pix * nbt;
    }
    for (int bt = 0; bt < nbt; ++bt) {
        const uint8_t* pb = panel + size_t(bt) * bstride;
        __m256i s0[mr], s1[mr];
        block_sums16<mr, KS>(ap, bt * Bp, KS, pb, s0, s1);
        // raw += float(S) * column scale * row scale (add_block's fma; the first block adds to +0)
        const float* cs = reinterpret_cast<const float*>(pb + size_t(Bp) * NR);
        const __m256 c0 = _mm256_load_ps(cs), c1 = _mm256_load_ps(cs + 8);
        for (int i = 0; i < mr; ++i) {
            const __m256 ra = _mm256_set1_ps(sp[i][bt]);
            float* d = buf + i * ldb;
            const __m256 a0 = bt ? _mm256_loadu_ps(d) : _mm256_setzero_ps();
            const __m256 a1 = bt ? _mm256_loadu_ps(d + 8) : _mm256_setzero_ps();
            _mm256_storeu_ps(d, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s0[i]), c0), ra, a0));
            _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s1[i]), c1), ra, a1));
        }
    }
}

template <int KS>
static void short_k_raw_mr(int mr, const RowsView& R, int64_t r0, const uint8_t* panel, float* buf, int64_t ldb) {
    switch (mr) {
        case 1: short_k_raw<1, KS>(R, r0, panel, buf, ldb); break;
        case 2: short_k_raw<2, KS>(R, r0, panel, buf, ldb); break;
        case 3: short_k_raw<3, KS>(R, r0, panel, buf, ldb); break;
        case 4: short_k_raw<4, KS>(R, r0, panel, buf, ldb); break;
        case 5: short_k_raw<5, KS>(R, r0, panel, buf, ldb); break;
        default: short_k_raw<6, KS>(R, r0, panel, buf, ldb); break;
    }
}

// Whether a GEMM takes the short-K tiles (checked once a call; then every tile of it does,
// with up to kShortRows rows). Rows of bytes (RowsView::u8) keep run_tile_u8: with 6 rows
// its 12 sums, 2 panel vectors, the broadcast and the vector of ones take every register
// (measured: a 1x1 conv of 64 -> 256 channels at 56^2 ~1.15x the time).
static inline bool short_k_gemm(const RowsView& R) {
    return R.taps == 1 && !R.u8 && R.nbt >= 1 && R.nbt <= 4 && (R.Bp == 16 || R.Bp == 32);
}

// Tile (r0, mr <= kShortRows rows) x one panel of a short_k_gemm: raw values into out directly
// (a whole panel, no epilogue, not transposed) or into a stack tile, then the epilogue or the
// store. Takes every tile (returns true).
static inline bool run_short_k_tile(int mr, const RowsView& R, int64_t r0, const uint8_t* panel, float* out,
                                    int64_t ldo, int nc, bool trans, const VecEpilogue* ve) {
    alignas(32) float tmp[kShortRows][NR];
    const bool direct = !ve && !trans && nc == NR;
    float* dst = direct ? out : &tmp[0][0];
    const int64_t ldd = direct ? ldo : NR;
    if (R.Bp == 16) short_k_raw_mr<8>(mr, R, r0, panel, dst, ldd);
    else short_k_raw_mr<16>(mr, R, r0, panel, dst, ldd);
    if (direct) return true;
    if (ve) {
        epi_tile(*ve, &tmp[0][0], NR, out, mr, nc, ldo);
        return true;
    }
    store_tile(&tmp[0][0], NR, mr, nc, out, ldo, trans);
    return true;
}
#define BFP_SHORT_K 1                  // short_k_gemm / run_short_k_tile (driver.inc)
#define BFP_SHORT_K_ROWS kShortRows    // ... whose tiles have up to this many rows
#define BFP_EPI_BATCH 1                // epi_tile takes any width: short-K rows get one epilogue call a row tile

#include "driver.inc"

}  // namespace avx2
}  // namespace bfp

// AVX-512 depthwise convolution (see DwArgs in bfp.h): NHWC, weights [taps][C], fused epilogue.
//
// Numerics (the same as dwconv_nhwc in runtime.cpp, bit for bit): every output is the sum
// (((0 + x_t0*w_t0) + x_t1*w_t1) + ...) over the taps in order, each product rounded to fp32
// and then added (vmulps + vaddps: -ffp-contract=off), or fused into one FMA where every
// product is exact in fp32 (the strips of a tile this kernel quantizes: fma_exact), which is
// the same sum bit for bit; a padded tap adds 0 * w (a NaN/Inf weight still makes NaN). The
// epilogue (bias, residual, activation, each rounded to the vector precision) is applied to
// each stored row of 16 channels while it is in L1 (epi_tile).
//
// Blocking: one work item is (image, output row(s), 16 channels); it walks each row in strips
// of up to 8 output pixels: 8 accumulators, taps in order, the tap's 16 weights loaded once
// and used for the 8 pixels; the epilogue then runs over the row. Channel tails (C % 16) use
// masked loads and stores.
// With DwArgs::fq an item is (image, block of output rows, group of 16-channel blocks): it first
// quantizes the input rows under its output rows, for its channels, into a tile (L2), reading
// each pixel's channels in one run, with the padding columns as zeros; the strips then read the
// tile, never testing a column: the input is read once and no fake-quantized copy of it goes
// through memory. With DwArgs::produce the tile comes from the producer (a fused expansion
// conv computes those rows' channels into it, W pixels a row: the edge strips test columns)
// and the input never exists in memory at all.
#include "isa512.h"  // native or emulated (avx512-emu) build

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace BFP_AVX512_NS {
namespace {

#include "epi512.inc"

template <bool FULL>
static inline __m512 ld(const float* p, int n) {
    if constexpr (FULL) return _mm512_loadu_ps(p);
    else return load_lanes(p, n);
}

// f(std::integral_constant<int, q.path>())
template <class F>
static inline void with_path(const Quant16& q, F&& f) {
    switch (q.path) {
        case kElemEven: f(std::integral_constant<int, kElemEven>()); break;
        case kElemAway: f(std::integral_constant<int, kElemAway>()); break;
        default: f(std::integral_constant<int, kElemZero>()); break;
    }
}

// The input the strips read: pixel ix of input row iy at base + (iy - iy0) * rs + ix * xs, for
// ix in [xlo, xhi): columns [xlo, 0) and [W, xhi) hold +0 (a quantized tile's padding columns,
// so that every strip of a row reads its windows without column tests; +0 * w there is the
// padded tap's 0 * w).
struct XView {
    const float* base;
    int64_t iy0, rs, xs, xlo, xhi;
};

// One strip: output pixels [ox0, ox0 + NP) of row oy of image n, channels [c0, c0 + nl).
// FX / FW: the input / weight loads are whole vectors (else the first nl lanes).
// SW > 0: the geometry is known here -- stride SW, KW taps a row, no dilation, 16 floats a
// pixel (the quantized tile) -- so every load's offset is a constant (no pixel pointers to keep
// in registers) and the tap loop unrolls; SW == 0: any geometry.
// FMA: each product and its addition as one fused multiply-add -- the same bits as vmulps +
// vaddps wherever every product x * w is exact in fp32, which the caller guarantees (see
// fma_exact); half the arithmetic.
template <bool FMA>
static inline __m512 madd(__m512 acc, __m512 x, __m512 w) {
    if constexpr (FMA) return _mm512_fmadd_ps(x, w, acc);
    else return _mm512_add_ps(acc, _mm512_mul_ps(x, w));
}

// The depthwise epilogue of the common form, applied to the accumulators before the store:
// + bias, rounded to fp16, then a clip with lo <= hi (ReLU6) -- epi_tile_t's fast clip with a
// bias, bit for bit. Other epilogues run over the stored row (epi_rows).
struct DwEpi {
    __m512 b, lo, hi;  // the bias of the strip's channels; the rounded bounds
};
static inline bool dw_epi_in_registers(const VecEpilogue* e) {
    return e && e->vp == 1 && e->act == 2 && e->lo <= e->hi && e->bias && !e->res && !e->fq && !e->cbs;
}

template <int NP, bool FX, bool FW, int SW, int KW, bool IN, bool FMA, bool EPI>
static inline void strip(const DwArgs& a, const XView& X, int64_t n, int64_t oy, int64_t ox0, int64_t c0, int nl,
                         const DwEpi& ep) {
    static_assert((SW == 0) == (KW == 0), "SW and KW are given together");
    const int64_t C = a.C, W = a.W, xs = SW ? 16 : X.xs, sw = SW ? SW : a.sw, sC = sw * xs;
    const int kw = KW ? KW : a.kw, dw = SW ? 1 : a.dw;
    __m512 acc[NP];  // every loop over j fully unrolled: the accumulators stay in registers
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[j] = _mm512_setzero_ps();
    const int64_t ixs = ox0 * sw - a.pl;  // input column of pixel 0 under tap kx = 0
    const __m512 zero = _mm512_setzero_ps();
    for (int ky = 0; ky < a.kh; ++ky) {
        const int64_t iy = oy * a.sh - a.pt + int64_t(ky) * a.dh;
        const bool row_in = iy >= 0 && iy < a.H;
        const float* wt = a.w + int64_t(ky) * kw * C + c0;
        if (!row_in) {  // the whole row is padding: 0 * w per tap
#pragma GCC unroll 8
            for (int kx = 0; kx < kw; ++kx) {
                const __m512 zw = _mm512_mul_ps(zero, ld<FW>(wt + kx * C, nl));
#pragma GCC unroll 8
                for (int j = 0; j < NP; ++j) acc[j] = _mm512_add_ps(acc[j], zw);
            }
            continue;
        }
        const float* row = X.base + (iy - X.iy0) * X.rs;
        if constexpr (IN) {  // every column of the strip's windows inside the input
            const float* b = row + ixs * xs;
#pragma GCC unroll 8
            for (int kx = 0; kx < kw; ++kx) {
                const __m512 wv = ld<FW>(wt + kx * C, nl);
                const float* bk = b + int64_t(kx) * dw * xs;
#pragma GCC unroll 8
                for (int j = 0; j < NP; ++j) acc[j] = madd<FMA>(acc[j], ld<FX>(bk + j * sC, nl), wv);
            }
        } else {
#pragma GCC unroll 8
            for (int kx = 0; kx < kw; ++kx) {
                const __m512 wv = ld<FW>(wt + kx * C, nl);
                const int64_t ix0 = ixs + int64_t(kx) * dw;
#pragma GCC unroll 8
                for (int j = 0; j < NP; ++j) {
                    const int64_t ix = ix0 + int64_t(j) * sw;
                    const __m512 xv = (ix >= 0 && ix < W) ? ld<FX>(row + ix * xs, nl) : zero;
                    acc[j] = madd<FMA>(acc[j], xv, wv);
                }
            }
        }
    }
    float* d = a.out + ((n * a.OH + oy - a.orow0) * a.OW + ox0) * C + c0;
    if constexpr (EPI) {
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j) acc[j] = _mm512_min_ps(ep.hi, _mm512_max_ps(ep.lo, vround512(_mm512_add_ps(acc[j], ep.b), 1)));
    }
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) store_lanes(d + j * C, acc[j], nl);
}

// A strip whose windows stay inside the input's columns takes the loop without column tests
template <int NP, bool FX, bool FW, int SW, int KW, bool FMA, bool EPI>
static inline void strip_any(const DwArgs& a, const XView& X, int64_t n, int64_t oy, int64_t ox0, int64_t c0, int nl,
                             const DwEpi& ep) {
    const int64_t sw = SW ? SW : a.sw, dw = SW ? 1 : a.dw, kw = KW ? KW : a.kw;
    const int64_t ixs = ox0 * sw - a.pl;
    if (ixs >= X.xlo && ixs + int64_t(NP - 1) * sw + (kw - 1) * dw < X.xhi)
        strip<NP, FX, FW, SW, KW, true, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep);
    else
        strip<NP, FX, FW, SW, KW, false, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep);
}

template <bool FX, bool FW, int SW, int KW, bool FMA, bool EPI>
static void row_strips_t(const DwArgs& a, const XView& X, int64_t n, int64_t oy, int64_t c0, int nl, const DwEpi& ep) {
    int64_t ox0 = 0;
    for (; ox0 + 8 <= a.OW; ox0 += 8) strip_any<8, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep);
    switch (int(a.OW - ox0)) {
        case 7: strip_any<7, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 6: strip_any<6, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 5: strip_any<5, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 4: strip_any<4, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 3: strip_any<3, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 2: strip_any<2, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        case 1: strip_any<1, FX, FW, SW, KW, FMA, EPI>(a, X, n, oy, ox0, c0, nl, ep); break;
        default: break;
    }
}

// One output row's strips, channels [c0, c0 + nl), and its epilogue: the common form in the
// strips' registers (DwEpi), any other over the row's outputs, still in L1 (one call a row)
template <bool FX, bool FW, int SW = 0, int KW = 0, bool FMA = false>
static void row_strips(const DwArgs& a, const XView& X, int64_t n, int64_t oy, int64_t c0, int nl) {
    float* d = a.out + (n * a.OH + oy - a.orow0) * a.OW * a.C + c0;
    if (dw_epi_in_registers(a.epi)) {
        const VecEpilogue& e = *a.epi;
        const DwEpi ep{load_lanes(epi_bias(e, d), nl), vround512(_mm512_set1_ps(e.lo), 1),
                       vround512(_mm512_set1_ps(e.hi), 1)};
        row_strips_t<FX, FW, SW, KW, FMA, true>(a, X, n, oy, c0, nl, ep);
        return;
    }
    row_strips_t<FX, FW, SW, KW, FMA, false>(a, X, n, oy, c0, nl, DwEpi{});
    if (a.epi) epi_rows(*a.epi, d, a.OW, nl, a.C);
}

// One output row's strips from the quantized tile: the common geometries (3x3 and 5x5, stride
// 1 or 2, no dilation) with every offset a constant, any other through the generic strips.
template <bool FW, bool FMA>
static void tile_row_strips(const DwArgs& a, const XView& X, int64_t n, int64_t oy, int64_t c0, int nl) {
    const int g = a.dw != 1 ? 0 : a.sw * 8 + a.kw;
    switch (g) {
        case 1 * 8 + 3: row_strips<true, FW, 1, 3, FMA>(a, X, n, oy, c0, nl); break;
        case 2 * 8 + 3: row_strips<true, FW, 2, 3, FMA>(a, X, n, oy, c0, nl); break;
        case 1 * 8 + 5: row_strips<true, FW, 1, 5, FMA>(a, X, n, oy, c0, nl); break;
        case 2 * 8 + 5: row_strips<true, FW, 2, 5, FMA>(a, X, n, oy, c0, nl); break;
        default: row_strips<true, FW, 0, 0, FMA>(a, X, n, oy, c0, nl); break;
    }
}

// Input rows [lo, hi] of image n, channel blocks [cb0, cb1), quantized into tile: block cb's
// rows at tile + (cb - cb0) * plane, 16 floats a pixel, padl + W + padr pixels a row, input
// column ix at pixel padl + ix; the padding pixels and the lanes past C hold +0.
// Each pixel's channels are read in one run. The lanes that need the scalar path are rare: a
// row's vectors only gather them (one mask OR a vector), and a row that has any is walked again.
// RANGE: also returns the range of the input's non-zero values as their bits doubled (sign
// out; the exponent field in the top byte): a value on the vector path keeps its exponent (a
// carry into the next binade is clamped), so that is the range of the tile's values, unless
// untracked (a lane took the scalar path: no range is claimed).
// Lane reductions of the range trackers below
static inline uint32_t hmin_u32(__m512i v) {
    alignas(64) uint32_t t[16];
    _mm512_store_si512(t, v);
    uint32_t m = t[0];
    for (int l = 1; l < 16; ++l) m = t[l] < m ? t[l] : m;
    return m;
}
static inline uint32_t hmax_u32(__m512i v) {
    alignas(64) uint32_t t[16];
    _mm512_store_si512(t, v);
    uint32_t m = t[0];
    for (int l = 1; l < 16; ++l) m = t[l] > m ? t[l] : m;
    return m;
}
static inline uint32_t hor_u32(__m512i v) {
    alignas(64) uint32_t t[16];
    _mm512_store_si512(t, v);
    uint32_t m = 0;
    for (int l = 0; l < 16; ++l) m |= t[l];
    return m;
}

// vmin / vmax: the unsigned min of the non-zero lanes / max of every lane of x's bits doubled
static inline void track_range(__m512i& vmin, __m512i& vmax, __m512 x) {
    const __m512i a2 = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_castps_si512(x));
    vmax = _mm512_max_epu32(vmax, a2);
    vmin = _mm512_mask_min_epu32(vmin, _mm512_test_epi32_mask(a2, a2), vmin, a2);
}

template <int P, bool RANGE>
static ElemRange quantize_tile(const DwArgs& a, const Quant16& qa, int64_t n, int64_t lo, int64_t hi, int64_t cb0,
                               int64_t cb1, int64_t plane, int64_t padl, int64_t padr, float* tile) {
    const Quant16 q = qa;  // a local copy: no tile store can alias its constants
    // the doubled bits' range of the non-zero lanes (lanes past C are +0): a row's in registers
    // (rmin / rmax), merged into the whole tile's once a row (vmin / vmax are live across the
    // scalar path's calls, so they live on the stack: tracking them a vector was a store-to-load
    // chain per vector)
    __m512i vmin = _mm512_set1_epi32(-1), vmax = _mm512_setzero_si512();
    ElemRange r;
    const int64_t C = a.C, W = a.W;
    const int tail = int(C - (cb1 - 1) * 16 < 16 ? C - (cb1 - 1) * 16 : 16);  // lanes of the last block
    const int64_t nfull = tail == 16 ? cb1 - cb0 : cb1 - cb0 - 1;
    for (int64_t iy = lo; iy <= hi; ++iy) {
        const int64_t s0 = ((n * a.H + iy) * W) * C + cb0 * 16;  // element index of the row's first channel
        const float* srow = a.x + s0;
        float* drow = tile + ((iy - lo) * (padl + W + padr) + padl) * 16;
        // the padding pixels (the blocks inner: a vector store each, not a memset call per run)
        for (int64_t ix = padl ? -padl : W; ix < W + padr; ix = ix == -1 ? W : ix + 1)
            for (int64_t k = 0; k < cb1 - cb0; ++k) _mm512_store_ps(drow + k * plane + ix * 16, _mm512_setzero_ps());
        __mmask16 any = 0;
        __m512i rmin = _mm512_set1_epi32(-1), rmax = _mm512_setzero_si512();
        for (int64_t ix = 0; ix < W; ++ix) {
            const float* s = srow + ix * C;
            float* d = drow + ix * 16;
            for (int64_t k = 0; k < nfull; ++k) {
                __mmask16 bad;
                const __m512 xv = _mm512_loadu_ps(s + k * 16);
                _mm512_store_ps(d + k * plane, q.quant<P>(xv, bad));
                if constexpr (RANGE) track_range(rmin, rmax, xv);
                any |= bad;
            }
            if (tail != 16) {
                __mmask16 bad;
                const __m512 xv = load_lanes(s + nfull * 16, tail);
                _mm512_store_ps(d + nfull * plane, q.quant<P>(xv, bad));
                if constexpr (RANGE) track_range(rmin, rmax, xv);
                any |= bad & lanes(tail);
            }
        }
        if constexpr (RANGE) {
            vmin = _mm512_min_epu32(vmin, rmin);
            vmax = _mm512_max_epu32(vmax, rmax);
        }
        if (__builtin_expect(any == 0, 1)) continue;
        r.untracked = true;
        for (int64_t ix = 0; ix < W; ++ix)
            for (int64_t k = 0; k <= nfull && k < cb1 - cb0; ++k) {
                const int nl = k < nfull ? 16 : tail;
                __mmask16 bad;
                q.quant<P>(load_lanes(srow + ix * C + k * 16, nl), bad);
                bad &= lanes(nl);
                for (int j = 0; j < nl; ++j)
                    if (bad >> j & 1) drow[k * plane + ix * 16 + j] = a.fq_fix(a.fq_ctx, s0 + ix * C + k * 16 + j);
            }
    }
    if constexpr (RANGE) {
        r.a2min = hmin_u32(vmin);
        r.a2max = hmax_u32(vmax);
    }
    return r;
}

// When every product x * w of a depthwise conv is exact in fp32, x * w + acc fused (one
// rounding) is the datapath's fp32(fp32(x * w) + acc) (two): the strips may use FMAs. With x a
// one-element value of unit_shift ux (at most ux fraction bits) and w one with at most fw
// fraction bits, x * w has at most ux + fw + 2 significant bits and its lowest at exponent
// ex + ew - ux - fw (ex, ew: their exponents): exact when ux + fw <= 22, every ex + ew >=
// ux + fw - 149 (no bit below 2^-149) and every ex + ew <= 126 (below 2^128: finite). Zero
// products are exact, and an Inf or NaN factor makes the same Inf or NaN either way (a NaN's
// payload aside); a subnormal weight (rare) is not claimed.
struct WeightRange {
    bool ok = true;       // no subnormal weight
    bool any = false;     // a non-zero finite weight exists
    int elo = 0, ehi = 0;  // the exponents of the non-zero finite weights
    int fw = 0;           // their fraction bits (the most any has)
};
static WeightRange weight_range(const float* w, int64_t n) {
    __m512i vmin = _mm512_set1_epi32(-1), vmax = _mm512_setzero_si512(), vor = _mm512_setzero_si512();
    __mmask16 sub = 0;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    for (int64_t i = 0; i < n; i += 16) {
        const int nl = int(n - i < 16 ? n - i : 16);
        const __m512i b = _mm512_and_si512(_mm512_castps_si512(load_lanes(w + i, nl)), absm);
        const __mmask16 nzf = _mm512_test_epi32_mask(b, b) & _mm512_cmpgt_epi32_mask(inf, b);  // (b < 2^31: signed)
        vmin = _mm512_mask_min_epu32(vmin, nzf, vmin, b);
        vmax = _mm512_mask_max_epu32(vmax, nzf, vmax, b);
        vor = _mm512_mask_or_epi32(vor, nzf, vor, b);
        sub |= nzf & _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(0x00800000), b);
    }
    const uint32_t lo = hmin_u32(vmin), hi = hmax_u32(vmax), o = hor_u32(vor);
    WeightRange r;
    r.ok = sub == 0;
    r.any = hi != 0;
    if (r.any) {
        r.elo = int(lo >> 23) - 127;
        r.ehi = int(hi >> 23) - 127;
        const uint32_t m = o & 0x7fffff;
        r.fw = m ? 23 - __builtin_ctz(m) : 0;
    }
    return r;
}

// The strips of a tile may fuse (see WeightRange): weights wr, the tile's values t (RANGE), x's unit_shift ux
static bool fma_exact(const WeightRange& wr, const ElemRange& t, int ux) {
    if (!wr.ok || t.untracked) return false;
    if (!wr.any || t.a2max == 0) return true;  // every product is +-0 (or Inf / NaN)
    const int exlo = int(t.a2min >> 24) - 127, exhi = int(t.a2max >> 24) - 127;
    return ux + wr.fw <= 22 && exlo + wr.elo >= ux + wr.fw - 149 && exhi + wr.ehi <= 126;
}

}  // namespace

namespace {
template <int P>
void fake_quantize_elems_t(const float* x, int64_t n, const Quant16& qa, float* out,
                           float (*fix)(const void* ctx, int64_t i), const void* ctx) {
    const Quant16 q = qa;
    for (int64_t i = 0; i < n; i += 16) {
        const int nl = int(n - i < 16 ? n - i : 16);
        __mmask16 bad;
        const __m512 val = q.quant<P>(nl == 16 ? _mm512_loadu_ps(x + i) : load_lanes(x + i, nl), bad);
        const __mmask16 ok = __mmask16(~bad) & lanes(nl);
        if (ok == 0xffff) {
            _mm512_storeu_ps(out + i, val);
            continue;
        }
#ifdef BFP_AVX512_EMULATED
        alignas(64) float t[16];
        _mm512_store_ps(t, val);
        for (int j = 0; j < nl; ++j)
            if (ok >> j & 1) out[i + j] = t[j];
#else
        _mm512_mask_storeu_ps(out + i, ok, val);
#endif
        for (int j = 0; j < nl; ++j)
            if (!(ok >> j & 1)) out[i + j] = fix(ctx, i + j);
    }
}
}  // namespace

void fake_quantize_elems(const float* x, int64_t n, const FmtParams& f, float* out,
                         float (*fix)(const void* ctx, int64_t i), const void* ctx) {
    if (!f.simd_elements()) {  // not a format of this quantizer (the runtime never passes one): scalar
        for (int64_t i = 0; i < n; ++i) out[i] = fix(ctx, i);
        return;
    }
    const Quant16 q(elem_quant(f));
    with_path(q, [&](auto p) { fake_quantize_elems_t<decltype(p)::value>(x, n, q, out, fix, ctx); });
}

void dwconv(const DwArgs& a) {
    if (a.fq && !a.fq->simd_elements()) throw std::invalid_argument("dwconv: the input's format is not an int(p) format");
    if (a.produce && !a.fq) throw std::invalid_argument("dwconv: a produced input needs its format");
    if (a.x_quantized) throw std::invalid_argument("dwconv: this kernel quantizes its input itself");
    if (a.oq && (!a.fq || !a.oq_fn || a.oq->C != a.C || (a.epi && a.epi->res)))
        throw std::invalid_argument("dwconv: a quantized output needs fq, a quantizer, C channels and no residual");
    const int64_t ncb = (a.C + 15) / 16, taps = int64_t(a.kh) * a.kw;
    const int nt = num_threads();
    if (!a.fq) {
        const int64_t items = a.N * a.OH * ncb;
        // items per scheduling step: ~1000 vector multiply-adds each, and >= 8 steps per thread
        int64_t chunk = 1000 / (a.OW * taps > 0 ? a.OW * taps : 1);
        const int64_t cap = items / (8 * int64_t(nt));
        if (chunk > cap) chunk = cap;
        if (chunk < 1) chunk = 1;
        const bool par = nt > 1 && items > 1 && items * a.OW * taps * 16 > 32768;
        // items from the pool (pool.h): a descheduled thread (shared machine) does not stall the rest
        const int64_t nchunks = (items + chunk - 1) / chunk;
        parallel_for(par ? nt : 1, nchunks, [&](int64_t ci) {
            const int64_t it_end = (ci + 1) * chunk < items ? (ci + 1) * chunk : items;
            for (int64_t it = ci * chunk; it < it_end; ++it) {
                const int64_t cb = it % ncb, r = it / ncb, oy = r % a.OH, n = r / a.OH;
                const int64_t c0 = cb * 16;
                const int nl = int(a.C - c0 < 16 ? a.C - c0 : 16);
                const XView X{a.x + n * a.H * a.W * a.C + c0, 0, a.W * a.C, a.C, 0, a.W};
                if (nl == 16) row_strips<true, true>(a, X, n, oy, c0, nl);
                else row_strips<false, false>(a, X, n, oy, c0, nl);
            }
        });
        return;
    }
    // Items: (image, block of R output rows, group of cg 16-channel blocks). The item quantizes
    // the input rows under its output rows, for its channel blocks, into a tile in L2 (read in
    // whole pixels: one contiguous run of 16 * cg channels per pixel, not a 64-byte piece of
    // every pixel, which the memory system streams far worse), then runs its strips from there.
    // Tile <= 512 KiB; R as large as fits (the rows under two neighbouring blocks overlap and are
    // quantized twice), channel groups split first when there are too few items for the threads.
    // A tile this kernel quantizes carries the row's padding columns (zeros; see XView): every
    // strip then takes the loop without column tests. A produced tile has W pixels a row.
    const int64_t last_ix = (a.OW - 1) * a.sw - a.pl + int64_t(a.kw - 1) * a.dw;  // the rightmost column read
    const int64_t padl = a.produce ? 0 : a.pl, padr = a.produce || last_ix < a.W ? 0 : last_ix + 1 - a.W;
    const int64_t Wp = padl + a.W + padr;
    auto rows_in = [&](int64_t R) { return (R - 1) * a.sh + int64_t(a.kh - 1) * a.dh + 1; };
    auto tile_of = [&](int64_t R, int64_t cg) {
        const int64_t r = rows_in(R) < a.H ? rows_in(R) : a.H;
        return r * Wp * 64 * cg;
    };
    const int64_t budget = int64_t(512) << 10;
    int64_t R = a.OH < 8 ? a.OH : 8, cg = ncb;
    while (R > 1 && tile_of(R, cg) > budget) --R;
    auto n_items = [&](int64_t R_, int64_t cg_) { return a.N * ((a.OH + R_ - 1) / R_) * ((ncb + cg_ - 1) / cg_); };
    if (a.oq) {
        // an item quantizes whole pixels (every channel block: the exponent range is per pixel),
        // so only the rows are split: R from the largest that fits down to half of it, the one
        // whose busiest thread computes the fewest input rows (the tile's halo included)
        if (nt > 1) {
            int64_t best = R, best_cost = INT64_MAX;
            for (int64_t r = R; r >= 1 && 2 * r >= R; --r) {
                const int64_t cost = (n_items(r, cg) + nt - 1) / nt * rows_in(r);
                if (cost < best_cost) best_cost = cost, best = r;
            }
            R = best;
        }
    } else {
        while (cg > 1 && tile_of(R, cg) > budget) cg = (cg + 1) / 2;
        if (nt > 1) {
            while (cg > 1 && n_items(R, cg) < 4 * int64_t(nt)) cg = (cg + 1) / 2;
            while (R > 1 && n_items(R, cg) < 2 * int64_t(nt)) R = (R + 1) / 2;
        }
    }
    const int64_t tile_rows = rows_in(R) < a.H ? rows_in(R) : a.H;
    const int64_t nrb = (a.OH + R - 1) / R, ncg = (ncb + cg - 1) / cg, items = a.N * nrb * ncg;
    const int64_t plane = tile_rows * Wp * 16;  // floats of one channel block's rows in the tile
    const size_t tile_bytes = (size_t(plane * cg) * 4 + 63) / 64 * 64;
    const Quant16 q(elem_quant(*a.fq));
    const bool par = nt > 1 && items > 1 && a.N * a.OH * ncb * a.OW * taps * 16 > 32768;
    // the strips fuse their multiply-adds where every product is exact (fma_exact): the weights'
    // range once a call, the tile's as it is quantized (a produced tile: as its producer
    // bounds it, DwArgs::produce)
    const WeightRange wr = weight_range(a.w, taps * a.C);
    // items from the pool (pool.h); each thread keeps its tile across calls (<= 512 KiB + a line)
    parallel_for(par ? nt : 1, items, [&](int64_t it) {
        static thread_local float* tile = nullptr;
        static thread_local size_t tile_cap = 0;
        if (tile_cap < tile_bytes) {
            std::free(tile);
            tile = static_cast<float*>(std::aligned_alloc(64, tile_bytes));
            tile_cap = tile ? tile_bytes : 0;
            if (!tile) throw std::bad_alloc();
        }
        const int64_t gi = it % ncg, rb = (it / ncg) % nrb, n = it / (ncg * nrb);
        const int64_t cb0 = gi * cg, cb1 = cb0 + cg < ncb ? cb0 + cg : ncb;
        const int64_t oy0 = rb * R, oy1 = oy0 + R < a.OH ? oy0 + R : a.OH;
        int64_t lo = oy0 * a.sh - a.pt, hi = (oy1 - 1) * a.sh - a.pt + int64_t(a.kh - 1) * a.dh;
        if (lo < 0) lo = 0;
        if (hi > a.H - 1) hi = a.H - 1;
        bool fma = false;
        if (lo <= hi && a.produce) {
            ElemRange r;
            a.produce(a.produce_ctx, n, lo, hi, cb0, cb1, plane, tile, wr.ok ? &r : nullptr);
            fma = wr.ok && fma_exact(wr, r, a.fq->unit_shift);
        } else if (lo <= hi) {
            with_path(q, [&](auto p) {
                constexpr int P = decltype(p)::value;
                if (wr.ok)
                    fma = fma_exact(wr, quantize_tile<P, true>(a, q, n, lo, hi, cb0, cb1, plane, padl, padr, tile),
                                    a.fq->unit_shift);
                else
                    quantize_tile<P, false>(a, q, n, lo, hi, cb0, cb1, plane, padl, padr, tile);
            });
        }
        // a quantized output: the item's rows go to this thread's buffer (its epilogue re-based
        // there: the bias by channel), then through the row quantizer while they are in L2
        static thread_local std::vector<float> obuf;
        DwArgs b;
        VecEpilogue eb;
        if (a.oq) {
            const size_t need = size_t((oy1 - oy0) * a.OW * a.C);
            if (obuf.size() < need) obuf.resize(need);
            b = a;
            b.out = obuf.data();
            b.orow0 = n * a.OH + oy0;
            if (a.epi) {
                eb = *a.epi;
                eb.y = b.out;
                b.epi = &eb;
            }
        }
        const DwArgs& d = a.oq ? b : a;
        for (int64_t cb = cb0; cb < cb1; ++cb) {
            const int64_t c0 = cb * 16;
            const int nl = int(a.C - c0 < 16 ? a.C - c0 : 16);
            const XView X{tile + (cb - cb0) * plane + padl * 16, lo, Wp * 16, 16, -padl, a.W + padr};
            for (int64_t oy = oy0; oy < oy1; ++oy) {
                if (fma) {
                    if (nl == 16) tile_row_strips<true, true>(d, X, n, oy, c0, nl);
                    else tile_row_strips<false, true>(d, X, n, oy, c0, nl);
                } else {
                    if (nl == 16) tile_row_strips<true, false>(d, X, n, oy, c0, nl);
                    else tile_row_strips<false, false>(d, X, n, oy, c0, nl);
                }
            }
        }
        if (a.oq) a.oq_fn(a.oq->rows_at(b.out, (n * a.OH + oy0) * a.OW, (oy1 - oy0) * a.OW, a.C));
    });
}

}  // namespace BFP_AVX512_NS
}  // namespace bfp

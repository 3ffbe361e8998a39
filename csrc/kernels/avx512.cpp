// AVX-512 VNNI kernel: int8 units, vpdpbusd. Compiled with -mavx512f/bw/vl/vnni + -mfma.
//
// Rows (activations of a matmul, weights of a conv) are broadcast 4 units at a time as the
// signed operand; columns are packed into panels of NR=32 as unsigned bytes (units + 128),
// so each block's integer sum is S = sum(u8 * s8) - 128 * sum(row units), started from
// kVnniSumStart (folded into the rows' corrections, see kVnniSumStart below).
// Per block and output: t = S * col_scale, acc = fma(t, row_scale, acc): the same bits
// as fp32(acc + fp32(S) * 2^(Ea+Eb-shifts)) whenever that product is exact, which the driver
// checks per tile (else it calls the exact fallback).
#include "isa512.h"  // native or emulated (avx512-emu) build
#ifdef BFP_AVX512_EMULATED
#define BFP_PIN(a, b) ((void)0)
#else
// keep each accumulator a running sum in one register (no reassociation into a spilled tree)
#define BFP_PIN(a, b) __asm__("" : "+v"(a), "+v"(b))
#endif

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include <cpuid.h>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace BFP_AVX512_NS {

#include "tile.inc"
#include "epi512.inc"

#define MR_MAX 6
// every loop over a tile's rows fully unrolled, so the accumulator arrays stay in registers
// (left to itself GCC keeps them on the stack, zeroed by rep stos: ~18% of a 1x1 conv with
// K = 16-64)
#define BFP_ROWS _Pragma("GCC unroll 8")
static constexpr int MR = 6;  // the most rows a tile has (tile_rows(): the rows it has)
static constexpr int KSTEP = 4;  // k values per int32 lane of a panel

// Panel layout, per block b: [Bp/4][NR] uint32 (4 biased bytes of one column), then [NR] float scales.
size_t panel_bytes(int nb, int Bp) { return size_t(nb) * (size_t(Bp) * NR + NR * 4); }

void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    const int Bp = c.Bp, B4 = Bp / 4;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int t = 0; t < c.taps; ++t) {
        for (int bt = 0; bt < c.nbt; ++bt) {
            const int b = t * c.nbt + bt;
            uint32_t* q = reinterpret_cast<uint32_t*>(dst + b * bstride);
            float* sc = reinterpret_cast<float*>(dst + b * bstride + size_t(Bp) * NR);
            for (int j = 0; j < NR; ++j) {
                if (j >= ncols) {
                    for (int k4 = 0; k4 < B4; ++k4) q[k4 * NR + j] = 0x80808080u;
                    sc[j] = 1.0f;
                    continue;
                }
                const int8_t* src = c.u[(col0 + j) * c.taps + t] + bt * Bp;
                uint32_t any = 0;
    #pragma GCC unroll 16
            for (int k4 = 0; k4 < B4; ++k4) {
                    uint32_t w;
                    std::memcpy(&w, src + 4 * k4, 4);
                    any |= w;
                    q[k4 * NR + j] = w ^ 0x80808080u;  // s8 -> u8 + 128
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

// KS > 0: the block's k-steps known at compile time (fully unrolled); 0: any block.
// Blocks [kb0, kb1) of the taps x nbt blocks (ascending); first: the accumulators start at 0,
// else at the values a previous chunk left in out; last: the epilogue and the final store, else
// the raw accumulators go to out (not transposed) for the next chunk -- the same fp32 sums in
// the same order as one pass (see BFP_KCHUNK in driver.inc). HALF: the tile's columns fit the
// panel's first 16 (nc <= 16: a narrow layer or a panel at the edge): only that half is computed.
// How a tile scales a block's sum by the row's block scale (both give the same bits: the
// product is exact on the fast path, see driver.inc's range check):
//  - FMA: acc = fma(S * col_scale, row_scale, acc) -- two FMAs per accumulator and block;
//  - ADD pipes: acc = acc + scalef(S * col_scale, getexp(row_scale)) -- one FMA, the rest on the
//    FP add pipes. On AMD Zen 4 a 512-bit vpdpbusd and a 512-bit FMA share the two FMA pipes
//    (one each a cycle) while vscalefps / vgetexpps / vaddps run beside them: a 6 x 32 tile's
//    block of 16 takes ~60 instead of ~72 cycles (48 vpdpbusd); measured 0.88-0.94x the time of
//    a 1024^3 GEMM. Intel cores keep FMA (prefer_add_pipes): there vpdpbusd runs on port 0 and
//    leaves the port-5 FMA unit to the scaling, and this path has not been measured on them.
enum TileScaling : int { kScaleFma = 0, kScaleAddPipes = 1 };

static int prefer_add_pipes() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return kScaleFma;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return kScaleFma;
    const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
    return family >= 0x19 ? kScaleAddPipes : kScaleFma;  // Zen 4 and later (AVX-512 on AMD)
}
static std::atomic<int> g_tile_scaling{prefer_add_pipes()};

int tile_scaling() { return g_tile_scaling.load(std::memory_order_relaxed); }
// Rows per GEMM tile, with the scaling: 6 with FMA scaling; 5 with the add pipes, where 6 x 32
// tiles took 1.03-1.04x the time of 5 x 32 ones (Zen 4, interleaved: GEMM 1024^3 prequantized and
// per call, ResNet-50 and EfficientNet-Lite0 at 1 and 2 threads; 4 x 32 was faster still on the
// 1024^3 GEMM but 1.025x on ResNet-50, whose long-K panels then stream from L2 for more tiles).
// With FMA scaling 5 rows were the slower ones there (1.025-1.036x): the FMA reads each row's
// scale from memory as a broadcast operand, the add-pipes form keeps each row's exponent in a
// register. The driver reads it once per GEMM call.
static inline int tile_rows() { return g_tile_scaling.load(std::memory_order_relaxed) == kScaleAddPipes ? 5 : MR; }
void set_tile_scaling(int mode) {
    g_tile_scaling.store(mode < 0 ? prefer_add_pipes() : mode, std::memory_order_relaxed);
}

// NB > 0: K is NB blocks (one tap, nbt = NB <= 4: a 1x1 conv of <= 4 * Bp channels, a short
// matmul) and the tile's rows are consecutive pixels (roff[r0 + i] == roff[r0] + i), so row i's
// units, scales and corrections sit at compile-time offsets from row 0's: one base pointer each
// instead of mr row pointers (which took more registers than there are and went through the
// stack: at K = 16 the tile's scalar work outweighed its vector work).
template <int mr, int KS, bool HALF, bool ADDP, int NB = 0>
static inline void run_tile_kh(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                               int nc, bool trans, const VecEpilogue* ve, int kb0, int kb1, bool first, bool last) {
    constexpr bool CONTIG = NB > 0;
    if constexpr (CONTIG) kb0 = 0, kb1 = NB;  // (the caller checked: constants from here on)
    const int Bp = CONTIG ? 4 * KS : R.Bp, B4 = KS > 0 ? KS : Bp / 4, nbt = CONTIG ? NB : R.nbt;
    const int taps = CONTIG ? 1 : R.taps;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    __m512 acc0[mr], acc1[mr];
    if (first) {
        BFP_ROWS for (int i = 0; i < mr; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    } else {
        BFP_ROWS for (int i = 0; i < mr; ++i) {
            acc0[i] = load_lanes(out + i * ldo, nc);
            acc1[i] = !HALF && nc > 16 ? load_lanes(out + i * ldo + 16, nc - 16) : _mm512_setzero_ps();
        }
    }
    for (int t = CONTIG ? 0 : kb0 / nbt; t < taps && t * nbt < kb1; ++t) {
        const int bt0 = t * nbt < kb0 ? kb0 - t * nbt : 0;
        const int bt1 = (t + 1) * nbt > kb1 ? kb1 - t * nbt : nbt;
        const int8_t* ap[mr];
        const float* sp[mr];
        const int32_t* cp[mr];
        // CONTIG: row i at base + i * NB (units: i * NB * Bp bytes)
        constexpr int64_t rstride = NB;
        const int8_t* abase = nullptr;
        const float* sbase = nullptr;
        const int32_t* cbase = nullptr;
        if constexpr (CONTIG) {
            const int64_t pix0 = R.roff[r0] + R.toff[t];
            abase = static_cast<const int8_t*>(R.u) + pix0 * nbt * Bp;
            sbase = R.scale + pix0 * nbt;
            cbase = R.corr + pix0 * nbt;
        } else {
            BFP_ROWS for (int i = 0; i < mr; ++i) {
                const int64_t pix = R.roff[r0 + i] + R.toff[t];
                ap[i] = static_cast<const int8_t*>(R.u) + pix * nbt * Bp;
                sp[i] = R.scale + pix * nbt;
                cp[i] = R.corr + pix * nbt;
            }
        }
        for (int bt = bt0; bt < bt1; ++bt) {
            const uint8_t* pb = panel + size_t(t * nbt + bt) * bstride;
            __m512i s0[mr], s1[mr];
            // (each correction includes kVnniSumStart, see RowsView)
            BFP_ROWS for (int i = 0; i < mr; ++i)
                s0[i] = s1[i] = _mm512_set1_epi32(CONTIG ? cbase[i * rstride + bt] : cp[i][bt]);
#pragma GCC unroll 16
            for (int k4 = 0; k4 < B4; ++k4) {
                const __m512i b0 = _mm512_load_si512(pb + k4 * 128);
                const __m512i b1 = HALF ? b0 : _mm512_load_si512(pb + k4 * 128 + 64);
                BFP_ROWS for (int i = 0; i < mr; ++i) {
                    int32_t w;
                    std::memcpy(&w, (CONTIG ? abase + i * rstride * Bp : ap[i]) + bt * Bp + 4 * k4, 4);
                    const __m512i av = _mm512_set1_epi32(w);
                    s0[i] = _mm512_dpbusd_epi32(s0[i], b0, av);
                    if constexpr (!HALF) s1[i] = _mm512_dpbusd_epi32(s1[i], b1, av);
                    BFP_PIN(s0[i], s1[i]);
                }
            }
            const __m512 c0 = _mm512_load_ps(reinterpret_cast<const float*>(pb + size_t(Bp) * NR));
            const __m512 c1 = HALF ? c0 : _mm512_load_ps(reinterpret_cast<const float*>(pb + size_t(Bp) * NR + 64));
            // the sums' bits are the floats 1.5 * 2^23 + S (|S| < 2^22; the int32 additions on the
            // way wrap harmlessly), so S * c = fma(that, c, -1.5 * 2^23 * c) in one rounding,
            // exact wherever S * c is -- one instruction instead of a conversion and a multiply
            // (the driver's range check keeps |S| < 2^22 and 1.5 * 2^23 * c finite)
            const __m512 m0 = _mm512_mul_ps(c0, _mm512_set1_ps(-kVnniSumStartValue));
            const __m512 m1 = HALF ? m0 : _mm512_mul_ps(c1, _mm512_set1_ps(-kVnniSumStartValue));
            if constexpr (ADDP) {
                // scalef(t, getexp(2^k)) = t * 2^k exactly; a NaN scale (a NaN block) gives a NaN
                // exponent and a NaN product, as the FMA does
                BFP_ROWS for (int i = 0; i < mr; ++i) {
                    const __m512 er = bfp_getexp_ps(_mm512_set1_ps(CONTIG ? sbase[i * rstride + bt] : sp[i][bt]));
                    acc0[i] = _mm512_add_ps(acc0[i], bfp_scalef_ps(_mm512_fmadd_ps(_mm512_castsi512_ps(s0[i]), c0, m0), er));
                    if constexpr (!HALF)
                        acc1[i] = _mm512_add_ps(acc1[i], bfp_scalef_ps(_mm512_fmadd_ps(_mm512_castsi512_ps(s1[i]), c1, m1), er));
                }
            } else {
                BFP_ROWS for (int i = 0; i < mr; ++i) {
                    const __m512 ra = _mm512_set1_ps(CONTIG ? sbase[i * rstride + bt] : sp[i][bt]);
                    acc0[i] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_castsi512_ps(s0[i]), c0, m0), ra, acc0[i]);
                    if constexpr (!HALF)
                        acc1[i] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_castsi512_ps(s1[i]), c1, m1), ra, acc1[i]);
                }
            }
        }
    }
    if (!last) {  // a chunk: the raw accumulators wait in out (never transposed)
        BFP_ROWS for (int i = 0; i < mr; ++i) {
            store_lanes(out + i * ldo, acc0[i], nc);
            if (!HALF && nc > 16) store_lanes(out + i * ldo + 16, acc1[i], nc - 16);
        }
        return;
    }
    if (ve) {
        // the conv epilogue (specialised per configuration): the raw tile waits on the stack and
        // the epilogue writes out once, reading each residual vector before that vector of out
        // is written, so the residual may be the output buffer (an add in place); never
        // transposed (GemmArgs::epi)
        alignas(64) float tmp[mr][NR];
        BFP_ROWS for (int i = 0; i < mr; ++i) {
            _mm512_store_ps(tmp[i], acc0[i]);
            if constexpr (!HALF) _mm512_store_ps(tmp[i] + 16, acc1[i]);
        }
        epi_tile(*ve, &tmp[0][0], NR, out, mr, nc, ldo);
        return;
    }
    if (!HALF && nc == NR && !trans) {
        BFP_ROWS for (int i = 0; i < mr; ++i) {
            _mm512_storeu_ps(out + i * ldo, acc0[i]);
            _mm512_storeu_ps(out + i * ldo + 16, acc1[i]);
        }
    } else {
        // edge and transposed tiles go through the stack (plain stores: no masked store, whose
        // emulation on other ISAs reads and rewrites the masked-off lanes)
        alignas(64) float tmp[mr][NR];
        BFP_ROWS for (int i = 0; i < mr; ++i) {
            _mm512_store_ps(tmp[i], acc0[i]);
            if constexpr (!HALF) _mm512_store_ps(tmp[i] + 16, acc1[i]);
        }
        store_tile(tmp, nc, out, ldo, trans);
    }
}

template <int mr, int KS>
static inline void run_tile_k(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                              int nc, bool trans, const VecEpilogue* ve, int kb0, int kb1, bool first, bool last) {
    const bool addp = g_tile_scaling.load(std::memory_order_relaxed) == kScaleAddPipes;
    if (nc <= 16) {
        if (addp) run_tile_kh<mr, KS, true, true>(R, r0, panel, out, ldo, nc, trans, ve, kb0, kb1, first, last);
        else run_tile_kh<mr, KS, true, false>(R, r0, panel, out, ldo, nc, trans, ve, kb0, kb1, first, last);
    } else {
        if (addp) run_tile_kh<mr, KS, false, true>(R, r0, panel, out, ldo, nc, trans, ve, kb0, kb1, first, last);
        else run_tile_kh<mr, KS, false, false>(R, r0, panel, out, ldo, nc, trans, ve, kb0, kb1, first, last);
    }
}

// ---------------------------------------------------------------- activation quantizer
// quantize_block's arithmetic (int elements, deterministic rounding) for whole rows: one
// block is Bp/16 vectors, its extras (scale, VNNI correction, exponent range) come from the
// same registers, and units land in the rows operand directly. Every scaling is by a power of
// two and exact wherever it can change the result, as in the AVX2 block quantizer.
// v >= 0, already capped below 2^24. Truncation through int32 (not roundscale, whose
// directed modes the portable intrinsics of the emulated build get wrong).
static inline __m512 round_units16(__m512 v, int mode) {
    if (mode == kNearestEven) return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 tr = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(v));
    if (mode == kTowardZero) return tr;
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(v, tr), _mm512_set1_ps(0.5f), _CMP_GE_OQ);  // ties away
    return _mm512_mask_add_ps(tr, up, tr, _mm512_set1_ps(1.0f));
}



// Units of 16 elements x (signs from x) whose magnitudes are already scaled to
// |x| * 2^(unit_shift - E): rounded, capped, stored as the first min(n, 16) bytes at ub;
// the biased bytes (units + 128) are summed into *sum (two 64-bit lanes), OR-ed into *any.
// The signed units of 16 elements x whose magnitudes are already scaled to
// |x| * 2^(unit_shift - E): rounded, capped.
static inline __m512i units16(__m512 av, __m512 x, int rounding, __m512 cap, __m512 maxu) {
    const __m512 q = _mm512_min_ps(round_units16(_mm512_min_ps(av, cap), rounding), maxu);
    const __m512i qi = _mm512_cvttps_epi32(q);
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_sub_epi32(qi, neg, _mm512_setzero_si512(), qi);
}

// The first min(n, 16) bytes of b8 at ub.
static inline void store_bytes16(__m128i b8, int8_t* ub, int n) {
    if (n >= 16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(ub), b8);
    } else {
        alignas(16) int8_t tmp[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b8);
        std::memcpy(ub, tmp, size_t(n));
    }
}

// units16 stored as the first min(n, 16) bytes at ub; the biased bytes (units + 128) are
// summed into *sum (two 64-bit lanes), OR-ed into *any.
static inline void store_units16(__m512 av, __m512 x, int rounding, __m512 cap, __m512 maxu, int8_t* ub, int n,
                                 __m128i* sum, __m128i* any) {
    const __m128i b8 = _mm512_cvtsepi32_epi8(units16(av, x, rounding, cap, maxu));  // |units| <= 127: no saturation
    *any = _mm_or_si128(*any, b8);
    *sum = _mm_add_epi64(*sum, _mm_sad_epu8(_mm_xor_si128(b8, _mm_set1_epi8(-128)), _mm_setzero_si128()));
    store_bytes16(b8, ub, n);
}

// A block's exponent, scale and VNNI correction from store_units16's sums over nv vectors;
// returns whether any unit is non-zero.
static inline bool finish_block(const QuantRowsArgs& a, int64_t blk, int E, __m128i sum, __m128i any, int nv) {
    const bool nz = !_mm_testz_si128(any, any);
    // lanes past the block were zero units: each added 128 to the sum of biased bytes
    const int32_t usum = int32_t(_mm_cvtsi128_si64(sum) + _mm_extract_epi64(sum, 1)) - 128 * 16 * nv;
    a.E[blk] = int16_t(E);
    a.scale[blk] = block_scale(int16_t(E), a.f->unit_shift, !nz);
    if (a.corr) a.corr[blk] = kVnniSumStart - 128 * usum;
    return nz;
}

// A block that held NaN/Inf: units 0, its exponent marks it, its scale is NaN (a sum of 0).
static inline void nan_block(const QuantRowsArgs& a, int64_t blk, int8_t* ub) {
    std::memset(ub, 0, size_t(a.Bp));
    a.E[blk] = kNanExp;
    a.scale[blk] = block_scale(kNanExp, a.f->unit_shift, true);
    if (a.corr) a.corr[blk] = kVnniSumStart;
}

// Lane r of the result: the maximum of the 16 lanes of v[r] (a tree of shuffles that reduces
// 16 vectors at once; the lane order it leaves is undone by one permutation, found once by
// running the tree on v[r] = r).
struct MaxOp {
    __m512i operator()(__m512i a, __m512i b) const { return _mm512_max_epi32(a, b); }
};
template <class Op>
static inline __m512i hreduce16_raw(const __m512i (&v)[16], Op op) {
    __m512i b[8], c[4], e[2];
    for (int j = 0; j < 8; ++j)
        b[j] = op(_mm512_shuffle_i32x4(v[j], v[j + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                  _mm512_shuffle_i32x4(v[j], v[j + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 4; ++j)
        c[j] = op(_mm512_shuffle_i32x4(b[j], b[j + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm512_shuffle_i32x4(b[j], b[j + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int j = 0; j < 2; ++j)
        e[j] = op(_mm512_unpacklo_epi64(c[j], c[j + 2]), _mm512_unpackhi_epi64(c[j], c[j + 2]));
    const __m512i x = _mm512_unpacklo_epi32(e[0], e[1]), y = _mm512_unpackhi_epi32(e[0], e[1]);
    return op(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
}

static __m512i hmax16_order() {  // idx[r] = the lane where row r's maximum lands
    __m512i v[16];
    for (int r = 0; r < 16; ++r) v[r] = _mm512_set1_epi32(r);
    alignas(64) int32_t lane_row[16], idx[16];
    _mm512_store_si512(lane_row, hreduce16_raw(v, MaxOp{}));
    for (int l = 0; l < 16; ++l) idx[lane_row[l] & 15] = l;
    return _mm512_load_si512(idx);
}

static inline __m512i hmax16(const __m512i (&v)[16], __m512i order) {
    return _mm512_permutexvar_epi32(order, hreduce16_raw(v, MaxOp{}));
}

// The signed units of a vector y = x * 2^(unit_shift - E) already clamped to [-max_units,
// max_units]: rounding is odd-symmetric in every deterministic mode and commutes with the
// clamp (monotone, integer bounds), so this equals sign(x) * min(round(|y|), max_units).
template <int RM>
static inline __m512i round_signed16(__m512 y) {
    if constexpr (RM == kNearestEven) {
#ifdef BFP_AVX512_EMULATED
        return _mm512_cvttps_epi32(_mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
        return _mm512_cvt_roundps_epi32(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    } else if constexpr (RM == kTowardZero) {
        return _mm512_cvttps_epi32(y);
    } else {  // ties away from zero: truncate, then one step away where |fraction| >= 1/2
        __m512i t = _mm512_cvttps_epi32(y);
        const __m512 fr = _mm512_sub_ps(y, _mm512_cvtepi32_ps(t));  // exact
        t = _mm512_mask_add_epi32(t, _mm512_cmp_ps_mask(fr, _mm512_set1_ps(0.5f), _CMP_GE_OQ), t,
                                  _mm512_set1_epi32(1));
        return _mm512_mask_sub_epi32(t, _mm512_cmp_ps_mask(fr, _mm512_set1_ps(-0.5f), _CMP_LE_OQ), t,
                                     _mm512_set1_epi32(1));
    }
}

// The first n dwords / int16 of a vector at p (never touching memory past them)
static inline void store_dwords(void* p, __m512i v, int n) { store_lanes(static_cast<float*>(p), _mm512_castsi512_ps(v), n); }
static inline void store_i16(int16_t* p, __m512i v, int n) {
    const __m256i h = _mm512_cvtsepi32_epi16(v);  // exponents fit: no saturation
    if (n >= 16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
        alignas(32) int16_t t[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), h);
        std::memcpy(p, t, sizeof(int16_t) * size_t(n > 0 ? n : 0));
    }
}

// Rows r < 16 of a group: the per-block extras of blocks [b0, b0 + n), kept block by block in
// buf[slot][16 rows], written row by row (E, scale, corr at row r * nbc + b0) after one 16 x 16
// transpose each, instead of 16 scalar stores per block and array.
// Row r's n <= 4 extras at r * n + j (rows of every block, n == nbc): the 16 x n entries are
// contiguous, vector k holding entries [16k, 16k + 16) -- entry e is block e % n of row e / n,
// buf[16 * (e % n) + e / n]: one or two two-source permutes per vector.
struct SmallIdx {
    alignas(64) int32_t v[5][4][16];  // [n][k][lane]: the source of entry 16k + lane
};
static constexpr SmallIdx small_idx() {
    SmallIdx t{};
    for (int n = 1; n <= 4; ++n)
        for (int k = 0; k < n; ++k)
            for (int i = 0; i < 16; ++i) t.v[n][k][i] = 16 * ((16 * k + i) % n) + (16 * k + i) / n;
    return t;
}
static constexpr SmallIdx kSmallIdx = small_idx();

static inline __m512i gather_small(const int32_t* buf, int n, int k) {
    const __m512i id = _mm512_load_si512(kSmallIdx.v[n][k]);
    const __m512i lo = _mm512_permutex2var_epi32(_mm512_load_si512(buf), id, _mm512_load_si512(buf + 16));
    if (n <= 2) return lo;
    const __m512i hi = _mm512_permutex2var_epi32(_mm512_load_si512(buf + 32), id,
                                                 n > 3 ? _mm512_load_si512(buf + 48) : _mm512_setzero_si512());
    return _mm512_mask_mov_epi32(lo, _mm512_cmpge_epi32_mask(id, _mm512_set1_epi32(32)), hi);
}

static inline void flush_extras(const int32_t* Eb, const int32_t* sb, const int32_t* cb, int n, int16_t* E0,
                                float* sc0, int32_t* corr0, int nbc, int b0) {
    if (n <= 4 && n == nbc) {  // every block of the 16 rows: contiguous extras, built in registers
        for (int k = 0; k < n; ++k) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(E0 + 16 * k), _mm512_cvtsepi32_epi16(gather_small(Eb, n, k)));
            _mm512_storeu_si512(sc0 + 16 * k, gather_small(sb, n, k));
            if (corr0) _mm512_storeu_si512(corr0 + 16 * k, gather_small(cb, n, k));
        }
        return;
    }
    if (n <= 4) {  // short rows (a few blocks): element copies cost less than three transposes
        for (int r = 0; r < 16; ++r)
            for (int j = 0; j < n; ++j) {
                const int64_t o = int64_t(r) * nbc + b0 + j;
                E0[o] = int16_t(Eb[16 * j + r]);
                std::memcpy(sc0 + o, sb + 16 * j + r, sizeof(float));
                if (corr0) corr0[o] = cb[16 * j + r];
            }
        return;
    }
    __m512i v[16];
    for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(Eb + 16 * i);
    transpose16_epi32(v);
    for (int r = 0; r < 16; ++r) store_i16(E0 + int64_t(r) * nbc + b0, v[r], n);
    for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(sb + 16 * i);
    transpose16_epi32(v);
    for (int r = 0; r < 16; ++r) store_dwords(sc0 + int64_t(r) * nbc + b0, v[r], n);
    if (!corr0) return;
    for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(cb + 16 * i);
    transpose16_epi32(v);
    for (int r = 0; r < 16; ++r) store_dwords(corr0 + int64_t(r) * nbc + b0, v[r], n);
}

// Blocks of at most 16 units (one vector), 16 rows at a time: the block maxima come from one
// reduction tree and the exponents are computed for the 16 rows together. Returns false
// (nothing written) for a group that needs the per-row path (a scale below 2^-126).
// Rows past nr repeat row nr - 1 (their results are never stored).
template <int RM, bool FULL>
static bool quantize_rows16_t(const QuantRowsArgs& a, int64_t i0, int nr_in, const __m512i order) {
    const int nr = FULL ? 16 : nr_in;  // a full group: every per-row loop unrolled, no row tests
    const FmtParams& f = *a.f;
    const int B = f.block, Bp = a.Bp, C = a.C, nbc = (C + B - 1) / B;
    const int unit_shift = f.unit_shift, emax_elem = f.emax_elem, exp_min = f.exp_min, exp_max = f.exp_max;
    // k1 = unit_shift - E must not fall below -126 (E <= exp_max): else the per-row path
    if (unit_shift - exp_max < -126) return false;
    const float* const x0 = a.x + i0 * a.xs;
    int8_t* const u0 = a.u + i0 * a.us;
    int16_t* const E0 = a.E + i0 * nbc;
    float* const sc0 = a.scale + i0 * nbc;
    int32_t* const corr0 = a.corr ? a.corr + i0 * nbc : nullptr;
    const int64_t xs = a.xs, us = a.us;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    const __m512 maxu = _mm512_set1_ps(float(f.max_units)), minu = _mm512_set1_ps(-float(f.max_units));
    const __m512 cap = _mm512_set1_ps(float(f.max_units + 1));
    const __m512i maxui = _mm512_set1_epi32(int32_t(f.max_units));
    const __m512i tr4 = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);  // 4x4 transpose
    const __mmask16 rows = lanes(nr);
    int64_t xoff[16];  // row r's floats at x0 + xoff[r]
    for (int r = 0; r < 16; ++r) xoff[r] = (r < nr ? r : nr - 1) * xs;
    __m512i vmn = _mm512_set1_epi32(INT32_MAX), vmx = _mm512_set1_epi32(INT32_MIN);
    const float nan_scale = block_scale(kNanExp, unit_shift, true);
    alignas(64) int32_t Eb[FULL ? 256 : 1], sb[FULL ? 256 : 1], cb[FULL ? 256 : 1];  // see flush_extras
    for (int b = 0; b < nbc; ++b) {
        const int len = C - b * B < B ? C - b * B : B;
        const float* xb = x0 + b * B;
        __m512i ab[16];
        if (len == 16) {
            for (int r = 0; r < 16; ++r) ab[r] = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(xb + xoff[r])), absm);
        } else {
            for (int r = 0; r < 16; ++r) ab[r] = _mm512_and_si512(_mm512_castps_si512(load_lanes(xb + xoff[r], len)), absm);
        }
        const __m512i amax = hmax16(ab, order);  // lane r: row r's max |x| bits
        const __mmask16 bad = _mm512_cmpge_epi32_mask(amax, _mm512_set1_epi32(0x7f800000)) & rows;  // NaN/Inf
        const __mmask16 zero = _mm512_cmpeq_epi32_mask(amax, _mm512_setzero_si512());
        // floor(log2(amax)): exponent bits; subnormals from the leading zeros of the mantissa
        const __mmask16 sub = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(0x00800000), amax) & ~zero;
        __m512i fl = _mm512_sub_epi32(_mm512_srli_epi32(amax, 23), _mm512_set1_epi32(127));
        // a subnormal's bits m (< 2^23) convert exactly: floor(log2(m * 2^-149)) from float(m)
        const __m512i mf = _mm512_castps_si512(_mm512_cvtepi32_ps(amax));
        fl = _mm512_mask_sub_epi32(fl, sub, _mm512_srli_epi32(mf, 23), _mm512_set1_epi32(127 + 149));
        __m512i E = _mm512_sub_epi32(fl, _mm512_set1_epi32(emax_elem));
        E = _mm512_min_epi32(_mm512_max_epi32(E, _mm512_set1_epi32(exp_min)), _mm512_set1_epi32(exp_max));
        E = _mm512_mask_mov_epi32(E, zero, _mm512_set1_epi32(exp_min));
        // y = x * 2^k1 * 2^k2, k1 = min(unit_shift - E, 127), each step exact
        const __m512i k = _mm512_sub_epi32(_mm512_set1_epi32(unit_shift), E);
        const __m512i k1 = _mm512_min_epi32(k, _mm512_set1_epi32(127));
        const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, _mm512_set1_epi32(127)), 23));
        const __m512 s2 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(k, k1), _mm512_set1_epi32(127)), 23));
        const bool two = _mm512_cmpgt_epi32_mask(k, _mm512_set1_epi32(127)) != 0;
        // a block is non-zero iff the unit of its largest magnitude is (units grow with |x|);
        // when no row's largest unit passes max_units, no unit needs the clamp
        __m512 ym = _mm512_mul_ps(_mm512_castsi512_ps(amax), s1);
        if (two) ym = _mm512_mul_ps(ym, s2);
        const __m512i qm = round_signed16<RM>(_mm512_min_ps(ym, cap));
        const __mmask16 nzm = _mm512_cmpgt_epi32_mask(qm, _mm512_setzero_si512()) & rows & __mmask16(~bad);
        const bool clamp = bad != 0 || _mm512_cmpgt_epi32_mask(qm, maxui) != 0;
        alignas(64) float s1v[16], s2v[16];
        _mm512_store_ps(s1v, s1);
        if (two) _mm512_store_ps(s2v, s2);
        // units 4 rows at a time: packed to bytes (signed saturation, as vpmovsdb) with row j's
        // 16 units in 128-bit lane j after a 4x4 dword transpose, stored row by row; each row's
        // sum from 4-unit partial sums (vpdpbusd with ones) and a short shuffle tree
        int8_t* ub = u0 + b * Bp;
        __m512i D[4];
        // the units, with the rare cases (a partial block, a second scaling step, the clamp)
        // decided once per block: the common loop is a load, a multiply and a conversion a row
        auto units = [&](auto l16, auto two_c, auto clamp_c) {
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                __m512i q[4];
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) {
                    const int r = 4 * g + j;
                    const __m512 xv = l16 ? _mm512_loadu_ps(xb + xoff[r]) : load_lanes(xb + xoff[r], len);
                    __m512 y = _mm512_mul_ps(xv, _mm512_set1_ps(s1v[r]));
                    if constexpr (decltype(two_c)::value) y = _mm512_mul_ps(y, _mm512_set1_ps(s2v[r]));
                    if constexpr (decltype(clamp_c)::value) y = _mm512_min_ps(_mm512_max_ps(y, minu), maxu);
                    q[j] = round_signed16<RM>(y);
                }
                const __m512i bq = _mm512_permutexvar_epi32(
                    tr4, _mm512_packs_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3])));
                D[g] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), bq);
                if (Bp == 16) {
                    if (FULL || 4 * g + 0 < nr) _mm_storeu_si128(reinterpret_cast<__m128i*>(ub + (4 * g + 0) * us), _mm512_castsi512_si128(bq));
                    if (FULL || 4 * g + 1 < nr) _mm_storeu_si128(reinterpret_cast<__m128i*>(ub + (4 * g + 1) * us), _mm512_extracti32x4_epi32(bq, 1));
                    if (FULL || 4 * g + 2 < nr) _mm_storeu_si128(reinterpret_cast<__m128i*>(ub + (4 * g + 2) * us), _mm512_extracti32x4_epi32(bq, 2));
                    if (FULL || 4 * g + 3 < nr) _mm_storeu_si128(reinterpret_cast<__m128i*>(ub + (4 * g + 3) * us), _mm512_extracti32x4_epi32(bq, 3));
                } else {
                    alignas(64) int8_t tmp[64];
                    _mm512_store_si512(tmp, bq);
                    for (int j = 0; j < 4 && 4 * g + j < nr; ++j) std::memcpy(ub + (4 * g + j) * us, tmp + 16 * j, size_t(Bp));
                }
            }
        };
        using T_ = std::true_type;
        using F_ = std::false_type;
        if (len == 16 && !two && !clamp) units(T_(), F_(), F_());
        else if (len == 16 && !two) units(T_(), F_(), T_());
        else if (two) units(F_(), T_(), T_());  // (a clamp with no effect where none is needed)
        else units(F_(), F_(), T_());
        // lane j of D[g]: row 4g + j's partial sums; after two levels lane 4j + m holds row 4m + j
        const __m512i X = _mm512_add_epi32(_mm512_unpacklo_epi32(D[0], D[1]), _mm512_unpackhi_epi32(D[0], D[1]));
        const __m512i Y = _mm512_add_epi32(_mm512_unpacklo_epi32(D[2], D[3]), _mm512_unpackhi_epi32(D[2], D[3]));
        const __m512i usum = _mm512_permutexvar_epi32(
            tr4, _mm512_add_epi32(_mm512_unpacklo_epi64(X, Y), _mm512_unpackhi_epi64(X, Y)));  // lane r: row r
        __m512i corr = _mm512_sub_epi32(_mm512_set1_epi32(kVnniSumStart), _mm512_slli_epi32(usum, 7));  // - 128 * sum
        // block_scale: 2^(E - unit_shift) (normal or subnormal), 1.0 for an all-zero block
        const __m512i kk = _mm512_sub_epi32(E, _mm512_set1_epi32(unit_shift));
        const __m512i nrm = _mm512_slli_epi32(_mm512_add_epi32(kk, _mm512_set1_epi32(127)), 23);
        const __m512i sbn = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_add_epi32(kk, _mm512_set1_epi32(149)));
        __m512i sc = _mm512_mask_mov_epi32(sbn, _mm512_cmpge_epi32_mask(kk, _mm512_set1_epi32(-126)), nrm);
        sc = _mm512_mask_mov_epi32(_mm512_castps_si512(_mm512_set1_ps(1.0f)), nzm, sc);
        // a NaN/Inf row: exponent kNanExp, scale NaN, correction kVnniSumStart (its units are zeroed below)
        __m512i Ew = E;
        if (bad) {
            Ew = _mm512_mask_mov_epi32(E, bad, _mm512_set1_epi32(kNanExp));
            sc = _mm512_mask_mov_epi32(sc, bad, _mm512_castps_si512(_mm512_set1_ps(nan_scale)));
            corr = _mm512_mask_mov_epi32(corr, bad, _mm512_set1_epi32(kVnniSumStart));
        }
        if constexpr (FULL) {
            const int slot = b & 15;
            _mm512_store_si512(Eb + 16 * slot, Ew);
            _mm512_store_si512(sb + 16 * slot, sc);
            _mm512_store_si512(cb + 16 * slot, corr);
            if (slot == 15 || b == nbc - 1) flush_extras(Eb, sb, cb, slot + 1, E0, sc0, corr0, nbc, b - slot);
        } else {
            alignas(64) int32_t Ev[16], cv[16];
            alignas(64) float sv[16];
            _mm512_store_si512(Ev, Ew);
            _mm512_store_ps(sv, _mm512_castsi512_ps(sc));
            for (int r = 0; r < nr; ++r) {
                E0[r * nbc + b] = int16_t(Ev[r]);
                sc0[r * nbc + b] = sv[r];
            }
            if (corr0) {
                _mm512_store_si512(cv, corr);
                for (int r = 0; r < nr; ++r) corr0[r * nbc + b] = cv[r];
            }
        }
        if (bad)
            for (int r = 0; r < nr; ++r)
                if ((bad >> r) & 1) std::memset(ub + r * us, 0, size_t(Bp));
        const __m512i ee = _mm512_sub_epi32(E, _mm512_set1_epi32(unit_shift));
        vmn = _mm512_mask_min_epi32(vmn, nzm, vmn, ee);
        vmx = _mm512_mask_max_epi32(vmx, nzm, vmx, ee);
    }
    if constexpr (FULL) {  // the 16 rows' ranges are contiguous
        _mm512_storeu_si512(a.emin + i0, _mm512_min_epi32(_mm512_loadu_si512(a.emin + i0), vmn));
        _mm512_storeu_si512(a.emax + i0, _mm512_max_epi32(_mm512_loadu_si512(a.emax + i0), vmx));
        return true;
    }
    alignas(64) int32_t mn[16], mx[16];
    _mm512_store_si512(mn, vmn);
    _mm512_store_si512(mx, vmx);
    for (int r = 0; r < nr; ++r) {
        if (mn[r] < a.emin[i0 + r]) a.emin[i0 + r] = mn[r];
        if (mx[r] > a.emax[i0 + r]) a.emax[i0 + r] = mx[r];
    }
    return true;
}

template <int RM>
static bool quantize_rows16(const QuantRowsArgs& a, int64_t i0, int nr, const __m512i order) {
    return nr == 16 ? quantize_rows16_t<RM, true>(a, i0, 16, order) : quantize_rows16_t<RM, false>(a, i0, nr, order);
}

// Rows of at most 4 channels (a stem's pixels: one block per row, Bp = 4), 16 contiguous rows
// (x and units) at a time: lane r of channel vector c holds x[r*C + c], so every per-block
// step runs on 16 rows at once and the 16 rows' units are one 64-byte store. The caller checks
// the layout and that unit_shift - exp_max >= -126.
// PLANAR: the rows' channels are planes (QuantRowsArgs::cs): each channel vector is one load.
template <bool PLANAR>
static void quantize_tiny16(const QuantRowsArgs& a, int64_t i0) {
    const FmtParams& f = *a.f;
    const int C = a.C;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    __m512 ch[4];
    __m512i amax = _mm512_setzero_si512();
    if constexpr (PLANAR) {
        for (int c = 0; c < 4; ++c) {
            ch[c] = c < C ? _mm512_loadu_ps(a.x + c * a.cs + i0) : _mm512_setzero_ps();
            amax = _mm512_max_epi32(amax, _mm512_and_si512(_mm512_castps_si512(ch[c]), absm));
        }
    } else {
        const float* x = a.x + i0 * C;
        const __m512 v0 = load_lanes(x, 16 * C), v1 = load_lanes(x + 16, 16 * C - 16);
        const __m512 v2 = load_lanes(x + 32, 16 * C - 32), v3 = load_lanes(x + 48, 16 * C - 48);
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int c = 0; c < 4; ++c) {
            if (c >= C) {
                ch[c] = _mm512_setzero_ps();
                continue;
            }
            const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(C)), _mm512_set1_epi32(c));
            const __m512 lo = _mm512_permutex2var_ps(v0, idx, v1);  // element idx of v0:v1 (idx mod 32)
            const __m512 hi = _mm512_permutex2var_ps(v2, idx, v3);  // element idx - 32 of v2:v3
            ch[c] = _mm512_mask_mov_ps(lo, _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(32)), hi);
            amax = _mm512_max_epi32(amax, _mm512_and_si512(_mm512_castps_si512(ch[c]), absm));
        }
    }
    // the block exponent of each row, as in quantize_rows16
    const __mmask16 bad = _mm512_cmpge_epi32_mask(amax, _mm512_set1_epi32(0x7f800000));
    const __mmask16 zero = _mm512_cmpeq_epi32_mask(amax, _mm512_setzero_si512());
    const __mmask16 sub = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(0x00800000), amax) & ~zero;
    __m512i fl = _mm512_sub_epi32(_mm512_srli_epi32(amax, 23), _mm512_set1_epi32(127));
    const __m512i mf = _mm512_castps_si512(_mm512_cvtepi32_ps(amax));
    fl = _mm512_mask_sub_epi32(fl, sub, _mm512_srli_epi32(mf, 23), _mm512_set1_epi32(127 + 149));
    __m512i E = _mm512_sub_epi32(fl, _mm512_set1_epi32(f.emax_elem));
    E = _mm512_min_epi32(_mm512_max_epi32(E, _mm512_set1_epi32(f.exp_min)), _mm512_set1_epi32(f.exp_max));
    E = _mm512_mask_mov_epi32(E, zero, _mm512_set1_epi32(f.exp_min));
    const __m512i k = _mm512_sub_epi32(_mm512_set1_epi32(f.unit_shift), E);
    const __m512i k1 = _mm512_min_epi32(k, _mm512_set1_epi32(127));
    const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k1, _mm512_set1_epi32(127)), 23));
    const __m512 s2 = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(k, k1), _mm512_set1_epi32(127)), 23));
    const bool two = _mm512_cmpgt_epi32_mask(k, _mm512_set1_epi32(127)) != 0;
    const __m512 maxu = _mm512_set1_ps(float(f.max_units));
    const __m512 cap = _mm512_set1_ps(float(f.max_units + 1));
    __m512i packed = _mm512_setzero_si512(), usum = _mm512_setzero_si512(), anyu = _mm512_setzero_si512();
    for (int c = 0; c < C; ++c) {
        __m512 av = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(ch[c]), absm)), s1);
        if (two) av = _mm512_mul_ps(av, s2);
        const __m512i qi = units16(av, ch[c], f.rounding, cap, maxu);
        usum = _mm512_add_epi32(usum, qi);
        anyu = _mm512_or_si512(anyu, qi);
        packed = _mm512_or_si512(packed, _mm512_slli_epi32(_mm512_and_si512(qi, _mm512_set1_epi32(0xff)), 8 * c));
    }
    const __mmask16 nzm = _mm512_test_epi32_mask(anyu, anyu) & __mmask16(~bad);
    // a NaN/Inf row: units 0, exponent kNanExp, scale NaN, correction kVnniSumStart (see nan_block)
    packed = _mm512_maskz_mov_epi32(__mmask16(~bad), packed);
    _mm512_storeu_si512(a.u + i0 * 4, packed);
    const __m512i kk = _mm512_sub_epi32(E, _mm512_set1_epi32(f.unit_shift));
    const __m512i nrm = _mm512_slli_epi32(_mm512_add_epi32(kk, _mm512_set1_epi32(127)), 23);
    const __m512i sbn = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_add_epi32(kk, _mm512_set1_epi32(149)));
    __m512i sc = _mm512_mask_mov_epi32(sbn, _mm512_cmpge_epi32_mask(kk, _mm512_set1_epi32(-126)), nrm);
    sc = _mm512_mask_mov_epi32(_mm512_castps_si512(_mm512_set1_ps(1.0f)), nzm, sc);
    sc = _mm512_mask_mov_epi32(sc, bad, _mm512_castps_si512(_mm512_set1_ps(__builtin_nanf(""))));
    _mm512_storeu_si512(a.scale + i0, sc);
    if (a.corr)
        _mm512_storeu_si512(a.corr + i0, _mm512_mask_sub_epi32(_mm512_set1_epi32(kVnniSumStart), __mmask16(~bad),
                                                               _mm512_set1_epi32(kVnniSumStart), _mm512_slli_epi32(usum, 7)));
    const __m512i Ew = _mm512_mask_mov_epi32(E, bad, _mm512_set1_epi32(kNanExp));
    alignas(64) int32_t ev[16];
    _mm512_store_si512(ev, Ew);
    for (int r = 0; r < 16; ++r) a.E[i0 + r] = int16_t(ev[r]);
    const __m512i mn = _mm512_loadu_si512(a.emin + i0), mx = _mm512_loadu_si512(a.emax + i0);
    _mm512_storeu_si512(a.emin + i0, _mm512_mask_min_epi32(mn, nzm, mn, kk));
    _mm512_storeu_si512(a.emax + i0, _mm512_mask_max_epi32(mx, nzm, mx, kk));
}

// Rows of at most 4 channels held in planes (QuantRowsArgs::cs; xs == 1): 16 rows at a time
// straight from the planes where quantize_tiny16 applies, every other group of up to 16 rows
// gathered into a contiguous copy first (the same arithmetic either way).
static void quantize_planar(const QuantRowsArgs& a) {
    const FmtParams& f = *a.f;
    const int C = a.C;
    if (C < 1 || C > 4 || a.xs != 1) throw std::invalid_argument("quantize_rows: planar rows take 1 to 4 channels");
    const int nbc = (C + f.block - 1) / f.block;
    int64_t i = 0;
    if (C <= f.block && a.Bp == 4 && a.us == 4 && f.unit_shift - f.exp_max >= -126)
        for (; i + 16 <= a.n; i += 16) quantize_tiny16<true>(a, i);
    for (; i < a.n; i += 16) {
        const int r = int(a.n - i < 16 ? a.n - i : 16);
        alignas(64) float g[64];
        for (int j = 0; j < r; ++j)
            for (int c = 0; c < C; ++c) g[j * C + c] = a.x[c * a.cs + i + j];
        QuantRowsArgs b = a;
        b.x = g;
        b.n = r;
        b.xs = C;
        b.cs = 1;
        b.u = a.u + i * a.us;
        b.E = a.E + i * nbc;
        b.scale = a.scale + i * nbc;
        b.corr = a.corr ? a.corr + i * nbc : nullptr;
        b.emin = a.emin + i;
        b.emax = a.emax + i;
        quantize_rows(b);
    }
}

void quantize_rows(const QuantRowsArgs& a) {
    if (a.cs != 1) return quantize_planar(a);
    const FmtParams& f = *a.f;
    const int B = f.block, Bp = a.Bp, nbc = (a.C + B - 1) / B, nv = (Bp + 15) / 16;
    int64_t i_start = 0;
    if (a.C >= 1 && a.C <= 4 && a.C <= B && Bp == 4 && a.xs == a.C && a.us == 4 && f.unit_shift - f.exp_max >= -126)
        for (; i_start + 16 <= a.n; i_start += 16) quantize_tiny16<false>(a, i_start);
    if (nv == 1 && B <= 16 && a.n - i_start >= 4) {
        static const __m512i order = hmax16_order();
        bool (*q16)(const QuantRowsArgs&, int64_t, int, __m512i) =
            f.rounding == kNearestEven ? quantize_rows16<kNearestEven>
            : f.rounding == kTowardZero ? quantize_rows16<kTowardZero> : quantize_rows16<kNearestAway>;
        while (i_start < a.n) {
            const int nr = int(a.n - i_start < 16 ? a.n - i_start : 16);
            if (!q16(a, i_start, nr, order)) break;
            i_start += nr;
        }
    }
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), expm = _mm512_set1_epi32(0x7f800000);
    const __m512 maxu = _mm512_set1_ps(float(f.max_units));
    const __m512 cap = _mm512_set1_ps(float(f.max_units + 1));  // min(v, cap) rounds to the same capped units
    for (int64_t i = i_start; i < a.n; ++i) {
        const float* x = a.x + i * a.xs;
        int8_t* u = a.u + i * a.us;
        int32_t mn = a.emin[i], mx = a.emax[i];
        for (int b = 0; b < nbc; ++b) {
            const int len = a.C - b * B < B ? a.C - b * B : B;
            __m512 v[8];
            __m512i vmax = _mm512_setzero_si512();
            __mmask16 bad = 0;
            for (int j = 0; j < nv; ++j) {
                v[j] = load_lanes(x + b * B + 16 * j, len - 16 * j);
                const __m512i ab = _mm512_and_si512(_mm512_castps_si512(v[j]), absm);
                bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(ab, expm), expm);
                vmax = _mm512_max_epi32(vmax, ab);  // |x| bit patterns order like the values
            }
            const int64_t blk = i * nbc + b;
            int8_t* ub = u + b * Bp;
            if (bad) {
                nan_block(a, blk, ub);
                continue;
            }
            const int32_t amax_bits = _mm512_reduce_max_epi32(vmax);
            const int E = block_exponent(amax_bits, f);
            int k1 = f.unit_shift - E, k2 = 0;  // v = |x| * 2^k1 * 2^k2, each step exact
            if (k1 > 127) {
                k2 = k1 - 127;
                k1 = 127;
            }
            const __m512 s1 = k1 >= -126 ? _mm512_castsi512_ps(_mm512_set1_epi32((k1 + 127) << 23))
                                         : _mm512_set1_ps(std::ldexp(1.0f, k1));
            const __m512 s2 = _mm512_castsi512_ps(_mm512_set1_epi32((k2 + 127) << 23));
            __m128i sum = _mm_setzero_si128(), any = _mm_setzero_si128();
            for (int j = 0; j < nv; ++j) {
                const __m512 av = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[j]), absm));
                store_units16(_mm512_mul_ps(_mm512_mul_ps(av, s1), s2), v[j], f.rounding, cap, maxu, ub + 16 * j,
                              Bp - 16 * j, &sum, &any);
            }
            const bool nz = finish_block(a, blk, E, sum, any, nv);
            if (nz) {
                const int32_t ee = E - f.unit_shift;
                if (ee < mn) mn = ee;
                if (ee > mx) mx = ee;
            }
        }
        a.emin[i] = mn;
        a.emax[i] = mx;
    }
}

// Short K (one tap, 1-4 blocks of 16 or 32: 1x1 convs of <= 4 * Bp channels, short matmuls): the driver
// (BFP_SHORT_K) offers each tile of such a GEMM here first; a tile of consecutive rows across a
// whole panel half or more runs as run_tile_kh's NB form, any other returns false (the usual
// tile). Decided per GEMM call in the driver, so the tiles of longer K never pass this way.
template <int mr, int KS>
static bool short_k_tile(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo, int nc,
                         bool trans, const VecEpilogue* ve) {
    for (int i = 1; i < mr; ++i)
        if (R.roff[r0 + i] != R.roff[r0] + i) return false;
    const bool addp = g_tile_scaling.load(std::memory_order_relaxed) == kScaleAddPipes;
    const int nb = R.nbt;
    auto go = [&](auto nbc) {
        constexpr int NB = decltype(nbc)::value;
        if (addp) run_tile_kh<mr, KS, false, true, NB>(R, r0, panel, out, ldo, nc, trans, ve, 0, NB, true, true);
        else run_tile_kh<mr, KS, false, false, NB>(R, r0, panel, out, ldo, nc, trans, ve, 0, NB, true, true);
    };
    if (nb == 1) go(std::integral_constant<int, 1>());
    else if (nb == 2) go(std::integral_constant<int, 2>());
    else if (nb == 3) go(std::integral_constant<int, 3>());
    else go(std::integral_constant<int, 4>());
    return true;
}
template <int KS>
static bool short_k_tile_mr(int mr, const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                            int nc, bool trans, const VecEpilogue* ve) {
    switch (mr) {
        case 1: return short_k_tile<1, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        case 2: return short_k_tile<2, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        case 3: return short_k_tile<3, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        case 4: return short_k_tile<4, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        case 5: return short_k_tile<5, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        case 6: return short_k_tile<6, KS>(R, r0, panel, out, ldo, nc, trans, ve);
        default: return false;
    }
}
// Whether a GEMM's tiles may take short_k_tile (checked once a call): blocks of 16 or 32 units
static inline bool short_k_gemm(const RowsView& R) {
    return R.taps == 1 && R.nbt >= 1 && R.nbt <= 4 && (R.Bp == 16 || R.Bp == 32);
}
static inline bool run_short_k_tile(int mr, const RowsView& R, int64_t r0, const uint8_t* panel, float* out,
                                    int64_t ldo, int nc, bool trans, const VecEpilogue* ve) {
    if (nc <= 16) return false;
    return R.Bp == 16 ? short_k_tile_mr<4>(mr, R, r0, panel, out, ldo, nc, trans, ve)
                      : short_k_tile_mr<8>(mr, R, r0, panel, out, ldo, nc, trans, ve);
}
#define BFP_SHORT_K 1    // short_k_gemm / run_short_k_tile (driver.inc)
#define BFP_KCHUNK 1     // run_tile_k takes block ranges (driver.inc)
#define BFP_SUM_MAGIC 1  // the tiles read block sums as floats (kVnniSumStart; driver.inc's range check)
#define BFP_EPI_BATCH 1  // epi_tile takes any width: short-K rows get one epilogue call a row tile (driver.inc)
#include "driver.inc"

}  // namespace BFP_AVX512_NS
}  // namespace bfp

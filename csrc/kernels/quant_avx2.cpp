// AVX2 block quantizer for formats whose units fit a byte (int(p<=7), E2M1, E2M3) and the
// deterministic rounding modes. The same arithmetic as quantize_block (quantize.cpp), in
// float: every scaling is by a power of two and exact wherever it can change the result
// (a scaled magnitude below 2^-126 rounds to 0 in every one of these modes either way).
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "../bfp.h"

namespace bfp {
namespace avx2 {

#include "epi_avx2.inc"

static inline __m256 pow2(int e) {  // 2^e for e in [-126, 127]
    return _mm256_castsi256_ps(_mm256_set1_epi32((e + 127) << 23));
}

static inline __m256i tail_mask(int n) {  // first n lanes (n < 8)
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

static inline __m256 round_mode(__m256 a, int mode) {
    if (mode == kNearestEven) return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (mode == kTowardZero) return _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 fl = _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, fl), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm256_add_ps(fl, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
}

// |x| already scaled by 2^(unit_shift - E) (int) or 2^-E (fp) -> rounded units (float).
// fp elements round at the quantum of their own binade (subnormals at the smallest one).
static inline __m256 round_units(__m256 v, const FmtParams& f) {
    if (f.kind == kInt) return round_mode(v, f.rounding);
    const int m = f.mbits, emin_el = 1 - f.bias, unit_exp = 1 - f.bias - m;
    __m256i binade = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(v), 23), _mm256_set1_epi32(127));
    binade = _mm256_max_epi32(binade, _mm256_set1_epi32(emin_el));
    const __m256i qexp = _mm256_sub_epi32(binade, _mm256_set1_epi32(m));
    // 2^-qexp and 2^(qexp - unit_exp), built from exponent bits (both in normal range)
    const __m256 down = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), qexp), 23));
    const __m256 up = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(qexp, _mm256_set1_epi32(unit_exp)), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(round_mode(_mm256_mul_ps(v, down), f.rounding), up);
}

static inline int32_t hsum_epi32(__m256i v) {  // the sum of the 8 lanes
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
}

// A block's exponent from its n floats (kNanExp when one is NaN/Inf) and the two exact steps
// that scale a magnitude to units: int(p) v = |x| * 2^(unit_shift - E), fp v = |x| * 2^-E.
static inline int block_setup(const float* x, int n, const FmtParams& f, __m256* s1, __m256* s2) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), expm = _mm256_set1_epi32(0x7f800000);
    __m256i vmax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
    for (int k = 0; k < n; k += 8) {
        const __m256i bits = k + 8 <= n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))
                                        : _mm256_maskload_epi32(reinterpret_cast<const int*>(x + k), tail_mask(n - k));
        const __m256i a = _mm256_and_si256(bits, absm);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(a, expm), expm));
        vmax = _mm256_max_epi32(vmax, a);  // |x| bit patterns order like the values
    }
    if (_mm256_movemask_epi8(bad)) return kNanExp;
    __m128i m4 = _mm_max_epi32(_mm256_castsi256_si128(vmax), _mm256_extracti128_si256(vmax, 1));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0x4E));
    m4 = _mm_max_epi32(m4, _mm_shuffle_epi32(m4, 0xB1));
    const int E = block_exponent(_mm_cvtsi128_si32(m4), f);
    int k1 = f.kind == kInt ? f.unit_shift - E : -E, k2 = 0;
    if (k1 > 127) {
        k2 = k1 - 127;
        k1 = 127;
    }
    *s1 = k1 >= -126 ? pow2(k1) : _mm256_set1_ps(std::ldexp(1.0f, k1));
    *s2 = pow2(k2);
    return E;
}

// The signed units (int32 lanes) of the floats x[k, k + 8), lanes past n zero.
static inline __m256i units8(const float* x, int k, int n, const FmtParams& f, __m256 s1, __m256 s2, __m256 maxu) {
    const __m256 xv = k + 8 <= n ? _mm256_loadu_ps(x + k) : _mm256_maskload_ps(x + k, tail_mask(n - k));
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_and_ps(xv, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))), s1), s2);
    const __m256i qi = _mm256_cvttps_epi32(_mm256_min_ps(round_units(v, f), maxu));
    const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_sub_epi32(_mm256_xor_si256(qi, neg), neg);
}

int16_t quantize_block_i8(const float* x, int n, const FmtParams& f, int8_t* out) {
    __m256 s1, s2;
    const int E = block_setup(x, n, f, &s1, &s2);
    if (E == kNanExp) {
        std::memset(out, 0, size_t(n));
        return kNanExp;
    }
    const __m256 maxu = _mm256_set1_ps(float(f.max_units));
    for (int k = 0; k < n; k += 8) {
        const __m256i qi = units8(x, k, n, f, s1, s2, maxu);
        const __m256i w16 = _mm256_packs_epi32(qi, qi);
        const __m256i w8 = _mm256_packs_epi16(w16, w16);
        const __m128i lo = _mm256_castsi256_si128(w8), hi = _mm256_extracti128_si256(w8, 1);
        const __m128i b8 = _mm_unpacklo_epi32(lo, hi);
        if (k + 8 <= n) {
            _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), b8);
        } else {
            alignas(16) int8_t tmp[16];
            _mm_store_si128(reinterpret_cast<__m128i*>(tmp), b8);
            std::memcpy(out + k, tmp, size_t(n - k));
        }
    }
    return int16_t(E);
}

// One block of n <= Bp floats into Bp int8 units at d8 (zero from n on; a NaN/Inf block: kNanExp
// and zero units); *sum (when wanted), *any: their sum and whether one is nonzero; *neg = true
// when one is negative.
template <bool SUM>
static inline int quantize_one_block(const float* x, int n, int Bp, const FmtParams& f, __m256 maxu, int8_t* d8,
                                     int32_t* sum, bool* any, bool* neg) {
    __m256 s1, s2;
    const int E = block_setup(x, n, f, &s1, &s2);
    const bool nan = E == kNanExp;
    __m256i acc = _mm256_setzero_si256(), nz = _mm256_setzero_si256();
    for (int k = 0; k < Bp; k += 16) {
        __m256i q0 = _mm256_setzero_si256(), q1 = _mm256_setzero_si256();
        if (!nan && k < n) q0 = units8(x, k, n, f, s1, s2, maxu);
        if (!nan && k + 8 < n) q1 = units8(x, k + 8, n, f, s1, s2, maxu);
        if (SUM) acc = _mm256_add_epi32(acc, _mm256_add_epi32(q0, q1));
        nz = _mm256_or_si256(nz, _mm256_or_si256(q0, q1));
        const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // units k..k+15
        const __m128i b8 = _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
        if (k + 16 <= Bp) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d8 + k), b8);
        } else {  // Bp is a multiple of 4: the last 4, 8 or 12 units
            alignas(16) int8_t t8[16];
            _mm_store_si128(reinterpret_cast<__m128i*>(t8), b8);
            std::memcpy(d8 + k, t8, size_t(Bp - k));
        }
    }
    if (SUM) *sum = hsum_epi32(acc);
    *any = !_mm256_testz_si256(nz, nz);
    if (_mm256_movemask_ps(_mm256_castsi256_ps(nz))) *neg = true;  // a lane's sign bit: a negative unit
    return E;
}

// RM kEvenByCsr: nearest even by the conversion's own rounding (MXCSR in its default mode,
// round to nearest even: checked per call, see quantize_rows_blocks), one instruction
constexpr int kEvenByCsr = -1;
static inline bool csr_rounds_to_nearest() { return (_mm_getcsr() & 0x6000u) == 0; }

// The signed units of y = x * 2^(unit_shift - E), already clamped to [-max_units, max_units]
// where a clamp can matter: rounding is odd-symmetric in every deterministic mode and commutes
// with the clamp, so this is sign(x) * min(round(|y|), max_units), as units8 computes it.
template <int RM>
static inline __m256i round_signed8(__m256 y) {
    if constexpr (RM == kEvenByCsr) {
        return _mm256_cvtps_epi32(y);
    } else if constexpr (RM == kNearestEven) {
        return _mm256_cvttps_epi32(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (RM == kTowardZero) {
        return _mm256_cvttps_epi32(y);
    } else {  // ties away from zero: truncate, then one step away where |fraction| >= 1/2
        const __m256i t = _mm256_cvttps_epi32(y);
        const __m256 fr = _mm256_sub_ps(y, _mm256_cvtepi32_ps(t));  // exact
        const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(fr, _mm256_set1_ps(0.5f), _CMP_GE_OQ));
        const __m256i dn = _mm256_castps_si256(_mm256_cmp_ps(fr, _mm256_set1_ps(-0.5f), _CMP_LE_OQ));
        return _mm256_add_epi32(_mm256_sub_epi32(t, up), dn);
    }
}

// Lane r: the largest of v[r]'s 8 lanes (a reduction tree over the 8 rows together)
static inline __m256i hmax8(const __m256i (&v)[8]) {
    __m256i t[4], u[2];
    for (int j = 0; j < 4; ++j)
        t[j] = _mm256_max_epi32(_mm256_unpacklo_epi32(v[2 * j], v[2 * j + 1]), _mm256_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 2; ++j)
        u[j] = _mm256_max_epi32(_mm256_unpacklo_epi64(t[2 * j], t[2 * j + 1]), _mm256_unpackhi_epi64(t[2 * j], t[2 * j + 1]));
    return _mm256_max_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20), _mm256_permute2x128_si256(u[0], u[1], 0x31));
}

// The exponents and scaling of 8 blocks from their maxima (lane r: block r's max |x| bits):
// E, the exact scale s = 2^(unit_shift - E) (1 for an all-zero block), nz: the block has a
// nonzero unit (the unit of its largest magnitude is nonzero), clamp: a unit may pass
// max_units. False where a block in `live` (a lane mask) needs the per-block path: NaN/Inf, a
// subnormal maximum, or a scale needing two steps (unit_shift - E > 127).
struct Scale8 {
    __m256i E, nz;
    __m256 s;
    bool clamp;
};
template <int RM>
static inline bool scale8(__m256i amax, const FmtParams& f, int live, Scale8* o) {
    const __m256i zero = _mm256_cmpeq_epi32(amax, _mm256_setzero_si256());
    const __m256i odd = _mm256_or_si256(_mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7f7fffff)),
                                        _mm256_andnot_si256(zero, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), amax)));
    __m256i E = _mm256_sub_epi32(_mm256_srli_epi32(amax, 23), _mm256_set1_epi32(127 + f.emax_elem));
    E = _mm256_min_epi32(_mm256_max_epi32(E, _mm256_set1_epi32(f.exp_min)), _mm256_set1_epi32(f.exp_max));
    E = _mm256_blendv_epi8(E, _mm256_set1_epi32(f.exp_min), zero);
    const __m256i k = _mm256_andnot_si256(zero, _mm256_sub_epi32(_mm256_set1_epi32(f.unit_shift), E));
    const __m256i two = _mm256_cmpgt_epi32(k, _mm256_set1_epi32(127));
    if (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(odd, two))) & live) return false;
    o->E = E;
    o->s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
    const __m256i qm = round_signed8<RM>(_mm256_min_ps(_mm256_mul_ps(_mm256_castsi256_ps(amax), o->s),
                                                       _mm256_set1_ps(float(f.max_units + 1))));
    o->nz = _mm256_cmpgt_epi32(qm, _mm256_setzero_si256());
    o->clamp = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(qm, _mm256_set1_epi32(int32_t(f.max_units))))) != 0;
    return true;
}

// The units of x * s (the clamp applied where it can matter)
template <int RM>
static inline __m256i units_of(__m256 x, __m256 s, bool clamp, float maxu) {
    __m256 y = _mm256_mul_ps(x, s);
    if (clamp) y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-maxu)), _mm256_set1_ps(maxu));
    return round_signed8<RM>(y);
}

// block_scale of the 8 blocks: 2^(E - unit_shift) (normal or subnormal), 1.0 without a nonzero
// unit; kk: E - unit_shift
static inline __m256 scales8(const Scale8& q, int unit_shift, __m256i* kk) {
    *kk = _mm256_sub_epi32(q.E, _mm256_set1_epi32(unit_shift));
    const __m256i nrm = _mm256_slli_epi32(_mm256_add_epi32(*kk, _mm256_set1_epi32(127)), 23);
    const __m256i sbn = _mm256_sllv_epi32(_mm256_set1_epi32(1), _mm256_add_epi32(*kk, _mm256_set1_epi32(149)));
    const __m256i sc = _mm256_blendv_epi8(sbn, nrm, _mm256_cmpgt_epi32(*kk, _mm256_set1_epi32(-127)));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(_mm256_castps_si256(_mm256_set1_ps(1.0f)), sc, q.nz));
}

// One block (len <= 16 channels, Bp == 16) of 8 rows (rows past nr repeat row nr - 1 and are
// never stored): the block maxima and exponents of the 8 rows in vectors (scale8), then each
// row's units with one multiply and one rounding per vector, two rows packed to bytes per
// store. Int(p) formats with unit_shift - exp_max >= -126 and no VNNI corrections. Returns
// false, writing nothing, where scale8 declines. Otherwise the same results as quantize_one_block;
// each row's E - unit_shift (blocks with a nonzero unit) is folded into lane r of kmin / kmax,
// which the caller merges into the row's range once per row group. nbc: the blocks of a row
// (1 with 8 rows: the exponents and scales of the 8 rows are stored as vectors).
template <int RM, bool L16>
static bool quantize_block8(const float* const* xr, int len, int nr, const FmtParams& f, int8_t* const* ur,
                            int16_t* const* Er, float* const* sr, int nbc, __m256i* kmin, __m256i* kmax,
                            __m256i* negacc) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff);
    const __m256i m0 = L16 ? absm : tail_mask(len < 8 ? len : 7);
    const __m256i m1 = L16 ? absm : len > 8 ? tail_mask(len - 8) : _mm256_setzero_si256();
    __m256 x[8][2];
    __m256i ab[8];
    for (int r = 0; r < 8; ++r) {
        const float* p = xr[r];
        if (L16) {
            x[r][0] = _mm256_loadu_ps(p);
            x[r][1] = _mm256_loadu_ps(p + 8);
        } else {
            x[r][0] = len >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m0);
            x[r][1] = _mm256_maskload_ps(p + 8, m1);
        }
        ab[r] = _mm256_max_epi32(_mm256_and_si256(_mm256_castps_si256(x[r][0]), absm),
                                 _mm256_and_si256(_mm256_castps_si256(x[r][1]), absm));
    }
    Scale8 q;
    if (!scale8<RM>(hmax8(ab), f, (1 << nr) - 1, &q)) return false;
    alignas(32) float sv[8];
    _mm256_store_ps(sv, q.s);
    const float maxu = float(f.max_units);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i negv = *negacc;
    for (int r = 0; r < nr; r += 2) {
        __m256i u[4];
        for (int j = 0; j < 2; ++j) {
            const __m256 sc = _mm256_broadcast_ss(&sv[r + j]);
            u[2 * j] = units_of<RM>(x[r + j][0], sc, q.clamp, maxu);
            u[2 * j + 1] = units_of<RM>(x[r + j][1], sc, q.clamp, maxu);
        }
        // bytes: dword lanes [r 0-3, r 8-11, r+1 0-3, r+1 8-11 | r 4-7, r 12-15, r+1 4-7, r+1 12-15]
        const __m256i b = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(u[0], u[1]), _mm256_packs_epi32(u[2], u[3])), order);
        negv = _mm256_or_si256(negv, b);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(ur[r]), _mm256_castsi256_si128(b));
        if (r + 1 < nr) _mm_storeu_si128(reinterpret_cast<__m128i*>(ur[r + 1]), _mm256_extracti128_si256(b, 1));
    }
    *negacc = negv;
    __m256i kk;
    const __m256 sc = scales8(q, f.unit_shift, &kk);
    // the rows' exponent ranges, kept in vectors over the row group's blocks (the caller merges
    // them into emin/emax once); rows past nr repeat row nr - 1 (the same values)
    *kmin = _mm256_min_epi32(*kmin, _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), kk, q.nz));
    *kmax = _mm256_max_epi32(*kmax, _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MIN), kk, q.nz));
    if (nbc == 1 && nr == 8) {  // one block a row: the 8 rows' exponents and scales are contiguous
        const __m128i e16 = _mm_packs_epi32(_mm256_castsi256_si128(q.E), _mm256_extracti128_si256(q.E, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(Er[0]), e16);
        _mm256_storeu_ps(sr[0], sc);
        return true;
    }
    alignas(32) int32_t Ev[8];
    alignas(32) float scv[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(Ev), q.E);
    _mm256_store_ps(scv, sc);
    for (int r = 0; r < nr; ++r) {
        *Er[r] = int16_t(Ev[r]);
        *sr[r] = scv[r];
    }
    return true;
}

// quantize_rows_blocks for int(p) formats with blocks of 16 units: 8 rows at a time per block
// (quantize_block8), the per-block path for the blocks it declines.
template <int RM>
static void quantize_rows8(const QuantRowsArgs& a, bool* neg) {
    const FmtParams& f = *a.f;
    const int B = f.block, nbc = (a.C + B - 1) / B;
    const __m256 maxu = _mm256_set1_ps(float(f.max_units));
    __m256i negacc = _mm256_setzero_si256();
    bool negative = false;
    for (int64_t i0 = 0; i0 < a.n; i0 += 8) {
        const int nr = int(a.n - i0 < 8 ? a.n - i0 : 8);
        const float* xr[8];
        int8_t* ur[8];
        int16_t* Er[8];
        float* sr[8];
        for (int r = 0; r < 8; ++r) {
            const int64_t i = i0 + (r < nr ? r : nr - 1);
            xr[r] = a.x + i * a.xs;
            ur[r] = a.u + i * a.us;
            Er[r] = a.E + i * nbc;
            sr[r] = a.scale + i * nbc;
        }
        __m256i kmin = _mm256_set1_epi32(INT32_MAX), kmax = _mm256_set1_epi32(INT32_MIN);
        for (int cb = 0; cb < nbc; ++cb) {
            const int len = a.C - cb * B < B ? a.C - cb * B : B;
            const bool done = len == 16 ? quantize_block8<RM, true>(xr, len, nr, f, ur, Er, sr, nbc, &kmin, &kmax, &negacc)
                                        : quantize_block8<RM, false>(xr, len, nr, f, ur, Er, sr, nbc, &kmin, &kmax, &negacc);
            if (!done) {
                for (int r = 0; r < nr; ++r) {
                    int32_t sum = 0;
                    bool any;
                    const int E = quantize_one_block<false>(xr[r], len, 16, f, maxu, ur[r], &sum, &any, &negative);
                    *Er[r] = int16_t(E);
                    *sr[r] = block_scale(int16_t(E), f.unit_shift, !any);
                    if (E != kNanExp && any) {
                        const int32_t ee = E - f.unit_shift;
                        a.emin[i0 + r] = ee < a.emin[i0 + r] ? ee : a.emin[i0 + r];
                        a.emax[i0 + r] = ee > a.emax[i0 + r] ? ee : a.emax[i0 + r];
                    }
                }
            }
            for (int r = 0; r < 8; ++r) {
                xr[r] += B;
                ur[r] += 16;
                ++Er[r];
                ++sr[r];
            }
        }
        if (nr == 8) {
            __m256i* mn = reinterpret_cast<__m256i*>(a.emin + i0);
            __m256i* mx = reinterpret_cast<__m256i*>(a.emax + i0);
            _mm256_storeu_si256(mn, _mm256_min_epi32(_mm256_loadu_si256(mn), kmin));
            _mm256_storeu_si256(mx, _mm256_max_epi32(_mm256_loadu_si256(mx), kmax));
        } else {
            alignas(32) int32_t kn[8], kx[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(kn), kmin);
            _mm256_store_si256(reinterpret_cast<__m256i*>(kx), kmax);
            for (int r = 0; r < nr; ++r) {
                a.emin[i0 + r] = kn[r] < a.emin[i0 + r] ? kn[r] : a.emin[i0 + r];
                a.emax[i0 + r] = kx[r] > a.emax[i0 + r] ? kx[r] : a.emax[i0 + r];
            }
        }
    }
    if (negative || _mm256_movemask_epi8(negacc)) *neg = true;
}

template <bool SUM>
static void quantize_rows_blocks_t(const QuantRowsArgs& a, bool* neg) {
    const FmtParams& f = *a.f;
    const int B = f.block, nbc = (a.C + B - 1) / B;
    const __m256 maxu = _mm256_set1_ps(float(f.max_units));
    bool negative = false;
    for (int64_t i = 0; i < a.n; ++i) {
        const float* xr = a.x + i * a.xs;
        int32_t mn = a.emin[i], mx = a.emax[i];
        for (int cb = 0; cb < nbc; ++cb) {
            const int len = a.C - cb * B < B ? a.C - cb * B : B;
            const int64_t blk = i * nbc + cb;
            int32_t sum = 0;
            bool any;
            const int E = quantize_one_block<SUM>(xr + cb * B, len, a.Bp, f, maxu, a.u + i * a.us + int64_t(cb) * a.Bp,
                                                  &sum, &any, &negative);
            a.E[blk] = int16_t(E);
            a.scale[blk] = block_scale(int16_t(E), f.unit_shift, !any);
            if (SUM) a.corr[blk] = kVnniSumStart - 128 * sum;
            if (E != kNanExp && any) {
                const int32_t ee = E - f.unit_shift;
                mn = ee < mn ? ee : mn;
                mx = ee > mx ? ee : mx;
            }
        }
        a.emin[i] = mn;
        a.emax[i] = mx;
    }
    if (negative) *neg = true;
}

void quantize_rows_blocks(const QuantRowsArgs& a, bool* neg) {
    const FmtParams& f = *a.f;
    if (!a.corr && f.kind == kInt && a.Bp == 16 && f.block <= 16 && f.block > 8 && a.cs == 1 &&
        f.unit_shift - f.exp_max >= -126) {
        if (f.rounding == kNearestEven)
            return csr_rounds_to_nearest() ? quantize_rows8<kEvenByCsr>(a, neg) : quantize_rows8<kNearestEven>(a, neg);
        if (f.rounding == kTowardZero) return quantize_rows8<kTowardZero>(a, neg);
        if (f.rounding == kNearestAway) return quantize_rows8<kNearestAway>(a, neg);
    }
    if (a.corr) quantize_rows_blocks_t<true>(a, neg);
    else quantize_rows_blocks_t<false>(a, neg);
}

// Rows of at most 4 channels, one block each (a stem's pixels: Bp == us == 4), 8 rows at a
// time with lanes = rows: channel c of row i is x[c * cs + i] (PLANAR, QuantRowsArgs::cs) or
// x[i * C + c]. The units of a row are one dword of the 32-byte store; scales, corrections and
// ranges are vector stores (nbc == 1). Returns false, writing nothing, where scale8 declines.
template <int RM, bool PLANAR>
static bool quantize_tiny8(const QuantRowsArgs& a, int64_t i0) {
    const FmtParams& f = *a.f;
    const int C = a.C;
    const __m256i absm = _mm256_set1_epi32(0x7fffffff);
    __m256 ch[4];
    if constexpr (PLANAR) {
        for (int c = 0; c < C; ++c) ch[c] = _mm256_loadu_ps(a.x + c * a.cs + i0);
    } else {
        alignas(32) float t[4][8];
        const float* x = a.x + i0 * C;
        for (int j = 0; j < 8; ++j)
            for (int c = 0; c < C; ++c) t[c][j] = x[j * C + c];
        for (int c = 0; c < C; ++c) ch[c] = _mm256_load_ps(t[c]);
    }
    __m256i amax = _mm256_setzero_si256();
    for (int c = 0; c < C; ++c) amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_castps_si256(ch[c]), absm));
    Scale8 q;
    if (!scale8<RM>(amax, f, 0xff, &q)) return false;
    __m256i packed = _mm256_setzero_si256(), usum = _mm256_setzero_si256();
    for (int c = 0; c < C; ++c) {
        const __m256i u = units_of<RM>(ch[c], q.s, q.clamp, float(f.max_units));
        usum = _mm256_add_epi32(usum, u);
        packed = _mm256_or_si256(packed, _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0xff)), 8 * c));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.u + i0 * 4), packed);
    __m256i kk;
    _mm256_storeu_ps(a.scale + i0, scales8(q, f.unit_shift, &kk));
    if (a.corr)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.corr + i0),
                            _mm256_sub_epi32(_mm256_set1_epi32(kVnniSumStart), _mm256_slli_epi32(usum, 7)));
    const __m256i E16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q.E, q.E), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.E + i0), _mm256_castsi256_si128(E16));
    __m256i* mnp = reinterpret_cast<__m256i*>(a.emin + i0);
    __m256i* mxp = reinterpret_cast<__m256i*>(a.emax + i0);
    const __m256i mn = _mm256_loadu_si256(mnp), mx = _mm256_loadu_si256(mxp);
    _mm256_storeu_si256(mnp, _mm256_blendv_epi8(mn, _mm256_min_epi32(mn, kk), q.nz));
    _mm256_storeu_si256(mxp, _mm256_blendv_epi8(mx, _mm256_max_epi32(mx, kk), q.nz));
    return true;
}

// Rows [i0, i0 + count) on the per-block path (planar rows gathered into a contiguous copy first)
static void rows_generic(const QuantRowsArgs& a, int64_t i0, int64_t count) {
    bool neg = false;
    if (a.cs == 1) {
        quantize_rows_blocks(a.rows_at(a.x + i0 * a.xs, i0, count, a.xs), &neg);
        return;
    }
    for (int64_t i = i0; i < i0 + count; i += 16) {
        const int r = int(i0 + count - i < 16 ? i0 + count - i : 16);
        alignas(32) float g[64];
        for (int j = 0; j < r; ++j)
            for (int c = 0; c < a.C; ++c) g[j * a.C + c] = a.x[c * a.cs + i + j];
        QuantRowsArgs b = a.rows_at(g, i, r, a.C);
        b.cs = 1;
        quantize_rows_blocks(b, &neg);
    }
}

template <int RM>
static void quantize_rows_t(const QuantRowsArgs& a) {
    const FmtParams& f = *a.f;
    int64_t i = 0;
    if (a.C <= f.block && a.Bp == 4 && a.us == 4 && f.kind == kInt && f.unit_shift - f.exp_max >= -126) {
        for (; i + 8 <= a.n; i += 8) {
            const bool done = a.cs != 1 ? quantize_tiny8<RM, true>(a, i) : quantize_tiny8<RM, false>(a, i);
            if (!done) rows_generic(a, i, 8);
        }
    }
    if (i < a.n) rows_generic(a, i, a.n - i);
}

void quantize_rows(const QuantRowsArgs& a) {
    if (a.cs != 1 && (a.C < 1 || a.C > 4 || a.xs != 1))
        throw std::invalid_argument("quantize_rows: planar rows take 1 to 4 channels");
    if (a.cs == 1 && a.C >= 1 && a.C <= 4 && a.xs != a.C)  // (the tiny path reads rows of C floats)
        return rows_generic(a, 0, a.n);
    const int rm = a.f->rounding;
    if (rm == kNearestEven && csr_rounds_to_nearest()) quantize_rows_t<kEvenByCsr>(a);
    else if (rm == kNearestEven) quantize_rows_t<kNearestEven>(a);
    else if (rm == kTowardZero) quantize_rows_t<kTowardZero>(a);
    else if (rm == kNearestAway) quantize_rows_t<kNearestAway>(a);
    else throw std::invalid_argument("quantize_rows: deterministic rounding only");
}

bool store_units(const int8_t* u, int n, bool wide, void* dst, int32_t* sum, bool* neg) {
    __m256i acc = _mm256_setzero_si256(), nz = _mm256_setzero_si256();
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + k));
        const __m256i w = _mm256_cvtepi8_epi16(v);
        if (wide) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int16_t*>(dst) + k), w);
        else _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<int8_t*>(dst) + k), v);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi16(1)));
        nz = _mm256_or_si256(nz, w);
    }
    int32_t total = hsum_epi32(acc);
    bool any = !_mm256_testz_si256(nz, nz);
    bool negative = (_mm256_movemask_epi8(nz) & 0xAAAAAAAA) != 0;  // an int16 lane's sign bit
    for (; k < n; ++k) {
        if (wide) static_cast<int16_t*>(dst)[k] = u[k];
        else static_cast<int8_t*>(dst)[k] = u[k];
        total += u[k];
        any |= u[k] != 0;
        negative |= u[k] < 0;
    }
    *sum = total;
    if (neg && negative) *neg = true;
    return any;
}

void widen_units(const int8_t* src, int16_t* dst, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k),
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    for (; k < n; ++k) dst[k] = src[k];
}

// One-element blocks of f (f.simd_elements()), 8 at a time by Quant8 (epi_avx2.inc); the lanes it
// leaves out take fix. out may be x itself: a lane's fix reads only that element, before it is written.
template <int P>
static void fake_quantize_elems_t(const float* x, int64_t n, const Quant8& q, float* out,
                                  float (*fix)(const void* ctx, int64_t i), const void* ctx) {
    auto put = [&](int64_t i, __m256 v, int bad, int len) {
        if (bad == 0 && len == 8) {
            _mm256_storeu_ps(out + i, v);
            return;
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, v);
        for (int j = 0; j < len; ++j) out[i + j] = (bad >> j & 1) ? fix(ctx, i + j) : t[j];
    };
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int bad;
        const __m256 v = q.quant<P>(_mm256_loadu_ps(x + i), bad);
        put(i, v, bad, 8);
    }
    if (i == n) return;
    alignas(32) float t[8] = {};  // the tail through the vector path too (zeros past it)
    std::memcpy(t, x + i, sizeof(float) * size_t(n - i));
    int bad;
    const __m256 v = q.quant<P>(_mm256_load_ps(t), bad);
    put(i, v, bad, int(n - i));
}

void fake_quantize_elems(const float* x, int64_t n, const FmtParams& f, float* out,
                         float (*fix)(const void* ctx, int64_t i), const void* ctx) {
    const Quant8 q(elem_quant(f));
    if (q.path == kElemEven) fake_quantize_elems_t<kElemEven>(x, n, q, out, fix, ctx);
    else if (q.path == kElemAway) fake_quantize_elems_t<kElemAway>(x, n, q, out, fix, ctx);
    else fake_quantize_elems_t<kElemZero>(x, n, q, out, fix, ctx);
}

// Quantizes one channel block (len <= 128 channels) of np <= 8 consecutive pixels of a
// channels-first plane: channel c of pixel j is x[c*HW + j]. Lanes are pixels, so every load
// is contiguous. Writes units[j*ustride + c] (int8) and E[j].
// Returns false, writing nothing, when a pixel needs the exact scalar path (NaN/Inf, a
// subnormal or zero-free tiny block outside the direct exponent range).
bool quantize_pixels8(const float* x, int64_t HW, int np, int len, const FmtParams& f, int8_t* units,
                      int ustride, int16_t* E) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), expm = _mm256_set1_epi32(0x7f800000);
    const __m256i lanes = tail_mask(np < 8 ? np : 7);
    const __m256i lmask = np >= 8 ? _mm256_set1_epi32(-1) : lanes;
    __m256 v[128];
    __m256i amax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
    for (int c = 0; c < len; ++c) {
        const __m256 xv = np >= 8 ? _mm256_loadu_ps(x + c * HW) : _mm256_maskload_ps(x + c * HW, lmask);
        v[c] = xv;
        const __m256i a = _mm256_and_si256(_mm256_castps_si256(xv), absm);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(a, expm), expm));
        amax = _mm256_max_epi32(amax, a);
    }
    if (_mm256_movemask_epi8(bad)) return false;
    // floor(log2(amax)) from the exponent field; amax == 0 gives the minimum exponent
    const __m256i zero_blk = _mm256_cmpeq_epi32(amax, _mm256_setzero_si256());
    const __m256i subn = _mm256_andnot_si256(zero_blk, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x00800000), amax));
    if (_mm256_movemask_epi8(_mm256_and_si256(subn, lmask))) return false;
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(amax, 23), _mm256_set1_epi32(127 + f.emax_elem));
    e = _mm256_max_epi32(e, _mm256_set1_epi32(f.exp_min));
    e = _mm256_min_epi32(e, _mm256_set1_epi32(f.exp_max));
    e = _mm256_blendv_epi8(e, _mm256_set1_epi32(f.exp_min), zero_blk);
    // scale 2^k per lane (int: k = unit_shift - E; fp: k = -E) must be a normal float
    const __m256i k = _mm256_sub_epi32(_mm256_set1_epi32(f.kind == kInt ? f.unit_shift : 0), e);
    const __m256i kout = _mm256_or_si256(_mm256_cmpgt_epi32(k, _mm256_set1_epi32(127)),
                                         _mm256_cmpgt_epi32(_mm256_set1_epi32(-126), k));
    if (_mm256_movemask_epi8(_mm256_andnot_si256(zero_blk, _mm256_and_si256(kout, lmask)))) return false;
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_blendv_epi8(k, _mm256_setzero_si256(), zero_blk), _mm256_set1_epi32(127)), 23));
    const __m256 maxu = _mm256_set1_ps(float(f.max_units));
    const __m256 fabsm = _mm256_castsi256_ps(absm);
    alignas(32) int32_t q[128][8];
    for (int c = 0; c < len; ++c) {
        const __m256 r = round_units(_mm256_mul_ps(_mm256_and_ps(v[c], fabsm), scale), f);
        __m256i qi = _mm256_cvttps_epi32(_mm256_min_ps(r, maxu));
        const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(v[c], _mm256_setzero_ps(), _CMP_LT_OQ));
        qi = _mm256_sub_epi32(_mm256_xor_si256(qi, neg), neg);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q[c]), qi);
    }
    alignas(32) int32_t ee[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(ee), e);
    for (int j = 0; j < np; ++j) {
        E[j] = int16_t(ee[j]);
        int8_t* u = units + j * ustride;
        for (int c = 0; c < len; ++c) u[c] = int8_t(q[c][j]);
    }
    return true;
}

}  // namespace avx2
}  // namespace bfp

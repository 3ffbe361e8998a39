// AVX2 + F16C vector-unit loops of the runtime (conv epilogues): the same arithmetic as the
// portable code in runtime.cpp, bit for bit. fp16 rounding is the hardware conversion
// (vcvtps2ph, round to nearest even, IEEE overflow to Inf, subnormals kept, NaN stays NaN).
#include <immintrin.h>

#include "../bfp.h"
#include "../ops/vmath.h"

namespace bfp {
namespace avx2 {

template <int VP>
static inline __m256 rnd(__m256 v) {
    if constexpr (VP == 1) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (VP == 2) {
        const __m256i b = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb),
                                           _mm256_set1_epi32(int(0xffff0000u)));
        const __m256 isnan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        const __m256 qnan = _mm256_castsi256_ps(_mm256_or_si256(b, _mm256_set1_epi32(0x00400000)));
        return _mm256_blendv_ps(_mm256_castsi256_ps(r), qnan, isnan);
    } else {
        return v;
    }
}

template <int VP>
static inline float rnd1(float x) {
    return _mm256_cvtss_f32(rnd<VP>(_mm256_set1_ps(x)));
}

template <int VP>
static void epi(float* d, const float* b, const float* r, int64_t n, int act, float lo, float hi) {
    const __m256 zero = _mm256_setzero_ps(), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) {
        __m256 v = _mm256_loadu_ps(d + o);
        if (b) v = rnd<VP>(_mm256_add_ps(v, _mm256_loadu_ps(b + o)));
        if (r) v = rnd<VP>(_mm256_add_ps(v, _mm256_loadu_ps(r + o)));
        if (act == 1) {
            // x > 0 ? x : (NaN ? x : 0)
            const __m256 keep = _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            v = rnd<VP>(_mm256_and_ps(v, keep));
        } else if (act == 2) {
            const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
            // v < lo ? lo : (v > hi ? hi : v), NaN kept
            __m256 c = _mm256_blendv_ps(v, vhi, _mm256_cmp_ps(v, vhi, _CMP_GT_OQ));
            c = _mm256_blendv_ps(c, vlo, _mm256_cmp_ps(v, vlo, _CMP_LT_OQ));
            v = _mm256_blendv_ps(rnd<VP>(c), v, nan);
        }
        _mm256_storeu_ps(d + o, v);
    }
    for (; o < n; ++o) {
        float v = d[o];
        if (b) v = rnd1<VP>(v + b[o]);
        if (r) v = rnd1<VP>(v + r[o]);
        if (act == 1) v = rnd1<VP>(v > 0.0f ? v : (v != v ? v : 0.0f));
        else if (act == 2) v = v != v ? v : rnd1<VP>(v < lo ? lo : (v > hi ? hi : v));
        d[o] = v;
    }
}

void epilogue_row(float* d, const float* b, const float* r, int64_t n, int vp, int act, float lo, float hi) {
    if (vp == 1) epi<1>(d, b, r, n, act, lo, hi);
    else if (vp == 2) epi<2>(d, b, r, n, act, lo, hi);
    else epi<0>(d, b, r, n, act, lo, hi);
}

// ops/vmath.h's loops, vectorised by the compiler for AVX2 (the same operations, so the same bits)
void fn_row(int fn, int vp, const float* x, float* y, int64_t n) { vm::fn_row(fn, vp, x, y, n); }
void softmax_row(int vp, const float* s, float* d, int64_t L) { vm::softmax_row(vp, s, d, L); }

}  // namespace avx2
}  // namespace bfp

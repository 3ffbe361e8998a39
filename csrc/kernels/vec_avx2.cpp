// AVX2 + F16C vector-unit loops of the runtime (conv epilogues): the same arithmetic as the
// portable code in runtime.cpp, bit for bit (epi_avx2.inc).
#include <immintrin.h>

#include "../bfp.h"
#include "../ops/vmath.h"

namespace bfp {
namespace avx2 {

#include "epi_avx2.inc"

template <int VP>
static inline float rnd1(float x) {
    return _mm256_cvtss_f32(rnd<VP>(_mm256_set1_ps(x)));
}

template <int VP>
static void epi(float* d, const float* b, const float* r, int64_t n, int act, float lo, float hi) {
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) {
        _mm256_storeu_ps(d + o, epi8<VP>(_mm256_loadu_ps(d + o), b ? b + o : nullptr, r ? r + o : nullptr, act, vlo, vhi));
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

// y = Relu(x) (act 1) or min(max(x, lo), hi) (act 2; a NaN passes) rounded to VP: the unary op's
// loop (ops/elementwise.cpp), bit for bit -- std::max / std::min as their comparisons
template <int VP>
static void act_t(const float* x, float* y, int64_t n, int act, float lo, float hi) {
    const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) {
        __m256 v = _mm256_loadu_ps(x + o);
        if (act == 1) {
            v = _mm256_and_ps(v, _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        } else {
            v = _mm256_blendv_ps(v, vlo, _mm256_cmp_ps(v, vlo, _CMP_LT_OQ));
            v = _mm256_blendv_ps(v, vhi, _mm256_cmp_ps(vhi, v, _CMP_LT_OQ));
        }
        if constexpr (VP == 1)  // a NaN kept as it is (the portable rounding; F16C's drops its low payload bits)
            v = _mm256_blendv_ps(rnd<VP>(v), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        else
            v = rnd<VP>(v);
        _mm256_storeu_ps(y + o, v);
    }
    for (; o < n; ++o) {
        const float v = x[o];
        float r;
        if (act == 1) {
            r = v > 0.0f ? v : (v != v ? v : 0.0f);
        } else {
            const float m = v < lo ? lo : v;
            r = hi < m ? hi : m;
        }
        y[o] = VP == 1 && r != r ? r : rnd1<VP>(r);
    }
}

void activation_row(const float* x, float* y, int64_t n, int vp, int act, float lo, float hi) {
    if (vp == 1) act_t<1>(x, y, n, act, lo, hi);
    else if (vp == 2) act_t<2>(x, y, n, act, lo, hi);
    else act_t<0>(x, y, n, act, lo, hi);
}

// ops/vmath.h's loops, vectorised by the compiler for AVX2 (the same operations, so the same bits)
void fn_row(int fn, int vp, const float* x, float* y, int64_t n) { vm::fn_row(fn, vp, x, y, n); }
void softmax_row(int vp, const float* s, float* d, int64_t L) { vm::softmax_row(vp, s, d, L); }

}  // namespace avx2
}  // namespace bfp

// The vector unit's float32 exp, erf and tanh (docs/numerics.md#vector-unit) and the row loops
// that use them (unary functions, Gelu, softmax). The project's own algorithms: range reduction
// and polynomials in IEEE float32 multiply / add / subtract / divide (never fused: every file
// is built with -ffp-contract=off) and exact bit operations, branch-free so the loops vectorise.
// The same source is compiled by the portable build (csrc/ops/elementwise.cpp) and by the SIMD
// kernels' vector files (kernels/vec_avx2.cpp, kernels/vec_avx512.cpp): every build runs the same
// operations in the same order, so all give the same bits, and python/bfpaccel/vmath.py (numpy,
// the same operations) gives them too. Everything here has internal linkage and calls no C++
// library function, so nothing compiled with SIMD flags can be linked into the portable code.
#pragma once

#include <cstdint>

#include "ops/vec.h"

#define BFP_AI __attribute__((always_inline)) static inline

namespace bfp {
namespace vm {

// exp: x = k ln2 + r (k = x / ln2 rounded to nearest even), exp(r) = 1 + (r + r^2 P(r))
constexpr float kExpC0 = 0x1p-1f, kExpC1 = 0x1.555554p-3f, kExpC2 = 0x1.55547p-5f, kExpC3 = 0x1.1111f2p-7f,
                kExpC4 = 0x1.6da59ep-10f, kExpC5 = 0x1.9fc6bcp-13f;
constexpr float kLog2e = 0x1.715476p+0f;   // float32 nearest 1 / ln 2
constexpr float kLn2Hi = 0x1.63p-1f;       // 9 significant bits: k * kLn2Hi is exact
constexpr float kLn2Lo = -0x1.bd0106p-13f; // float32 nearest ln 2 - kLn2Hi
constexpr float kRounder = 0x1.8p+23f;     // (t + 1.5 2^23) - 1.5 2^23: t rounded to an integer
// erf, |x| < 0.875: x + x P(x^2)
constexpr float kErfS0 = 0x1.06eba8p-3f, kErfS1 = -0x1.812744p-2f, kErfS2 = 0x1.ce2e82p-4f,
                kErfS3 = -0x1.b81982p-6f, kErfS4 = 0x1.553946p-8f, kErfS5 = -0x1.ae7238p-11f,
                kErfS6 = 0x1.6bb13ep-14f;
// erf, |x| >= 0.875 (clamped to 4): 1 - exp(-x^2) Q(1/x)
constexpr float kErfc0 = 0x1.21fe7cp-14f, kErfc1 = 0x1.202bbep-1f, kErfc2 = 0x1.6705dcp-7f,
                kErfc3 = -0x1.4e0442p-2f, kErfc4 = 0x1.0d4b2cp-4f, kErfc5 = 0x1.34c48cp-1f,
                kErfc6 = -0x1.159198p+0f, kErfc7 = 0x1.f9ebbap-1f, kErfc8 = -0x1.1176ecp-1f,
                kErfc9 = 0x1.4e286ap-3f, kErfc10 = -0x1.65863cp-6f;
constexpr float kSixth = 0x1.555556p-3f;  // float32 nearest 1/6
// tanh, |x| < 0.625: |x| + (|x| x^2) P(x^2) with x's sign; else 1 - 2 / (exp(2|x|) + 1)
constexpr float kTanh0 = -0x1.555556p-2f, kTanh1 = 0x1.111106p-3f, kTanh2 = -0x1.ba17dp-5f,
                kTanh3 = 0x1.65fe3p-6f, kTanh4 = -0x1.1ec72ep-7f, kTanh5 = 0x1.a742a6p-9f,
                kTanh6 = -0x1.a54022p-11f;

// a NaN made quiet, sign and payload kept (a bit operation: compilers may change the sign of a
// NaN that arithmetic returns, never this)
BFP_AI float quiet(float x) { return u2f(f2u(x) | 0x00400000u); }

BFP_AI float pow2i(int32_t k) { return u2f(uint32_t(k + 127) << 23); }  // 2^k, k in [-126, 127]

// exp of a finite xc in [-104, 89]
BFP_AI float exp_core(float xc) {
    const float kf = (xc * kLog2e + kRounder) - kRounder;
    const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
    float p = kExpC5;
    p = p * r + kExpC4;
    p = p * r + kExpC3;
    p = p * r + kExpC2;
    p = p * r + kExpC1;
    p = p * r + kExpC0;
    const float y = ((r * r) * p + r) + 1.0f;
    const int32_t k = int32_t(kf), k1 = k >> 1;
    return (y * pow2i(k1)) * pow2i(k - k1);  // the first product exact, the second rounds once
}

BFP_AI float exp(float x) {
    float xc = x < -104.0f ? -104.0f : x;
    xc = xc > 89.0f ? 89.0f : xc;
    xc = x != x ? 0.0f : xc;
    const float y = exp_core(xc);
    return x != x ? quiet(x) : y;
}

BFP_AI float with_sign(float y, float x) { return u2f(f2u(y) | (f2u(x) & 0x80000000u)); }

BFP_AI float erf(float x) {
    const float a = u2f(f2u(x) & 0x7fffffffu);
    const float s = x * x;
    float p = kErfS6;
    p = p * s + kErfS5;
    p = p * s + kErfS4;
    p = p * s + kErfS3;
    p = p * s + kErfS2;
    p = p * s + kErfS1;
    p = p * s + kErfS0;
    const float ys = x + x * p;
    const float ac = a < 4.0f ? a : 4.0f;
    const float ah = u2f(f2u(ac) & 0xfffff000u);  // 12 significant bits: ah * ah is exact
    const float al = ac - ah;
    const float q = -(al * (ah + ac));  // -(ac^2 - ah^2), |q| < 2^-7
    const float e2 = ((kSixth * q + 0.5f) * q + 1.0f) * q + 1.0f;  // exp(q)
    const float e1 = exp_core(-(ah * ah));
    const float t = 1.0f / ac;
    float c = kErfc10;
    c = c * t + kErfc9;
    c = c * t + kErfc8;
    c = c * t + kErfc7;
    c = c * t + kErfc6;
    c = c * t + kErfc5;
    c = c * t + kErfc4;
    c = c * t + kErfc3;
    c = c * t + kErfc2;
    c = c * t + kErfc1;
    c = c * t + kErfc0;
    const float yl = with_sign(1.0f - (e1 * e2) * c, x);
    const float y = a < 0.875f ? ys : yl;
    return x != x ? quiet(x) : y;
}

BFP_AI float tanh(float x) {
    const float a = u2f(f2u(x) & 0x7fffffffu);
    const float s = x * x;
    float p = kTanh6;
    p = p * s + kTanh5;
    p = p * s + kTanh4;
    p = p * s + kTanh3;
    p = p * s + kTanh2;
    p = p * s + kTanh1;
    p = p * s + kTanh0;
    const float ys = with_sign(a + (a * s) * p, x);
    const float ac = a < 10.0f ? a : 10.0f;
    const float e = exp_core(ac + ac);
    const float yl = with_sign(1.0f - 2.0f / (e + 1.0f), x);
    const float y = a < 0.625f ? ys : yl;
    return x != x ? quiet(x) : y;
}

// 1 / (1 + exp(-x)); a NaN x gives quiet(x)
BFP_AI float sigmoid(float x) {
    const float y = 1.0f / (1.0f + exp(-x));
    return x != x ? quiet(x) : y;
}

// x / (1 + exp(-x)); a NaN x gives quiet(x)
BFP_AI float swish(float x) {
    const float y = x / (1.0f + exp(-x));
    return x != x ? quiet(x) : y;
}

// ONNX Gelu (opset 20) in fp32 in the order of the operator's function body (approximate="none"):
// 0.5 x * (1 + erf(x / sqrt(2)))
BFP_AI float gelu(float x) {
    const float sqrt2 = 0x1.6a09e6p+0f;  // float32 nearest sqrt(2) (correctly rounded sqrt of 2)
    return (0.5f * x) * (1.0f + erf(x / sqrt2));
}

// The functions of the row loops below
enum VecFn : int { kFnExp = 0, kFnErf, kFnTanh, kFnSigmoid, kFnSwish, kFnGelu, kFnCount };

template <int VP, int F>
static void fn_row_t(const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        float r;
        if constexpr (F == kFnExp) r = exp(v);
        else if constexpr (F == kFnErf) r = erf(v);
        else if constexpr (F == kFnTanh) r = tanh(v);
        else if constexpr (F == kFnSigmoid) r = sigmoid(v);
        else if constexpr (F == kFnSwish) r = swish(v);
        else r = gelu(v);
        y[i] = R<VP>(r);
    }
}

template <int VP>
static void fn_row_vp(int fn, const float* x, float* y, int64_t n) {
    switch (fn) {
        case kFnExp: fn_row_t<VP, kFnExp>(x, y, n); break;
        case kFnErf: fn_row_t<VP, kFnErf>(x, y, n); break;
        case kFnTanh: fn_row_t<VP, kFnTanh>(x, y, n); break;
        case kFnSigmoid: fn_row_t<VP, kFnSigmoid>(x, y, n); break;
        case kFnSwish: fn_row_t<VP, kFnSwish>(x, y, n); break;
        default: fn_row_t<VP, kFnGelu>(x, y, n); break;
    }
}

// y[i] = R(f(x[i])), i < n: f one of VecFn, vp the vector precision
static inline void fn_row(int fn, int vp, const float* x, float* y, int64_t n) {
    if (vp == kVecFp16) fn_row_vp<kVecFp16>(fn, x, y, n);
    else if (vp == kVecBf16) fn_row_vp<kVecBf16>(fn, x, y, n);
    else fn_row_vp<kVecFp32>(fn, x, y, n);
}

// The sum of 16 lane partials in a fixed tree: halves added lane by lane (8, 4, 2, 1 lanes)
BFP_AI float lane_sum16(float* p) {
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; ++j) p[j] = p[j] + p[j + w];
    return p[0];
}

// Softmax of one contiguous row s[0, L) into d: m = max (NaN ignored by the comparisons, as
// std::max(m, s)), e_l = exp(s_l - m) kept in d; sum: lane j (0..15) adds e_j, e_{j+16}, ...
// in order from 0, then lane_sum16; d_l = R(e_l / sum)
template <int VP>
static void softmax_row_t(const float* s, float* d, int64_t L) {
    // the maximum in 16 running lanes, then across them: the maximum of one running comparison
    // up to the sign of a zero maximum, on which no result depends (s - (+0) and s - (-0) differ
    // only for s = -0, and exp(+0) = exp(-0) = 1)
    float lane[16];
    for (int j = 0; j < 16; ++j) lane[j] = -__builtin_inff();
    int64_t l = 0;
    for (; l + 16 <= L; l += 16)
        for (int j = 0; j < 16; ++j) lane[j] = lane[j] < s[l + j] ? s[l + j] : lane[j];
    float m = -__builtin_inff();
    for (int j = 0; j < 16; ++j) m = m < lane[j] ? lane[j] : m;
    for (; l < L; ++l) m = m < s[l] ? s[l] : m;
    for (int64_t l = 0; l < L; ++l) d[l] = exp(s[l] - m);
    float part[16];
    for (int j = 0; j < 16; ++j) part[j] = 0.0f;
    l = 0;
    for (; l + 16 <= L; l += 16)
        for (int j = 0; j < 16; ++j) part[j] = part[j] + d[l + j];
    for (int j = 0; l + j < L; ++j) part[j] = part[j] + d[l + j];
    const float sum = lane_sum16(part);
    for (int64_t l2 = 0; l2 < L; ++l2) d[l2] = R<VP>(d[l2] / sum);
}

static inline void softmax_row(int vp, const float* s, float* d, int64_t L) {
    if (vp == kVecFp16) softmax_row_t<kVecFp16>(s, d, L);
    else if (vp == kVecBf16) softmax_row_t<kVecBf16>(s, d, L);
    else softmax_row_t<kVecFp32>(s, d, L);
}

}  // namespace vm
}  // namespace bfp

// The gate arithmetic of the recurrent cells (csrc/ops/recurrent.cpp), one batch row at a time:
// shared by the portable build of the runtime and the AVX2 build (csrc/kernels/rnn_avx2.cpp),
// the same IEEE arithmetic either way (docs/numerics.md#recurrent-cells). Every function here
// has internal linkage and calls no C++ library template, so nothing compiled with AVX2 flags
// can be linked into the portable code.
#pragma once

#include <math.h>

#include <cstdint>

#include "op_kinds.h"
#include "ops/vec.h"
#include "ops/vmath.h"

namespace bfp {

static inline float mn(float a, float b) { return b < a ? b : a; }
static inline float mx(float a, float b) { return a < b ? b : a; }

// ---------------------------------------------------------------- activations
// The activation functions in fp32 (ONNX's definitions; exp and tanh are ops/vmath.h's, as in
// the elementwise ops, log the C library's); the caller rounds the result.
static inline float act_f32(int k, float x, float a, float b) {
    switch (k) {
        case kRnnSigmoid: return vm::sigmoid(x);
        case kRnnTanh: return vm::tanh(x);
        case kRnnRelu: return x > 0.0f ? x : (x != x ? x : 0.0f);
        case kRnnHardSigmoid: return x != x ? x : mx(0.0f, mn(1.0f, a * x + b));
        case kRnnLeakyRelu: return x >= 0.0f ? x : x * a;
        case kRnnAffine: return a * x + b;
        case kRnnThresholdedRelu: return x > a ? x : 0.0f;
        case kRnnScaledTanh: return a * vm::tanh(b * x);
        case kRnnElu: return x >= 0.0f ? x : a * (vm::exp(x) - 1.0f);
        case kRnnSoftsign: return x / (1.0f + fabsf(x));
        case kRnnSoftplus: return logf(1.0f + vm::exp(x));
        default: return x;
    }
}

// fp16 <-> fp32 for the lookup tables below (exact on values that fp16 holds); branch-free so
// the loops vectorise
static inline uint32_t f16_bits(float x) {
    const uint32_t b = f2u(x), s = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    const uint32_t nrm = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
    const uint32_t sub = uint32_t(int32_t(mn(u2f(a), 1.0f) * 16777216.0f));  // a multiple of 2^-24
    const uint32_t inf = 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
    uint32_t r = a >= 0x38800000u ? nrm : sub;
    r = a >= 0x7f800000u ? inf : r;
    return s | r;
}

// One activation of a cell: its kind, alpha, beta and (sigmoid, tanh at fp16 / bf16) its table.
struct Act {
    int k;
    float a, b;
    const float* tab;
};

// y[j] = R(f(x[j])), j < n
template <int VP>
__attribute__((always_inline)) static inline void activate(const Act& f, const float* x, float* y, int64_t n) {
    if (f.tab) {
        const float* tab = f.tab;
        if constexpr (VP == kVecFp16) {  // the indices first, then the reads: both loops vectorise
            uint32_t idx[256];
            for (int64_t j0 = 0; j0 < n; j0 += 256) {
                const int64_t m = n - j0 < 256 ? n - j0 : 256;
                for (int64_t j = 0; j < m; ++j) idx[j] = f16_bits(x[j0 + j]);
                for (int64_t j = 0; j < m; ++j) y[j0 + j] = tab[idx[j]];
            }
        } else {
            for (int64_t j = 0; j < n; ++j) y[j] = tab[f2u(x[j]) >> 16];
        }
        return;
    }
    for (int64_t j = 0; j < n; ++j) y[j] = R<VP>(act_f32(f.k, x[j], f.a, f.b));
}

// ---------------------------------------------------------------- one row of a step
// The gate arithmetic of one batch row at one step (docs/numerics.md#recurrent-cells), every
// result rounded to the vector precision. x: the row's input projection (gates); g: its
// recurrence product; h (and c): the state, updated in place.
struct RowCtx {
    const float* x;
    const float* g;
    const float* rb;  // recurrence bias or null
    const float* P;   // LSTM peepholes or null
    float* h;
    float* c;         // LSTM cell state
    float* a;         // scratch: gates
    float* t1;        // scratch: H
    float* zr;        // GRU split: z, r of the row (out of part 1, into part 2)
    float* rh;        // GRU split: r * h (out of part 1)
    int64_t H;
    bool input_forget, has_clip;
    float clip;
    Act f, g_, h_;
};

template <int VP>
__attribute__((always_inline)) static inline void clip_t(const RowCtx& r, float* v, int64_t n) {
    if (!r.has_clip) return;
    const float lo = -r.clip, hi = r.clip;
    for (int64_t j = 0; j < n; ++j) v[j] = v[j] != v[j] ? v[j] : R<VP>(mn(mx(v[j], lo), hi));
}

// a[j] = R(x[j] + R(g[j] + rb[j])) (no bias: R(x[j] + g[j])), j < n
template <int VP>
__attribute__((always_inline)) static inline void gates_t(const RowCtx& r, int64_t n) {
    const float *x = r.x, *g = r.g, *rb = r.rb;
    float* a = r.a;
    if (rb) for (int64_t j = 0; j < n; ++j) a[j] = R<VP>(x[j] + R<VP>(g[j] + rb[j]));
    else for (int64_t j = 0; j < n; ++j) a[j] = R<VP>(x[j] + g[j]);
}

template <int VP>
__attribute__((always_inline)) static inline void lstm_row_t(const RowCtx& r) {
    const int64_t H = r.H;
    const float* P = r.P;
    float* cb = r.c;
    gates_t<VP>(r, 4 * H);
    // each gate's input (with its peephole) is clipped just before its activation
    float *ai = r.a, *ao = ai + H, *af = ai + 2 * H, *ac = ai + 3 * H;
    if (P) {
        for (int64_t j = 0; j < H; ++j) ai[j] = R<VP>(ai[j] + R<VP>(P[j] * cb[j]));
        if (!r.input_forget)
            for (int64_t j = 0; j < H; ++j) af[j] = R<VP>(af[j] + R<VP>(P[2 * H + j] * cb[j]));
    }
    clip_t<VP>(r, ai, H);
    activate<VP>(r.f, ai, ai, H);  // i
    if (r.input_forget) {
        for (int64_t j = 0; j < H; ++j) af[j] = R<VP>(1.0f - ai[j]);
    } else {
        clip_t<VP>(r, af, H);
        activate<VP>(r.f, af, af, H);
    }
    clip_t<VP>(r, ac, H);
    activate<VP>(r.g_, ac, ac, H);  // g
    for (int64_t j = 0; j < H; ++j) cb[j] = R<VP>(R<VP>(af[j] * cb[j]) + R<VP>(ai[j] * ac[j]));
    if (P) for (int64_t j = 0; j < H; ++j) ao[j] = R<VP>(ao[j] + R<VP>(P[H + j] * cb[j]));
    clip_t<VP>(r, ao, H);
    activate<VP>(r.f, ao, ao, H);  // o
    activate<VP>(r.h_, cb, r.t1, H);
    for (int64_t j = 0; j < H; ++j) r.h[j] = R<VP>(ao[j] * r.t1[j]);
}

// H = R(R(R(1 - z) n) + R(z h))
template <int VP>
__attribute__((always_inline)) static inline void gru_out_t(const float* z, const float* n, float* h, int64_t H) {
    for (int64_t j = 0; j < H; ++j) h[j] = R<VP>(R<VP>(R<VP>(1.0f - z[j]) * n[j]) + R<VP>(z[j] * h[j]));
}

// GRU with linear_before_reset: the whole step
template <int VP>
__attribute__((always_inline)) static inline void gru_row_t(const RowCtx& r) {
    const int64_t H = r.H;
    gates_t<VP>(r, 2 * H);
    clip_t<VP>(r, r.a, 2 * H);
    activate<VP>(r.f, r.a, r.a, 2 * H);  // z, r
    const float *z = r.a, *rr = z + H, *x = r.x + 2 * H, *g = r.g + 2 * H;
    float* n = r.a + 2 * H;
    if (r.rb) {
        const float* rb = r.rb + 2 * H;
        for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[j] + R<VP>(rr[j] * R<VP>(g[j] + rb[j])));
    } else {
        for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[j] + R<VP>(rr[j] * g[j]));
    }
    clip_t<VP>(r, n, H);
    activate<VP>(r.g_, n, n, H);
    gru_out_t<VP>(z, n, r.h, H);
}

// GRU without linear_before_reset, before the second product: z, r and r * h
template <int VP>
__attribute__((always_inline)) static inline void gru_split1_t(const RowCtx& r) {
    const int64_t H = r.H;
    gates_t<VP>(r, 2 * H);
    clip_t<VP>(r, r.a, 2 * H);
    activate<VP>(r.f, r.a, r.zr, 2 * H);  // z, r
    for (int64_t j = 0; j < H; ++j) r.rh[j] = R<VP>(r.zr[H + j] * r.h[j]);
}

// ... after it (g: the row of (r * h) R_h^T; x, rb: the h gate's)
template <int VP>
__attribute__((always_inline)) static inline void gru_split2_t(const RowCtx& r) {
    const int64_t H = r.H;
    float* n = r.t1;
    gates_t<VP>(RowCtx{r.x, r.g, r.rb, nullptr, r.h, nullptr, n, nullptr, nullptr, nullptr, H, false, false, 0.0f,
                       r.f, r.g_, r.h_},
                H);
    clip_t<VP>(r, n, H);
    activate<VP>(r.g_, n, n, H);
    gru_out_t<VP>(r.zr, n, r.h, H);
}

enum RowPart : int { kLstmRow, kGruRow, kGruSplit1, kGruSplit2 };

template <int VP>
__attribute__((always_inline)) static inline void row_t(int part, const RowCtx& r) {
    switch (part) {
        case kLstmRow: lstm_row_t<VP>(r); break;
        case kGruRow: gru_row_t<VP>(r); break;
        case kGruSplit1: gru_split1_t<VP>(r); break;
        default: gru_split2_t<VP>(r); break;
    }
}

namespace avx2 {
// row_t on AVX2 + F16C CPUs (every SIMD kernel's): kernels/rnn_avx2.cpp
void rnn_row(int vp, int part, const RowCtx& r);
}  // namespace avx2

}  // namespace bfp

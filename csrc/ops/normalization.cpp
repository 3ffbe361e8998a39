// Normalization: a per-channel x * s + t (a batch-norm the compiler did not fold) and layer
// normalization, each result rounded to the vector precision.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

static void validate_affine(const Program& p, const Op& op, OpCheck& c) {
    const AffineParams& q = op.get<AffineParams>();
    c.ins(1);
    const int64_t n = c.mul(c.mul(q.outer, q.channels), q.inner);
    if (int64_t(q.scale.size()) < q.channels || int64_t(q.shift.size()) < q.channels) c.fail("missing scale/shift");
    c.fits(op.in[0], n, "input");
    c.fits(op.out[0], n, "output");
    (void)p;
}

static void exec_affine(Program& p, const Op& op) {
    const AffineParams& q = op.get<AffineParams>();
    const int64_t outer = q.outer, C = q.channels, inner = q.inner;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const float* s = q.scale.data();
    const float* t = q.shift.data();
    with_vp(p.vec_prec(), [&](auto V) {
        constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * C * inner))
        for (int64_t oc = 0; oc < outer * C; ++oc) {
            const int64_t c = oc % C;
            const float sc = s[c], sh = t[c];
            const float* xi = x + oc * inner;
            float* yi = y + oc * inner;
            if (inner == 1) {
                yi[0] = R<vp>(xi[0] * sc + sh);
            } else {
                for (int64_t i = 0; i < inner; ++i) yi[i] = R<vp>(xi[i] * sc + sh);
            }
        }
    });
}

static void validate_layer_norm(const Program& p, const Op& op, OpCheck& c) {
    const LayerNormParams& q = op.get<LayerNormParams>();
    c.ins(1);
    const int64_t n = c.mul(q.outer, q.length);
    c.entries(q.scale.size(), size_t(q.length), "scale");
    if (!q.bias.empty()) c.entries(q.bias.size(), size_t(q.length), "bias");
    c.fits(op.in[0], n, "input");
    c.fits(op.out[0], n, "output");
    (void)p;
}

// ONNX LayerNormalization (opset 17, stash_type float32) in the order of the operator's function
// body, in fp32: mean and mean of squares as sequential sums / length, var = E[x^2] - E[x]^2,
// y = (x - mean) / sqrt(var + epsilon) * scale + bias; only y is rounded to the vector precision.
// One row. The two sums are separate chains of adds, each in order, advanced in one loop (the
// same operations, so the same bits, at half the latency); compiled for AVX-512, AVX2 and
// baseline x86-64 and chosen by the CPU (the same IEEE operations everywhere).
template <int VP>
__attribute__((target_clones("avx512f", "avx2", "default"))) static void layer_norm_row(
    const float* xr, float* yr, int64_t L, const float* s, const float* b, float eps) {
    const float len = float(L);
    float sum = 0.0f, sum_sq = 0.0f;
    for (int64_t l = 0; l < L; ++l) {
        sum = sum + xr[l];
        sum_sq = sum_sq + xr[l] * xr[l];
    }
    const float mean = sum / len;
    const float var = sum_sq / len - mean * mean;
    const float sd = std::sqrt(var + eps);
    if (b) {
        for (int64_t l = 0; l < L; ++l) yr[l] = R<VP>(((xr[l] - mean) / sd) * s[l] + b[l]);
    } else {
        for (int64_t l = 0; l < L; ++l) yr[l] = R<VP>(((xr[l] - mean) / sd) * s[l]);
    }
}

static void exec_layer_norm(Program& p, const Op& op) {
    const LayerNormParams& q = op.get<LayerNormParams>();
    const int64_t rows = q.outer, L = q.length;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const float* s = q.scale.data();
    const float* b = q.bias.empty() ? nullptr : q.bias.data();
    const float eps = q.epsilon;
    with_vp(p.vec_prec(), [&](auto V) {
        constexpr int vp = decltype(V)::value;
        parallel_ranges(par_pool(rows * L) ? num_threads() : 1, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(L, 1)),
                        [&](int64_t r0, int64_t r1) {
                            for (int64_t r = r0; r < r1; ++r) layer_norm_row<vp>(x + r * L, y + r * L, L, s, b, eps);
                        });
    });
}

BFP_REGISTER_OP(kOpLayerNorm, validate_layer_norm, exec_layer_norm);
BFP_REGISTER_OP(kOpAffine, validate_affine, exec_affine);

}  // namespace bfp

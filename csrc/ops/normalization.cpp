// Normalization: a per-channel x * s + t (a batch-norm the compiler did not fold), rounded to the
// vector precision.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
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

BFP_REGISTER_OP(kOpAffine, validate_affine, exec_affine);

}  // namespace bfp

// Reductions (outer, R, inner) -> (outer, inner): sequential float32 sums over R, the result
// rounded to the vector precision.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

static void validate_reduce(const Program& p, const Op& op, OpCheck& c) {
    const ReduceParams& q = op.get<ReduceParams>();
    if (q.op < 0 || q.op >= kReduceCount) c.fail("unknown reduction " + std::to_string(q.op));
    c.ins(1);
    c.fits(op.in[0], c.mul(c.mul(q.outer, q.length), q.inner), "input");
    c.fits(op.out[0], c.mul(q.outer, q.inner), "output");
    (void)p;
}

static void exec_reduce(Program& p, const Op& op) {
    const ReduceParams& q = op.get<ReduceParams>();
    const int64_t outer = q.outer, Rn = q.length, inner = q.inner;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const int k = q.op;
    with_vp(p.vec_prec(), [&](auto V) {
        constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * Rn * inner))
        for (int64_t o = 0; o < outer; ++o) {
            float* d = y + o * inner;
            const float* s = x + o * Rn * inner;
            for (int64_t i = 0; i < inner; ++i)
                d[i] = k == kRedMax ? -std::numeric_limits<float>::infinity()
                       : k == kRedMin ? std::numeric_limits<float>::infinity() : 0.0f;
            for (int64_t r = 0; r < Rn; ++r) {
                const float* sr = s + r * inner;
                switch (k) {
                    case kRedMax: for (int64_t i = 0; i < inner; ++i) d[i] = sr[i] > d[i] || sr[i] != sr[i] ? sr[i] : d[i]; break;
                    case kRedMin: for (int64_t i = 0; i < inner; ++i) d[i] = sr[i] < d[i] || sr[i] != sr[i] ? sr[i] : d[i]; break;
                    case kRedSumSquare:
                    case kRedL2: for (int64_t i = 0; i < inner; ++i) d[i] = d[i] + sr[i] * sr[i]; break;
                    default: for (int64_t i = 0; i < inner; ++i) d[i] = d[i] + sr[i];
                }
            }
            for (int64_t i = 0; i < inner; ++i) {
                float v = d[i];
                if (k == kRedMean) v = v / float(Rn);
                else if (k == kRedL2) v = std::sqrt(v);
                d[i] = R<vp>(v);
            }
        }
    });
}

BFP_REGISTER_OP(kOpReduce, validate_reduce, exec_reduce);

}  // namespace bfp

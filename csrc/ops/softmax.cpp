// Softmax and LogSoftmax of (outer, L, inner) along L: max-subtracted, float32 sums in 16 lanes
// (vm::softmax_row's order), the result rounded to the vector precision; exp is vm::exp
// (ops/vmath.h), log the C library's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
#include "ops/vmath.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

static void validate_softmax(const Program& p, const Op& op, OpCheck& c) {
    const SoftmaxParams& q = op.get<SoftmaxParams>();
    c.ins(1);
    const int64_t n = c.mul(c.mul(q.outer, q.length), q.inner);
    c.fits(op.in[0], n, "input");
    c.fits(op.out[0], n, "output");
    (void)p;
}

static void exec_softmax(Program& p, const Op& op) {
    const SoftmaxParams& q = op.get<SoftmaxParams>();
    const int64_t outer = q.outer, L = q.length, inner = q.inner;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const bool logsm = q.log;
    const int vpr = p.vec_prec();
    if (!logsm && inner == 1) {  // rows contiguous: the kernel's vector loop, one row at a time
        const KernelDesc& kd = current_kernel();
        const auto row = kd.softmax_row ? kd.softmax_row : vm::softmax_row;
        // rows handed out by parallel_ranges (pool.h): no join on a thread that has not started
        parallel_ranges(par_pool(outer * L) ? num_threads() : 1, outer, std::max<int64_t>(1, 8192 / std::max<int64_t>(L, 1)),
                        [&](int64_t lo, int64_t hi) {
                            for (int64_t o = lo; o < hi; ++o) row(vpr, x + o * L, y + o * L, L);
                        });
        return;
    }
    with_vp(vpr, [&](auto V) {
        constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * L * inner * 2))
        for (int64_t oi = 0; oi < outer * inner; ++oi) {
            const int64_t o = oi / inner, i = oi % inner;
            const float* s = x + o * L * inner + i;
            float* d = y + o * L * inner + i;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t l = 0; l < L; ++l) m = std::max(m, s[l * inner]);
            float part[16] = {};  // the lanes of vm::softmax_row: element l in lane l % 16
            for (int64_t l = 0; l < L; ++l) part[l % 16] = part[l % 16] + vm::exp(s[l * inner] - m);
            const float sum = vm::lane_sum16(part);
            if (logsm) {
                const float ls = std::log(sum);
                for (int64_t l = 0; l < L; ++l) d[l * inner] = R<vp>((s[l * inner] - m) - ls);
            } else {
                for (int64_t l = 0; l < L; ++l) d[l * inner] = R<vp>(vm::exp(s[l * inner] - m) / sum);
            }
        }
    });
}

BFP_REGISTER_OP(kOpSoftmax, validate_softmax, exec_softmax);

}  // namespace bfp

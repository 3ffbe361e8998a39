// Data movement: concatenation, strided copies (layout transposes, slices), constant padding and
// plain copies. No rounding: values move unchanged.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

// ip: outer inner L_0 .. L_{n-1}
static void validate_concat(const Program& p, const Op& op, OpCheck& c) {
    const auto& q = op.ip;
    c.need_ip(2 + op.in.size());
    c.ins(1);
    int64_t total = 0;
    for (size_t i = 0; i < op.in.size(); ++i) {
        c.fits(op.in[i], c.mul(c.mul(q[0], q[2 + i]), q[1]), "input");
        total += q[2 + i];
    }
    c.fits(op.out[0], c.mul(c.mul(q[0], total), q[1]), "output");
    (void)p;
}

static void exec_concat(Program& p, const Op& op) {
    const auto& q = op.ip;
    const int64_t outer = q[0], inner = q[1];
    int64_t Lt = 0;
    for (size_t i = 0; i < op.in.size(); ++i) Lt += q[2 + i];
    float* y = p.buf(op.out[0]);
    int64_t l0 = 0;
    for (size_t i = 0; i < op.in.size(); ++i) {
        const int64_t L = q[2 + i];
        const float* x = p.buf(op.in[i]);
        const int64_t chunk = L * inner;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * chunk))
        for (int64_t o = 0; o < outer; ++o)
            std::memcpy(y + (o * Lt + l0) * inner, x + o * chunk, sizeof(float) * size_t(chunk));
        l0 += L;
    }
}

// ip: rank offset shape[rank] strides[rank]
static void validate_strided(const Program& p, const Op& op, OpCheck& c) {
    const auto& q = op.ip;
    c.need_ip(2);
    c.ins(1);
    const int rank = c.rank(q[0]);
    c.need_ip(2 + 2 * size_t(rank));
    const int64_t* shape = q.data() + 2;
    const int64_t* st = shape + rank;
    const int64_t n = c.prod(shape, rank);
    c.fits(op.out[0], n, "output");
    if (n == 0) return;
    int64_t lo = q[1], hi = q[1];
    for (int d = 0; d < rank; ++d) {
        const int64_t span = c.mul(shape[d] - 1, st[d] < 0 ? -st[d] : st[d]);
        if (st[d] < 0) lo -= span;
        else hi += span;
    }
    if (lo < 0) c.fail("reads before its input");
    c.fits(op.in[0], hi + 1, "input");
    (void)p;
}

static void exec_strided(Program& p, const Op& op) {
    const auto& q = op.ip;
    // rank offset shape[rank] strides[rank]
    const int rank = int(q[0]);
    const int64_t off = q[1];
    const int64_t* shape = q.data() + 2;
    const int64_t* st = shape + rank;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const int64_t inner = rank ? shape[rank - 1] : 1, is = rank ? st[rank - 1] : 0;
    int64_t outer = 1;
    for (int d = 0; d + 1 < rank; ++d) outer *= shape[d];
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * inner))
    for (int64_t r = 0; r < outer; ++r) {
        int64_t o = off, rem = r;
        for (int d = rank - 2; d >= 0; --d) {
            o += (rem % shape[d]) * st[d];
            rem /= shape[d];
        }
        float* d = y + r * inner;
        if (is == 1) std::memcpy(d, x + o, sizeof(float) * size_t(inner));
        else for (int64_t i = 0; i < inner; ++i) d[i] = x[o + i * is];
    }
}

// ip: rank in_shape[rank] out_shape[rank] begin[rank]; fp: the pad value
static void validate_pad(const Program& p, const Op& op, OpCheck& c) {
    const auto& q = op.ip;
    c.need_ip(1);
    c.ins(1);
    const int rank = c.rank(q[0]);
    c.need_ip(1 + 3 * size_t(rank));
    c.fits(op.in[0], c.prod(q.data() + 1, rank), "input");
    c.fits(op.out[0], c.prod(q.data() + 1 + rank, rank), "output");
    (void)p;
}

static void exec_pad(Program& p, const Op& op) {
    const auto& q = op.ip;
    // rank in_shape[rank] out_shape[rank] begin[rank]
    const int rank = int(q[0]);
    const int64_t* ish = q.data() + 1;
    const int64_t* osh = ish + rank;
    const int64_t* beg = osh + rank;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    int64_t total = 1, outer = 1;
    for (int d = 0; d < rank; ++d) total *= osh[d];
    for (int d = 0; d + 1 < rank; ++d) outer *= ish[d];
    const float v = op.fp.empty() ? 0.0f : op.fp[0];
    std::fill(y, y + total, v);
    const int64_t inner = rank ? ish[rank - 1] : 1;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * inner))
    for (int64_t r = 0; r < outer; ++r) {
        int64_t rem = r, o = 0, mul = 1;
        bool ok = true;
        // output row offset: sum (i_d + beg_d) * ostride_d
        int64_t ostr = rank ? osh[rank - 1] : 1;
        o = rank ? beg[rank - 1] : 0;
        for (int d = rank - 2; d >= 0; --d) {
            const int64_t i = rem % ish[d] + beg[d];
            rem /= ish[d];
            if (i < 0 || i >= osh[d]) ok = false;
            o += i * ostr;
            ostr *= osh[d];
        }
        (void)mul;
        if (!ok) continue;
        const float* s = x + r * inner;
        for (int64_t i = 0; i < inner; ++i) {
            const int64_t c = i + (rank ? beg[rank - 1] : 0);
            if (c >= 0 && c < (rank ? osh[rank - 1] : 1)) y[o - (rank ? beg[rank - 1] : 0) + c] = s[i];
        }
    }
}

// ip: n
static void validate_copy(const Program& p, const Op& op, OpCheck& c) {
    c.need_ip(1);
    c.ins(1);
    c.fits(op.in[0], op.ip[0], "input");
    c.fits(op.out[0], op.ip[0], "output");
    (void)p;
}

static void exec_copy(Program& p, const Op& op) {
    const auto& q = op.ip;
    const int64_t n = q[0];
    std::memcpy(p.buf(op.out[0]), p.buf(op.in[0]), sizeof(float) * size_t(n));
}

BFP_REGISTER_OP(kOpConcat, validate_concat, exec_concat);
BFP_REGISTER_OP(kOpStrided, validate_strided, exec_strided);
BFP_REGISTER_OP(kOpPad, validate_pad, exec_pad);
BFP_REGISTER_OP(kOpCopy, validate_copy, exec_copy);

}  // namespace bfp

// Ops on indices and masks, computed at run time: Gather (embedding lookups: every index checked
// before anything is read), Where (broadcasting select), comparisons and logic (0 / 1), and exact
// unary functions (Not, IsNaN, IsInf, casts to bool or to an integer type). None of them rounds:
// a select or a gather moves values unchanged, and the others produce 0, 1 or an integer.
// Integer tensors live in the float buffers as exact integers (the session admits only
// integers of magnitude <= 2^24 into a program).
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

// ---------------------------------------------------------------- Gather
static void validate_gather(const Program& p, const Op& op, OpCheck& c) {
    const GatherParams& q = op.get<GatherParams>();
    c.ins(2);
    c.range(q.length, 1, int64_t(1) << 40, "length");
    const int64_t table = c.mul(c.mul(q.outer, q.length), q.inner);
    c.fits(op.in[0], table, "data");
    c.fits(op.in[1], q.count, "indices");
    c.fits(op.out[0], c.mul(c.mul(q.outer, q.count), q.inner), "output");
    (void)p;
}

static std::string show_index(float v) {
    std::ostringstream s;
    s.precision(9);
    s << v;
    return s.str();
}

static void exec_gather(Program& p, const Op& op) {
    const GatherParams& q = op.get<GatherParams>();
    const float* x = p.buf(op.in[0]);
    const float* idx = p.buf(op.in[1]);
    float* y = p.buf(op.out[0]);
    const int64_t L = q.length, inner = q.inner, count = q.count;
    std::vector<int64_t> at(static_cast<size_t>(count), 0);
    for (int64_t i = 0; i < count; ++i) {  // every index checked before anything is read
        const float v = idx[i];
        const bool integral = std::isfinite(v) && v == std::trunc(v);
        const double d = integral ? double(v) : 0.0;
        const bool in_range = integral && d >= -double(L) && d < double(L);
        if (!in_range)
            throw std::invalid_argument("op " + op.name + ": index " + show_index(v) + " (position " +
                                        std::to_string(i) + " of " + q.indices + ") is out of range for " +
                                        std::to_string(L) + " entries: indices must be integers in [" +
                                        std::to_string(-L) + ", " + std::to_string(L - 1) + "]");
        const int64_t j = int64_t(d);
        at[size_t(i)] = j < 0 ? j + L : j;
    }
    const int64_t rows = q.outer * count;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(rows * inner))
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r / count, i = r % count;
        std::memcpy(y + r * inner, x + (o * L + at[size_t(i)]) * inner, sizeof(float) * size_t(inner));
    }
}

// ---------------------------------------------------------------- broadcasting loops
// operand strides of a broadcasting op over `shape`: non-negative, reaching inside each buffer
static int64_t check_broadcast(const Op& op, OpCheck& c, const std::vector<int64_t>& shape,
                               const std::vector<const std::vector<int64_t>*>& st) {
    const int rank = c.rank(shape.size());
    const int64_t n = c.prod(shape.data(), rank);
    c.fits(op.out[0], n, "output");
    for (size_t k = 0; k < st.size(); ++k) {
        c.entries(st[k]->size(), size_t(rank), "strides");
        int64_t hi = 0;
        for (int d = 0; d < rank; ++d) {
            const int64_t s = (*st[k])[size_t(d)];
            if (s < 0) c.fail("negative stride");
            if (shape[size_t(d)] > 0) hi += c.mul(shape[size_t(d)] - 1, s);
        }
        if (n > 0) c.fits(op.in[k], hi + 1, "operand");
    }
    return n;
}

// f(y, i, offsets...) for every output element i, offsets of each operand by its strides
template <int NOPS, class F>
static void broadcast_loop(const std::vector<int64_t>& shape, const std::vector<int64_t>* const* st, F&& f) {
    const int rank = int(shape.size());
    int64_t total = 1;
    for (int64_t s : shape) total *= s;
    const int64_t inner = rank ? shape[size_t(rank - 1)] : 1, outer = inner ? total / inner : 0;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(total))
    for (int64_t r = 0; r < outer; ++r) {
        int64_t off[NOPS] = {};
        int64_t rem = r;
        for (int d = rank - 2; d >= 0; --d) {
            const int64_t i = rem % shape[size_t(d)];
            rem /= shape[size_t(d)];
            for (int k = 0; k < NOPS; ++k) off[k] += i * (*st[k])[size_t(d)];
        }
        int64_t last[NOPS];
        for (int k = 0; k < NOPS; ++k) last[k] = rank ? (*st[k])[size_t(rank - 1)] : 0;
        for (int64_t i = 0; i < inner; ++i) {
            int64_t o[NOPS];
            for (int k = 0; k < NOPS; ++k) o[k] = off[k] + i * last[k];
            f(r * inner + i, o);
        }
    }
}

// ---------------------------------------------------------------- Where
static void validate_where(const Program& p, const Op& op, OpCheck& c) {
    const WhereParams& q = op.get<WhereParams>();
    c.ins(3);
    check_broadcast(op, c, q.shape, {&q.c_strides, &q.a_strides, &q.b_strides});
    (void)p;
}

static void exec_where(Program& p, const Op& op) {
    const WhereParams& q = op.get<WhereParams>();
    const float* cnd = p.buf(op.in[0]);
    const float* a = p.buf(op.in[1]);
    const float* b = p.buf(op.in[2]);
    float* y = p.buf(op.out[0]);
    const std::vector<int64_t>* st[3] = {&q.c_strides, &q.a_strides, &q.b_strides};
    broadcast_loop<3>(q.shape, st, [&](int64_t i, const int64_t* o) { y[i] = cnd[o[0]] != 0.0f ? a[o[1]] : b[o[2]]; });
}

// ---------------------------------------------------------------- comparisons and logic
template <int K>
static inline float cmp(float a, float b) {
    bool r;
    if constexpr (K == kCmpEqual) r = a == b;
    else if constexpr (K == kCmpLess) r = a < b;
    else if constexpr (K == kCmpLessEqual) r = a <= b;
    else if constexpr (K == kCmpGreater) r = a > b;
    else if constexpr (K == kCmpGreaterEqual) r = a >= b;
    else if constexpr (K == kCmpAnd) r = (a != 0.0f) && (b != 0.0f);
    else if constexpr (K == kCmpOr) r = (a != 0.0f) || (b != 0.0f);
    else r = (a != 0.0f) != (b != 0.0f);
    return r ? 1.0f : 0.0f;
}

static void validate_compare(const Program& p, const Op& op, OpCheck& c) {
    const CompareParams& q = op.get<CompareParams>();
    c.ins(2);
    if (q.op < 0 || q.op >= kCompareCount) c.fail("unknown comparison " + std::to_string(q.op));
    check_broadcast(op, c, q.shape, {&q.a_strides, &q.b_strides});
    (void)p;
}

template <int K>
static void compare_t(const CompareParams& q, const float* a, const float* b, float* y) {
    const std::vector<int64_t>* st[2] = {&q.a_strides, &q.b_strides};
    broadcast_loop<2>(q.shape, st, [&](int64_t i, const int64_t* o) { y[i] = cmp<K>(a[o[0]], b[o[1]]); });
}

static void exec_compare(Program& p, const Op& op) {
    const CompareParams& q = op.get<CompareParams>();
    const float* a = p.buf(op.in[0]);
    const float* b = p.buf(op.in[1]);
    float* y = p.buf(op.out[0]);
    switch (q.op) {
        case kCmpEqual: compare_t<kCmpEqual>(q, a, b, y); break;
        case kCmpLess: compare_t<kCmpLess>(q, a, b, y); break;
        case kCmpLessEqual: compare_t<kCmpLessEqual>(q, a, b, y); break;
        case kCmpGreater: compare_t<kCmpGreater>(q, a, b, y); break;
        case kCmpGreaterEqual: compare_t<kCmpGreaterEqual>(q, a, b, y); break;
        case kCmpAnd: compare_t<kCmpAnd>(q, a, b, y); break;
        case kCmpOr: compare_t<kCmpOr>(q, a, b, y); break;
        default: compare_t<kCmpXor>(q, a, b, y);
    }
}

// ---------------------------------------------------------------- exact unary functions
static inline float exact(int k, float x) {
    switch (k) {
        case kExNot: return x == 0.0f ? 1.0f : 0.0f;
        case kExIsNan: return x != x ? 1.0f : 0.0f;
        case kExIsInf: return std::isinf(x) ? 1.0f : 0.0f;
        case kExIsPosInf: return std::isinf(x) && x > 0.0f ? 1.0f : 0.0f;
        case kExIsNegInf: return std::isinf(x) && x < 0.0f ? 1.0f : 0.0f;
        case kExNonzero: return x != 0.0f ? 1.0f : 0.0f;  // NaN is nonzero (true)
        default: return std::trunc(x);                    // kExTrunc: float -> integer, toward zero
    }
}

static void validate_exact_unary(const Program& p, const Op& op, OpCheck& c) {
    const ExactUnaryParams& q = op.get<ExactUnaryParams>();
    if (q.op < 0 || q.op >= kExactCount) c.fail("unknown exact unary op " + std::to_string(q.op));
    c.ins(1);
    c.fits(op.in[0], q.count, "input");
    c.fits(op.out[0], q.count, "output");
    (void)p;
}

static void exec_exact_unary(Program& p, const Op& op) {
    const ExactUnaryParams q = op.get<ExactUnaryParams>();  // a local copy: no aliasing with the output
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const int k = q.op;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(q.count))
    for (int64_t i = 0; i < q.count; ++i) y[i] = exact(k, x[i]);
}

BFP_REGISTER_OP(kOpGather, validate_gather, exec_gather);
BFP_REGISTER_OP(kOpWhere, validate_where, exec_where);
BFP_REGISTER_OP(kOpCompare, validate_compare, exec_compare);
BFP_REGISTER_OP(kOpExactUnary, validate_exact_unary, exec_exact_unary);

}  // namespace bfp

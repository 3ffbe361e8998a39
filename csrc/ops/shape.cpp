// Data movement: concatenation, strided copies (layout transposes, slices), constant padding and
// plain copies. No rounding: values move unchanged.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "ops/vec.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

static void validate_concat(const Program& p, const Op& op, OpCheck& c) {
    const ConcatParams& q = op.get<ConcatParams>();
    c.ins(1);
    c.entries(q.lengths.size(), op.in.size(), "lengths");
    int64_t total = 0;
    for (size_t i = 0; i < op.in.size(); ++i) {
        c.fits(op.in[i], c.mul(c.mul(q.outer, q.lengths[i]), q.inner), "input");
        total += q.lengths[i];
    }
    c.fits(op.out[0], c.mul(c.mul(q.outer, total), q.inner), "output");
    (void)p;
}

static void exec_concat(Program& p, const Op& op) {
    const ConcatParams& q = op.get<ConcatParams>();
    const int64_t outer = q.outer, inner = q.inner;
    int64_t Lt = 0;
    for (size_t i = 0; i < op.in.size(); ++i) Lt += q.lengths[i];
    float* y = p.buf(op.out[0]);
    int64_t l0 = 0;
    for (size_t i = 0; i < op.in.size(); ++i) {
        const int64_t L = q.lengths[i];
        const float* x = p.buf(op.in[i]);
        const int64_t chunk = L * inner;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * chunk))
        for (int64_t o = 0; o < outer; ++o)
            std::memcpy(y + (o * Lt + l0) * inner, x + o * chunk, sizeof(float) * size_t(chunk));
        l0 += L;
    }
}

static void validate_strided(const Program& p, const Op& op, OpCheck& c) {
    const StridedParams& q = op.get<StridedParams>();
    c.ins(1);
    const int rank = c.rank(q.shape.size());
    c.entries(q.strides.size(), size_t(rank), "strides");
    c.range(q.offset, -(int64_t(1) << 40), int64_t(1) << 40, "offset");
    const int64_t n = c.prod(q.shape.data(), rank);
    c.fits(op.out[0], n, "output");
    if (n == 0) return;
    int64_t lo = q.offset, hi = q.offset;
    for (int d = 0; d < rank; ++d) {
        const int64_t st = q.strides[size_t(d)];
        if (st < -(int64_t(1) << 40) || st > (int64_t(1) << 40)) c.fail("stride out of range");
        const int64_t span = c.mul(q.shape[size_t(d)] - 1, st < 0 ? -st : st);
        if (st < 0) lo -= span;
        else hi += span;
    }
    if (lo < 0) c.fail("reads before its input");
    c.fits(op.in[0], hi + 1, "input");
    (void)p;
}

static void exec_strided(Program& p, const Op& op) {
    const StridedParams& q = op.get<StridedParams>();
    const int rank = int(q.shape.size());
    const int64_t off = q.offset;
    const int64_t* shape = q.shape.data();
    const int64_t* st = q.strides.data();
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    // A transpose whose input is contiguous along an earlier output axis k (NCHW <-> NHWC with
    // many channels): 32 x 32 tiles of (axis k, last axis), so that neither side walks one
    // element per cache line across the whole tensor.
    int kax = -1;
    if (rank >= 2 && shape[rank - 1] > 4 && st[rank - 1] != 1)
        for (int d = rank - 2; d >= 0; --d)
            if (st[d] == 1 && shape[d] > 4) {
                kax = d;
                break;
            }
    if (kax >= 0) {
        std::vector<int64_t> ostr(static_cast<size_t>(rank), 1);
        for (int d = rank - 2; d >= 0; --d) ostr[d] = ostr[d + 1] * shape[d + 1];
        const int64_t K = shape[kax], L = shape[rank - 1], ls = st[rank - 1], ok = ostr[kax];
        int64_t outer = 1, total = 1;
        for (int d = 0; d < rank; ++d) {
            total *= shape[d];
            if (d != kax && d != rank - 1) outer *= shape[d];
        }
        constexpr int64_t T = 32;
        const int64_t nkt = (K + T - 1) / T;
        parallel_for(par_pool(total) ? num_threads() : 1, outer * nkt, [&](int64_t it) {
            const int64_t k0 = (it % nkt) * T, k1 = k0 + T < K ? k0 + T : K;
            int64_t rem = it / nkt, ib = off, ob = 0;
            for (int d = rank - 2; d >= 0; --d) {
                if (d == kax) continue;
                const int64_t i = rem % shape[d];
                rem /= shape[d];
                ib += i * st[d];
                ob += i * ostr[d];
            }
            for (int64_t l0 = 0; l0 < L; l0 += T) {
                const int64_t l1 = l0 + T < L ? l0 + T : L;
                for (int64_t l = l0; l < l1; ++l) {
                    const float* s = x + ib + l * ls;
                    float* d = y + ob + l;
                    for (int64_t k = k0; k < k1; ++k) d[k * ok] = s[k];
                }
            }
        });
        return;
    }
    // rows of the last axis, walked in runs along the axis before it (offsets by increments,
    // not a division per row: a transpose to channels-last has rows of a few elements)
    const int64_t inner = rank ? shape[rank - 1] : 1, is = rank ? st[rank - 1] : 0;
    const int64_t mid = rank >= 2 ? shape[rank - 2] : 1, ms = rank >= 2 ? st[rank - 2] : 0;
    int64_t outer = 1;
    for (int d = 0; d + 2 < rank; ++d) outer *= shape[d];
    constexpr int64_t kRun = 64;  // rows per work item
    const int64_t nrun = (mid + kRun - 1) / kRun;
    // items on the runtime's pool (pool.h), as every op between the convs: an OpenMP team here
    // would wait for a core held by the pool's spinning helper (a network's input transpose)
    parallel_for(par_pool(outer * mid * inner) ? num_threads() : 1, outer * nrun, [&](int64_t it) {
        const int64_t r2 = it / nrun, j0 = (it % nrun) * kRun, j1 = j0 + kRun < mid ? j0 + kRun : mid;
        int64_t o = off, rem = r2;
        for (int d = rank - 3; d >= 0; --d) {
            o += (rem % shape[d]) * st[d];
            rem /= shape[d];
        }
        if (ms == 1 && is != 1 && inner <= 8) {
            // a few planes interleaved (NCHW -> NHWC of an image's channels): each plane's run is
            // read in order and written every inner-th float, not one element per plane per row
            for (int64_t i = 0; i < inner; ++i) {
                const float* s = x + o + j0 + i * is;
                float* d = y + (r2 * mid + j0) * inner + i;
                for (int64_t j = 0; j < j1 - j0; ++j) d[j * inner] = s[j];
            }
            return;
        }
        for (int64_t j = j0; j < j1; ++j) {
            float* d = y + (r2 * mid + j) * inner;
            const float* s = x + o + j * ms;
            if (is == 1) std::memcpy(d, s, sizeof(float) * size_t(inner));
            else for (int64_t i = 0; i < inner; ++i) d[i] = s[i * is];
        }
    });
}

static void validate_pad(const Program& p, const Op& op, OpCheck& c) {
    const PadParams& q = op.get<PadParams>();
    c.ins(1);
    const int rank = c.rank(q.in_shape.size());
    c.entries(q.out_shape.size(), size_t(rank), "out_shape");
    c.entries(q.begin.size(), size_t(rank), "begin");
    for (int64_t b : q.begin) c.range(b, -(int64_t(1) << 40), int64_t(1) << 40, "begin");
    c.fits(op.in[0], c.prod(q.in_shape.data(), rank), "input");
    c.fits(op.out[0], c.prod(q.out_shape.data(), rank), "output");
    (void)p;
}

static void exec_pad(Program& p, const Op& op) {
    const PadParams& q = op.get<PadParams>();
    const int rank = int(q.in_shape.size());
    const int64_t* ish = q.in_shape.data();
    const int64_t* osh = q.out_shape.data();
    const int64_t* beg = q.begin.data();
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    int64_t total = 1;
    for (int d = 0; d < rank; ++d) total *= osh[d];
    const int64_t inner = rank ? ish[rank - 1] : 1;
    const int64_t oinner = rank ? osh[rank - 1] : 1;
    const int64_t b_in = rank ? beg[rank - 1] : 0;
    // the part of an input row that lands in its output row: [c_lo, c_hi) of the input row
    const int64_t c_lo = b_in < 0 ? -b_in : 0;
    const int64_t c_hi = inner + b_in > oinner ? oinner - b_in : inner;
    // Output rows (all axes but the last), each written once: the pad value, the input row's
    // part, the pad value again; rows with no input row under them are the pad value.
    int64_t orows = 1;
    for (int d = 0; d + 1 < rank; ++d) orows *= osh[d];
    const float v = q.value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(total))
    for (int64_t r = 0; r < orows; ++r) {
        float* out = y + r * oinner;
        // the input row under output row r: i_d = o_d - beg_d on every axis but the last
        int64_t rem = r, src = 0, istr = 1;
        bool ok = true;
        for (int d = rank - 2; d >= 0; --d) {
            const int64_t i = rem % osh[d] - beg[d];
            rem /= osh[d];
            if (i < 0 || i >= ish[d]) ok = false;
            src += i * istr;
            istr *= ish[d];
        }
        if (!ok || c_lo >= c_hi) {
            std::fill(out, out + oinner, v);
            continue;
        }
        const int64_t o_lo = c_lo + b_in, o_hi = c_hi + b_in;
        std::fill(out, out + o_lo, v);
        std::memcpy(out + o_lo, x + src * inner + c_lo, sizeof(float) * size_t(c_hi - c_lo));
        std::fill(out + o_hi, out + oinner, v);
    }
}

static void validate_copy(const Program& p, const Op& op, OpCheck& c) {
    const CopyParams& q = op.get<CopyParams>();
    c.ins(1);
    c.fits(op.in[0], q.count, "input");
    c.fits(op.out[0], q.count, "output");
    (void)p;
}

static void exec_copy(Program& p, const Op& op) {
    std::memcpy(p.buf(op.out[0]), p.buf(op.in[0]), sizeof(float) * size_t(op.get<CopyParams>().count));
}

BFP_REGISTER_OP(kOpConcat, validate_concat, exec_concat);
BFP_REGISTER_OP(kOpStrided, validate_strided, exec_strided);
BFP_REGISTER_OP(kOpPad, validate_pad, exec_pad);
BFP_REGISTER_OP(kOpCopy, validate_copy, exec_copy);

}  // namespace bfp

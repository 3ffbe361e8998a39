// Elementwise vector ops: broadcasting binary ops and unary functions, each result rounded to
// the program's vector precision.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "ops/vec.h"
#include "ops/vmath.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

template <int K>
static inline float bin(float a, float b) {
    if constexpr (K == kAdd) return a + b;
    else if constexpr (K == kSub) return a - b;
    else if constexpr (K == kMul) return a * b;
    else if constexpr (K == kDiv) return a / b;
    else if constexpr (K == kMax) return (a != a || b != b) ? a + b : (a > b ? a : b);
    else if constexpr (K == kMin) return (a != a || b != b) ? a + b : (a < b ? a : b);
    else return std::pow(a, b);
}

// One row of a binary op: y[i] = R(a[i] op b[i * ib]) (ib 0: b broadcast). Compiled for AVX-512,
// AVX2 and baseline x86-64 and chosen by the CPU: the same IEEE operations, so the same bits.
template <int K, int VP>
__attribute__((target_clones("avx512f", "avx2", "default"))) static void bin_row(const float* a, const float* b,
                                                                                   int64_t ib, float* y, int64_t n) {
    if (ib == 1) {
        for (int64_t i = 0; i < n; ++i) y[i] = R<VP>(bin<K>(a[i], b[i]));
    } else {
        const float bv = b[0];
        for (int64_t i = 0; i < n; ++i) y[i] = R<VP>(bin<K>(a[i], bv));
    }
}

template <int K, int VP>
static void binary_t(const float* A, const float* B, float* Y, const int64_t* shape, const int64_t* sa,
                     const int64_t* sb, int rank) {
    const int64_t inner = rank ? shape[rank - 1] : 1;
    int64_t outer = 1;
    for (int d = 0; d + 1 < rank; ++d) outer *= shape[d];
    const int64_t ia = rank ? sa[rank - 1] : 0, ib = rank ? sb[rank - 1] : 0;
    parallel_ranges(par_pool(outer * inner) ? num_threads() : 1, outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)),
                    [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        int64_t oa = 0, ob = 0, rem = r;
        for (int d = rank - 2; d >= 0; --d) {
            const int64_t i = rem % shape[d];
            rem /= shape[d];
            oa += i * sa[d];
            ob += i * sb[d];
        }
        const float* a = A + oa;
        const float* b = B + ob;
        float* y = Y + r * inner;
        if (K != kPow && ia == 1 && (ib == 1 || ib == 0)) {
            bin_row<K, VP>(a, b, ib, y, inner);
        } else {
            for (int64_t i = 0; i < inner; ++i) y[i] = R<VP>(bin<K>(a[i * ia], b[i * ib]));
        }
    }
                    });
}

template <int VP>
static void binary_vp(int k, const float* A, const float* B, float* Y, const int64_t* shape, const int64_t* sa,
                      const int64_t* sb, int rank) {
    switch (k) {
        case kAdd: binary_t<kAdd, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kSub: binary_t<kSub, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kMul: binary_t<kMul, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kDiv: binary_t<kDiv, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kMax: binary_t<kMax, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kMin: binary_t<kMin, VP>(A, B, Y, shape, sa, sb, rank); break;
        case kPow: binary_t<kPow, VP>(A, B, Y, shape, sa, sb, rank); break;
        default: throw std::invalid_argument("unknown binary op");
    }
}

// ONNX Gelu (opset 20) approximate="tanh" in fp32, in the order of the operator's function body:
// 0.5 x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); Gelu approximate="none" is vm::gelu
static inline float gelu_tanh(float x) {
    const float sqrt_2_over_pi = std::sqrt(0.636619747f);  // sqrt of the float nearest 2/pi
    return (0.5f * x) * (1.0f + vm::tanh(sqrt_2_over_pi * (x + 0.044715f * std::pow(x, 3.0f))));
}

// One element of a unary op: its function (k, with q's parameters) in fp32; the caller rounds
// the result to the vector precision.
static inline float unary(int k, float x, const UnaryParams& q) {
    switch (k) {
        case kRelu: return x > 0.0f ? x : (x != x ? x : 0.0f);
        case kClip: return x != x ? x : std::min(std::max(x, q.lo), q.hi);
        case kSqrt: return std::sqrt(x);
        case kRecip: return 1.0f / x;
        case kExp: return vm::exp(x);
        case kSigmoid: return vm::sigmoid(x);
        case kTanh: return vm::tanh(x);
        case kNeg: return -x;
        case kAbs: return std::fabs(x);
        case kLeakyRelu: return x >= 0.0f ? x : x * q.alpha;
        case kIdentity: return x;
        case kLog: return std::log(x);
        case kErf: return vm::erf(x);
        case kHardSigmoid: return std::max(0.0f, std::min(1.0f, q.alpha * x + q.beta));
        case kHardSwish: return x * std::max(0.0f, std::min(1.0f, x / 6.0f + 0.5f));
        case kSwish: return vm::swish(x);
        case kRsqrt: return 1.0f / std::sqrt(x);
        case kFloor: return std::floor(x);
        case kCeil: return std::ceil(x);
        case kGelu: return vm::gelu(x);
        case kGeluTanh: return gelu_tanh(x);
        default: return x;
    }
}

// the row-loop function (vm::VecFn) of unary op k, -1 if none
static int vec_fn(int k) {
    switch (k) {
        case kExp: return vm::kFnExp;
        case kErf: return vm::kFnErf;
        case kTanh: return vm::kFnTanh;
        case kSigmoid: return vm::kFnSigmoid;
        case kSwish: return vm::kFnSwish;
        case kGelu: return vm::kFnGelu;
        default: return -1;
    }
}

static void validate_binary(const Program& p, const Op& op, OpCheck& c) {
    const BinaryParams& q = op.get<BinaryParams>();
    c.ins(2);
    if (q.op < 0 || q.op >= kBinaryCount) c.fail("unknown binary op " + std::to_string(q.op));
    const int rank = c.rank(q.shape.size());
    c.entries(q.a_strides.size(), size_t(rank), "a_strides");
    c.entries(q.b_strides.size(), size_t(rank), "b_strides");
    const int64_t n = c.prod(q.shape.data(), rank);
    c.fits(op.out[0], n, "output");
    for (int k = 0; k < 2; ++k) {
        const std::vector<int64_t>& st = k == 0 ? q.a_strides : q.b_strides;
        int64_t hi = 0;
        for (int d = 0; d < rank; ++d) {
            if (st[size_t(d)] < 0) c.fail("negative stride");
            if (q.shape[size_t(d)] > 0) hi += c.mul(q.shape[size_t(d)] - 1, st[size_t(d)]);
        }
        if (n > 0) c.fits(op.in[size_t(k)], hi + 1, "operand");
    }
    (void)p;
}

static void exec_binary(Program& p, const Op& op) {
    const BinaryParams& q = op.get<BinaryParams>();
    const int rank = int(q.shape.size());
    const float* a = p.buf(op.in[0]);
    const float* b = p.buf(op.in[1]);
    float* y = p.buf(op.out[0]);
    with_vp(p.vec_prec(), [&](auto V) {
        binary_vp<decltype(V)::value>(q.op, a, b, y, q.shape.data(), q.a_strides.data(), q.b_strides.data(), rank);
    });
}

static void validate_unary(const Program& p, const Op& op, OpCheck& c) {
    const UnaryParams& q = op.get<UnaryParams>();
    if (q.op < 0 || q.op >= kUnaryCount) c.fail("unknown unary op " + std::to_string(q.op));
    c.ins(1);
    c.fits(op.in[0], q.count, "input");
    c.fits(op.out[0], q.count, "output");
    (void)p;
}

static void exec_unary(Program& p, const Op& op) {
    const UnaryParams q = op.get<UnaryParams>();  // a local copy: the loop's stores cannot alias it
    const int64_t n = q.count;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const int k = q.op;
    const int fn = vec_fn(k);
    const KernelDesc& kd = current_kernel();
    const int vprec = p.vec_prec();
    // row(o, len): the values [o, o + len) by a vector loop, in chunks shared by the threads
    auto chunked = [&](auto&& row) {
        const int64_t chunk = 16384, nc = (n + chunk - 1) / chunk;
        parallel_for(par_pool(n) ? num_threads() : 1, nc,
                     [&](int64_t c) { row(c * chunk, std::min(chunk, n - c * chunk)); });
    };
    if (fn >= 0) {  // exp, erf, tanh and the functions built on them: the kernel's vector loop
        const auto row = kd.fn_row ? kd.fn_row : vm::fn_row;
        return chunked([&](int64_t o, int64_t len) { row(fn, vprec, x + o, y + o, len); });
    }
    if ((k == kRelu || k == kClip) && kd.simd()) {  // in AVX2 registers (every SIMD kernel's CPU has
        const int act = k == kRelu ? 1 : 2;        // AVX2): the loop below, bit for bit
        return chunked([&](int64_t o, int64_t n_) { avx2::activation_row(x + o, y + o, n_, vprec, act, q.lo, q.hi); });
    }
    with_vp(vprec, [&](auto V) {
        constexpr int vp = decltype(V)::value;
        if (k == kRelu) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(n))
            for (int64_t i = 0; i < n; ++i) y[i] = R<vp>(x[i] > 0.0f ? x[i] : (x[i] != x[i] ? x[i] : 0.0f));
        } else {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(n * 8))
            for (int64_t i = 0; i < n; ++i) y[i] = R<vp>(unary(k, x[i], q));
        }
    });
}

BFP_REGISTER_OP(kOpBinary, validate_binary, exec_binary);
BFP_REGISTER_OP(kOpUnary, validate_unary, exec_unary);

}  // namespace bfp

// The plan executor (see runtime.h). Every op is a plain loop nest over contiguous memory,
// parallel with OpenMP; vector ops round their results to the program's vector precision.
#include "runtime.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace bfp {

// ---------------------------------------------------------------- vector precision
static inline uint32_t f2u(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
static inline float u2f(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// fp32 -> nearest fp16 (ties to even, overflow to Inf, subnormals kept) -> fp32; branch-free
// so the loops that call it vectorise
__attribute__((always_inline)) static inline float rnd16(float x) {
    const uint32_t b = f2u(x), s = b & 0x80000000u, a = b & 0x7fffffffu;
    uint32_t r = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;  // normal: keep 10 fraction bits
    const uint32_t sub = f2u((u2f(a) + 0.5f) - 0.5f);          // below 2^-14: multiples of 2^-24
    r = a < 0x38800000u ? sub : r;
    r = a >= 0x477ff000u ? 0x7f800000u : r;                     // >= 65520 rounds to Inf
    r = a >= 0x7f800000u ? a : r;                               // Inf / NaN stay
    return u2f(s | r);
}

__attribute__((always_inline)) static inline float rnd_bf(float x) {
    const uint32_t b = f2u(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return u2f(b | 0x00400000u);  // NaN stays (quiet) NaN
    return u2f((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u);
}

template <int VP>
__attribute__((always_inline)) static inline float R(float x) {
    if constexpr (VP == kVecFp16) return rnd16(x);
    else if constexpr (VP == kVecBf16) return rnd_bf(x);
    else return x;
}

float round_fp16(float x) { return rnd16(x); }
float round_bf16(float x) { return rnd_bf(x); }

void round_vec(float* x, int64_t n, int vp) {
    if (vp == kVecFp16) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (n > 65536)
        for (int64_t i = 0; i < n; ++i) x[i] = rnd16(x[i]);
    } else if (vp == kVecBf16) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (n > 65536)
        for (int64_t i = 0; i < n; ++i) x[i] = rnd_bf(x[i]);
    }
}

// Dispatches a functor templated on the vector precision.
template <class F>
static void with_vp(int vp, F&& f) {
    if (vp == kVecFp16) f(std::integral_constant<int, kVecFp16>{});
    else if (vp == kVecBf16) f(std::integral_constant<int, kVecBf16>{});
    else f(std::integral_constant<int, kVecFp32>{});
}

static inline bool par(int64_t work) { return work > 32768; }

// ---------------------------------------------------------------- fp32 convolution
__attribute__((target_clones("avx2", "default"))) static void conv_fp32_rows(
    const float* x, const float* w, const ConvGeom& g, int64_t O, int kh, int kw, float* out, int64_t n,
    int64_t gi, int64_t p0, int np) {
    const int64_t C = g.C, Cg = C / g.groups, Og = O / g.groups;
    float acc[4][256];
    for (int64_t o0 = 0; o0 < Og; o0 += 256) {
        const int64_t no = std::min<int64_t>(256, Og - o0);
        for (int j = 0; j < np; ++j)
            for (int64_t o = 0; o < no; ++o) acc[j][o] = 0.0f;
        for (int t = 0; t < kh * kw; ++t) {
            const int64_t ky = t / kw, kx = t % kw;
            const float* xr[4];
            for (int j = 0; j < 4; ++j) {
                xr[j] = nullptr;
                if (j >= np) continue;
                const int64_t p = p0 + j, oy = p / g.OW, ox = p % g.OW;
                const int64_t iy = oy * g.sh - g.pt + ky * g.dh, ix = ox * g.sw - g.pl + kx * g.dw;
                if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) xr[j] = x + ((n * g.H + iy) * g.W + ix) * C + gi * Cg;
            }
            const float* wt = w + ((gi * kh * kw + t) * Cg) * Og + o0;
            for (int64_t c = 0; c < Cg; ++c) {
                const float* wr = wt + c * Og;
                for (int j = 0; j < np; ++j) {
                    if (!xr[j]) continue;
                    const float xv = xr[j][c];
                    float* a = acc[j];
                    for (int64_t o = 0; o < no; ++o) a[o] = a[o] + xv * wr[o];
                }
            }
        }
        for (int j = 0; j < np; ++j) {
            float* d = out + ((n * g.OH * g.OW) + p0 + j) * O + gi * Og + o0;
            for (int64_t o = 0; o < no; ++o) d[o] = acc[j][o];
        }
    }
}

void conv2d_fp32_nhwc(const float* x, const float* w, const ConvGeom& g, int64_t O, int kh, int kw, float* out) {
    const int64_t P = g.OH * g.OW, nchunk = (P + 3) / 4, items = g.N * g.groups * nchunk;
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic, 4)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t c = it % nchunk, gi = (it / nchunk) % g.groups, n = it / (nchunk * g.groups);
        const int64_t p0 = c * 4;
        conv_fp32_rows(x, w, g, O, kh, kw, out, n, gi, p0, int(std::min<int64_t>(4, P - p0)));
    }
}

// Depthwise (one input channel per group, multiplier 1), NHWC, weights [taps][C]. On the BFP
// datapath every block holds one element, so each product fq(x) * fq(w) is exact in fp32 (or
// rounds once, like the datapath's scaling, when it underflows) and the sum runs over the taps
// in order: fp32 arithmetic on the fake-quantized operands is the datapath, bit for bit.
// Padded taps add 0 * w (a NaN weight block stays NaN, as in the reference).
__attribute__((target_clones("avx2", "default"))) static void dw_row(const float* x, const float* w,
                                                                    const ConvGeom& g, int kh, int kw, int64_t n,
                                                                    int64_t oy, int64_t ox, float* out) {
    const int64_t C = g.C;
    for (int64_t c = 0; c < C; ++c) out[c] = 0.0f;
    for (int ky = 0; ky < kh; ++ky) {
        const int64_t iy = oy * g.sh - g.pt + int64_t(ky) * g.dh;
        for (int kx = 0; kx < kw; ++kx) {
            const int64_t ix = ox * g.sw - g.pl + int64_t(kx) * g.dw;
            const float* wt = w + int64_t(ky * kw + kx) * C;
            if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
                const float* xr = x + ((n * g.H + iy) * g.W + ix) * C;
                for (int64_t c = 0; c < C; ++c) out[c] = out[c] + xr[c] * wt[c];
            } else {
                for (int64_t c = 0; c < C; ++c) out[c] = out[c] + 0.0f * wt[c];
            }
        }
    }
}

void dwconv_nhwc(const float* x, const float* w, const ConvGeom& g, int kh, int kw, float* out) {
    const int64_t P = g.N * g.OH * g.OW;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (P * g.C * kh * kw > 32768)
    for (int64_t p = 0; p < P; ++p) {
        const int64_t n = p / (g.OH * g.OW), oy = (p / g.OW) % g.OH, ox = p % g.OW;
        dw_row(x, w, g, kh, kw, n, oy, ox, out + p * g.C);
    }
}

// ---------------------------------------------------------------- program
int Program::add_buffer(int64_t n) {
    bufs_.emplace_back(size_t(std::max<int64_t>(n, 1)), 0.0f);
    slot_.push_back(int(bufs_.size()) - 1);
    return int(slot_.size()) - 1;
}

int Program::add_const(const float* data, int64_t n) {
    const int id = add_buffer(n);
    if (n) std::memcpy(bufs_.back().data(), data, sizeof(float) * size_t(n));
    return id;
}

int Program::alias(int id) {
    if (id < 0 || size_t(id) >= slot_.size()) throw std::invalid_argument("alias: unknown buffer");
    slot_.push_back(slot_[size_t(id)]);
    return int(slot_.size()) - 1;
}

void Program::add_op(Op op) {
    auto check = [&](int id) {
        if (id < -1 || id >= int(slot_.size())) throw std::invalid_argument("op " + op.name + ": unknown buffer");
    };
    for (int id : op.in) check(id);
    for (int id : op.out) check(id);
    check(op.bias);
    check(op.res);
    check(op.wf);
    if (op.kind == kOpConv && !op.w && op.wf < 0) throw std::invalid_argument("conv without weights");
    if (op.kind == kOpConv && op.w && !has_fmt_) throw std::invalid_argument("BFP conv in a program without format");
    validate(op);
    ops_.push_back(std::move(op));
}

// Every size an op will read or write, checked against its parameters and buffers once, when
// it is added: a forged or inconsistent program is an error here, never a read out of bounds.
void Program::validate(const Op& op) const {
    const std::string where = "op " + op.name + ": ";
    auto fail = [&](const std::string& m) { throw std::invalid_argument(where + m); };
    const auto& q = op.ip;
    auto need_ip = [&](size_t n) {
        if (q.size() < n) fail("expects " + std::to_string(n) + " integer parameters, got " + std::to_string(q.size()));
    };
    constexpr int64_t kMax = int64_t(1) << 40;  // elements: far beyond any buffer
    auto mul = [&](int64_t a, int64_t b) {
        if (a < 0 || b < 0) fail("negative size");
        if (a != 0 && b > kMax / a) fail("size overflows");
        return a * b;
    };
    auto prod = [&](const int64_t* d, int n) {
        int64_t p = 1;
        for (int i = 0; i < n; ++i) p = mul(p, d[i]);
        return p;
    };
    auto fits = [&](int id, int64_t n, const char* what) {
        if (id < 0) fail(std::string("missing ") + what);
        if (size(id) < n) fail(std::string(what) + " buffer holds " + std::to_string(size(id)) + " floats, needs " +
                               std::to_string(n));
    };
    auto ins = [&](size_t n) {
        if (op.in.size() < n || op.out.empty()) fail("missing inputs or outputs");
    };
    auto pos = [&](int64_t v, const char* what) {
        if (v < 1) fail(std::string(what) + " must be >= 1");
    };
    switch (op.kind) {
        case kOpConv: {
            need_ip(18);
            ins(1);
            const int64_t N = q[0], H = q[1], W = q[2], C = q[3], O = q[4], kh = q[5], kw = q[6], G = q[15];
            pos(q[7], "stride");
            pos(q[8], "stride");
            pos(q[13], "dilation");
            pos(q[14], "dilation");
            pos(kh, "kernel height");
            pos(kw, "kernel width");
            pos(G, "groups");
            for (int i = 9; i <= 12; ++i)
                if (q[i] < 0 || q[i] > (1 << 20)) fail("padding out of range");
            if (C % G || O % G) fail("groups must divide the channels");
            const int64_t OH = (H + q[9] + q[11] - q[13] * (kh - 1) - 1) / q[7] + 1;
            const int64_t OW = (W + q[10] + q[12] - q[14] * (kw - 1) - 1) / q[8] + 1;
            if (OH != q[16] || OW != q[17] || OH < 1 || OW < 1) fail("output size does not match the geometry");
            fits(op.in[0], mul(mul(N, H), mul(W, C)), "input");
            const int64_t outn = mul(mul(N, OH), mul(OW, O));
            fits(op.out[0], outn, "output");
            if (op.bias >= 0) fits(op.bias, O, "bias");
            if (op.res >= 0) fits(op.res, outn, "residual");
            if (op.sub == 1) {
                if (C != O || G != C) fail("depthwise conv needs groups == channels == outputs");
                fits(op.wf, mul(mul(kh, kw), C), "depthwise weight");
            } else if (op.w) {
                const Operand& w = *op.w;
                if (w.R != O || w.K * G != C || w.kh != kh || w.kw != kw || w.groups != G)
                    fail("the packed weight does not match the conv's geometry");
            } else {
                fits(op.wf, mul(mul(mul(kh, kw), C / G), O), "weight");
            }
            return;
        }
        case kOpBinary: {
            need_ip(1);
            ins(2);
            if (q[0] < 0 || q[0] > 64) fail("rank out of range");
            const int rank = int(q[0]);
            need_ip(1 + 3 * size_t(rank));
            const int64_t* shape = q.data() + 1;
            fits(op.out[0], prod(shape, rank), "output");
            for (int k = 0; k < 2; ++k) {
                const int64_t* st = shape + (k + 1) * rank;
                int64_t hi = 0;
                for (int d = 0; d < rank; ++d) {
                    if (st[d] < 0) fail("negative stride");
                    if (shape[d] > 0) hi += mul(shape[d] - 1, st[d]);
                }
                if (prod(shape, rank) > 0) fits(op.in[size_t(k)], hi + 1, "operand");
            }
            return;
        }
        case kOpUnary:
        case kOpCopy:
            need_ip(1);
            ins(1);
            fits(op.in[0], q[0], "input");
            fits(op.out[0], q[0], "output");
            return;
        case kOpAffine: {
            need_ip(3);
            ins(1);
            const int64_t n = mul(mul(q[0], q[1]), q[2]);
            if (int64_t(op.fp.size()) < 2 * q[1]) fail("missing scale/shift");
            fits(op.in[0], n, "input");
            fits(op.out[0], n, "output");
            return;
        }
        case kOpPool: {
            need_ip(17);
            ins(1);
            for (int i : {4, 5, 6, 7, 15, 16}) pos(q[size_t(i)], "pool window, stride and dilation");
            for (int i = 8; i <= 11; ++i)
                if (q[size_t(i)] < 0) fail("negative padding");
            fits(op.in[0], mul(mul(q[0], q[1]), mul(q[2], q[3])), "input");
            fits(op.out[0], mul(mul(q[0], q[12]), mul(q[13], q[3])), "output");
            return;
        }
        case kOpReduce:
        case kOpSoftmax: {
            need_ip(3);
            ins(1);
            const int64_t n = mul(mul(q[0], q[1]), q[2]);
            fits(op.in[0], n, "input");
            fits(op.out[0], op.kind == kOpReduce ? mul(q[0], q[2]) : n, "output");
            return;
        }
        case kOpConcat: {
            need_ip(2 + op.in.size());
            ins(1);
            int64_t total = 0;
            for (size_t i = 0; i < op.in.size(); ++i) {
                fits(op.in[i], mul(mul(q[0], q[2 + i]), q[1]), "input");
                total += q[2 + i];
            }
            fits(op.out[0], mul(mul(q[0], total), q[1]), "output");
            return;
        }
        case kOpStrided: {
            need_ip(2);
            ins(1);
            if (q[0] < 0 || q[0] > 64) fail("rank out of range");
            const int rank = int(q[0]);
            need_ip(2 + 2 * size_t(rank));
            const int64_t* shape = q.data() + 2;
            const int64_t* st = shape + rank;
            const int64_t n = prod(shape, rank);
            fits(op.out[0], n, "output");
            if (n == 0) return;
            int64_t lo = q[1], hi = q[1];
            for (int d = 0; d < rank; ++d) {
                const int64_t span = mul(shape[d] - 1, st[d] < 0 ? -st[d] : st[d]);
                if (st[d] < 0) lo -= span;
                else hi += span;
            }
            if (lo < 0) fail("reads before its input");
            fits(op.in[0], hi + 1, "input");
            return;
        }
        case kOpPad: {
            need_ip(1);
            ins(1);
            if (q[0] < 0 || q[0] > 64) fail("rank out of range");
            const int rank = int(q[0]);
            need_ip(1 + 3 * size_t(rank));
            fits(op.in[0], prod(q.data() + 1, rank), "input");
            fits(op.out[0], prod(q.data() + 1 + rank, rank), "output");
            return;
        }
        default: fail("unknown op kind " + std::to_string(op.kind));
    }
}

std::vector<std::string> Program::op_names() const {
    std::vector<std::string> v;
    for (const Op& o : ops_) v.push_back(o.name);
    return v;
}

void Program::run(const std::vector<std::pair<int, const float*>>& inputs) {
    for (const auto& in : inputs) {
        float* d = ptr(in.first);
        std::memcpy(d, in.second, sizeof(float) * bufs_[size_t(slot_[size_t(in.first)])].size());
    }
    times_.assign(profile_ ? ops_.size() : 0, 0.0);
    gemm_times_.assign(profile_ ? ops_.size() : 0, 0.0);
    for (size_t i = 0; i < ops_.size(); ++i) {
        if (profile_) {
            const GemmTimer gt(&gemm_times_[i]);
            const auto t0 = std::chrono::steady_clock::now();
            exec(ops_[i]);
            times_[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        } else {
            exec(ops_[i]);
        }
    }
}

// ---------------------------------------------------------------- ops
template <int VP>
__attribute__((always_inline)) static inline void epi_t(float* d, const float* b, const float* r, int64_t n, int act,
                                                        float lo, float hi) {
    if (b) for (int64_t o = 0; o < n; ++o) d[o] = R<VP>(d[o] + b[o]);
    if (r) for (int64_t o = 0; o < n; ++o) d[o] = R<VP>(d[o] + r[o]);
    if (act == 1) {
        for (int64_t o = 0; o < n; ++o) d[o] = R<VP>(d[o] > 0.0f ? d[o] : (d[o] != d[o] ? d[o] : 0.0f));
    } else if (act == 2) {
        for (int64_t o = 0; o < n; ++o) {
            const float v = d[o];
            d[o] = v != v ? v : R<VP>(v < lo ? lo : (v > hi ? hi : v));
        }
    }
}

// bias, residual and activation of one row of a conv's output, each rounded to the vector
// precision as the separate ops would be
static void epilogue_row(float* d, const float* b, const float* r,
                                                                          int64_t n, int vp, int act, float lo,
                                                                          float hi) {
    if (vp == kVecFp16) epi_t<kVecFp16>(d, b, r, n, act, lo, hi);
    else if (vp == kVecBf16) epi_t<kVecBf16>(d, b, r, n, act, lo, hi);
    else epi_t<kVecFp32>(d, b, r, n, act, lo, hi);
}

void Program::conv(const Op& op) {
    const auto& q = op.ip;
    const ConvGeom g{q[0], q[3], q[1], q[2], int(q[15]), int(q[7]), int(q[8]), int(q[9]), int(q[10]),
                     int(q[11]), int(q[12]), int(q[13]), int(q[14]), q[16], q[17]};
    const int64_t O = q[4];
    float* y = ptr(op.out[0]);
    const float* x = ptr(op.in[0]);
    const KernelDesc& k = current_kernel();
    // bias, residual and activation, each rounded as the separate vector ops would be: applied
    // in registers by kernels that can, else by a pass over the output below
    const VecEpilogue ve{y, O, op.bias >= 0 ? ptr(op.bias) : nullptr, op.res >= 0 ? ptr(op.res) : nullptr, vp_,
                         op.act, op.fp.size() > 0 ? op.fp[0] : 0.0f, op.fp.size() > 1 ? op.fp[1] : 0.0f,
                         k.simd() ? avx2::epilogue_row : epilogue_row};  // every SIMD kernel's CPU has AVX2 + F16C
    const bool epi = ve.bias || ve.res || ve.act;
    if (op.sub == 1) {  // depthwise: one-element blocks (see dwconv_nhwc)
        const bool quant = has_fmt_ && op.ip.size() > 18 && op.ip[18];
        const bool kq = quant && k.dwconv && kernel_quantizes_elements(fx_);  // the kernel quantizes x itself
        const float* xin = x;
        if (quant && !kq) {
            const int64_t n = g.N * g.H * g.W * g.C;
            if (dwq_.size() < size_t(n)) dwq_.resize(size_t(n));  // kept across runs
            fake_quantize_elements(x, n, fx_, seed_, dwq_.data());
            xin = dwq_.data();
        }
        if (k.dwconv) {  // the kernel's depthwise loop, epilogue applied in registers
            const ElemFix fix{x, &fx_, seed_, 0};
            const DwArgs da{xin, ptr(op.wf), y, g.N, g.C, g.H, g.W, g.OH, g.OW, int(q[5]), int(q[6]),
                            g.sh, g.sw, g.pt, g.pl, g.dh, g.dw, epi ? &ve : nullptr,
                            kq ? &fx_ : nullptr, fix_element, &fix};
            k.dwconv(da);
            return;
        }
        dwconv_nhwc(xin, ptr(op.wf), g, int(q[5]), int(q[6]), y);
    } else if (op.w) {
        if (k.fused_epilogue && epi) {  // applied to each tile in registers
            conv2d_impl(x, fx_, seed_, *op.w, g, nullptr, y, true, &ve);
            return;
        }
        conv2d_impl(x, fx_, seed_, *op.w, g, nullptr, y, true);
    } else {
        conv2d_fp32_nhwc(x, ptr(op.wf), g, O, int(q[5]), int(q[6]), y);
    }
    if (!epi) return;  // the matrix unit's fp32 output goes on as it is
    const int64_t rows = g.N * g.OH * g.OW;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(rows * O))
    for (int64_t i = 0; i < rows; ++i) ve.rows(y + i * O, 1, int(O), O);
}

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

template <int K, int VP>
static void binary_t(const float* A, const float* B, float* Y, const int64_t* shape, const int64_t* sa,
                     const int64_t* sb, int rank) {
    const int64_t inner = rank ? shape[rank - 1] : 1;
    int64_t outer = 1;
    for (int d = 0; d + 1 < rank; ++d) outer *= shape[d];
    const int64_t ia = rank ? sa[rank - 1] : 0, ib = rank ? sb[rank - 1] : 0;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * inner))
    for (int64_t r = 0; r < outer; ++r) {
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
        if (ia == 1 && ib == 1) {
            for (int64_t i = 0; i < inner; ++i) y[i] = R<VP>(bin<K>(a[i], b[i]));
        } else if (ia == 1 && ib == 0) {
            const float bv = b[0];
            for (int64_t i = 0; i < inner; ++i) y[i] = R<VP>(bin<K>(a[i], bv));
        } else {
            for (int64_t i = 0; i < inner; ++i) y[i] = R<VP>(bin<K>(a[i * ia], b[i * ib]));
        }
    }
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

static inline float unary(int k, float x, float p0, float p1) {
    switch (k) {
        case kRelu: return x > 0.0f ? x : (x != x ? x : 0.0f);
        case kClip: return x != x ? x : std::min(std::max(x, p0), p1);
        case kSqrt: return std::sqrt(x);
        case kRecip: return 1.0f / x;
        case kExp: return std::exp(x);
        case kSigmoid: return 1.0f / (1.0f + std::exp(-x));
        case kTanh: return std::tanh(x);
        case kNeg: return -x;
        case kAbs: return std::fabs(x);
        case kLeakyRelu: return x >= 0.0f ? x : x * p0;
        case kIdentity: return x;
        case kLog: return std::log(x);
        case kErf: return std::erf(x);
        case kHardSigmoid: return std::max(0.0f, std::min(1.0f, p0 * x + p1));
        case kHardSwish: return x * std::max(0.0f, std::min(1.0f, x / 6.0f + 0.5f));
        case kSwish: return x / (1.0f + std::exp(-x));
        case kRsqrt: return 1.0f / std::sqrt(x);
        case kFloor: return std::floor(x);
        case kCeil: return std::ceil(x);
        default: return x;
    }
}

void Program::exec(const Op& op) {
    const auto& q = op.ip;
    switch (op.kind) {
        case kOpConv: conv(op); return;
        case kOpBinary: {
            const int rank = int(q[0]);
            const int64_t* shape = q.data() + 1;
            const float* a = ptr(op.in[0]);
            const float* b = ptr(op.in[1]);
            float* y = ptr(op.out[0]);
            with_vp(vp_, [&](auto V) {
                binary_vp<decltype(V)::value>(op.sub, a, b, y, shape, shape + rank, shape + 2 * rank, rank);
            });
            return;
        }
        case kOpUnary: {
            const int64_t n = q[0];
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
            const float p0 = op.fp.size() > 0 ? op.fp[0] : 0.0f, p1 = op.fp.size() > 1 ? op.fp[1] : 0.0f;
            const int k = op.sub;
            with_vp(vp_, [&](auto V) {
                constexpr int vp = decltype(V)::value;
                if (k == kRelu) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(n))
                    for (int64_t i = 0; i < n; ++i) y[i] = R<vp>(x[i] > 0.0f ? x[i] : (x[i] != x[i] ? x[i] : 0.0f));
                } else {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(n * 8))
                    for (int64_t i = 0; i < n; ++i) y[i] = R<vp>(unary(k, x[i], p0, p1));
                }
            });
            return;
        }
        case kOpAffine: {
            const int64_t outer = q[0], C = q[1], inner = q[2];
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
            const float* s = op.fp.data();
            const float* t = op.fp.data() + C;
            with_vp(vp_, [&](auto V) {
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
            return;
        }
        case kOpPool: {
            // N H W C kh kw sh sw pt pl pb pr OH OW count_include_pad dh dw
            const int64_t N = q[0], H = q[1], W = q[2], C = q[3], kh = q[4], kw = q[5], sh = q[6], sw = q[7];
            const int64_t pt = q[8], pl = q[9], pb = q[10], pr = q[11], OH = q[12], OW = q[13], cip = q[14];
            const int64_t dh = q[15], dw = q[16];
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
            const bool mx = op.sub == kPoolMax;
            with_vp(vp_, [&](auto V) {
                constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(N * OH * OW * C * kh * kw))
                for (int64_t p = 0; p < N * OH * OW; ++p) {
                    const int64_t n = p / (OH * OW), oy = (p / OW) % OH, ox = p % OW;
                    float* d = y + p * C;
                    for (int64_t c = 0; c < C; ++c) d[c] = mx ? -std::numeric_limits<float>::infinity() : 0.0f;
                    int64_t cnt = 0;
                    for (int64_t ky = 0; ky < kh; ++ky) {
                        const int64_t iy = oy * sh - pt + ky * dh;
                        for (int64_t kx = 0; kx < kw; ++kx) {
                            const int64_t ix = ox * sw - pl + kx * dw;
                            const bool in = iy >= 0 && iy < H && ix >= 0 && ix < W;
                            if (!in) {
                                if (cip && iy >= -pt && iy < H + pb && ix >= -pl && ix < W + pr) ++cnt;
                                continue;
                            }
                            ++cnt;
                            const float* s = x + ((n * H + iy) * W + ix) * C;
                            if (mx) {
                                for (int64_t c = 0; c < C; ++c) d[c] = (s[c] > d[c] || s[c] != s[c]) ? s[c] : d[c];
                            } else {
                                for (int64_t c = 0; c < C; ++c) d[c] = d[c] + s[c];
                            }
                        }
                    }
                    if (mx) {
                        for (int64_t c = 0; c < C; ++c) d[c] = R<vp>(d[c]);
                    } else {
                        const float inv = float(cnt ? cnt : 1);
                        for (int64_t c = 0; c < C; ++c) d[c] = R<vp>(d[c] / inv);
                    }
                }
            });
            return;
        }
        case kOpReduce: {
            const int64_t outer = q[0], Rn = q[1], inner = q[2];
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
            const int k = op.sub;
            with_vp(vp_, [&](auto V) {
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
            return;
        }
        case kOpSoftmax: {
            const int64_t outer = q[0], L = q[1], inner = q[2];
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
            const bool logsm = op.sub == 1;
            with_vp(vp_, [&](auto V) {
                constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * L * inner * 8))
                for (int64_t oi = 0; oi < outer * inner; ++oi) {
                    const int64_t o = oi / inner, i = oi % inner;
                    const float* s = x + o * L * inner + i;
                    float* d = y + o * L * inner + i;
                    float m = -std::numeric_limits<float>::infinity();
                    for (int64_t l = 0; l < L; ++l) m = std::max(m, s[l * inner]);
                    float sum = 0.0f;
                    for (int64_t l = 0; l < L; ++l) sum = sum + std::exp(s[l * inner] - m);
                    if (logsm) {
                        const float ls = std::log(sum);
                        for (int64_t l = 0; l < L; ++l) d[l * inner] = R<vp>((s[l * inner] - m) - ls);
                    } else {
                        for (int64_t l = 0; l < L; ++l) d[l * inner] = R<vp>(std::exp(s[l * inner] - m) / sum);
                    }
                }
            });
            return;
        }
        case kOpConcat: {
            const int64_t outer = q[0], inner = q[1];
            int64_t Lt = 0;
            for (size_t i = 0; i < op.in.size(); ++i) Lt += q[2 + i];
            float* y = ptr(op.out[0]);
            int64_t l0 = 0;
            for (size_t i = 0; i < op.in.size(); ++i) {
                const int64_t L = q[2 + i];
                const float* x = ptr(op.in[i]);
                const int64_t chunk = L * inner;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(outer * chunk))
                for (int64_t o = 0; o < outer; ++o)
                    std::memcpy(y + (o * Lt + l0) * inner, x + o * chunk, sizeof(float) * size_t(chunk));
                l0 += L;
            }
            return;
        }
        case kOpStrided: {
            // rank offset shape[rank] strides[rank]
            const int rank = int(q[0]);
            const int64_t off = q[1];
            const int64_t* shape = q.data() + 2;
            const int64_t* st = shape + rank;
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
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
            return;
        }
        case kOpPad: {
            // rank in_shape[rank] out_shape[rank] begin[rank]
            const int rank = int(q[0]);
            const int64_t* ish = q.data() + 1;
            const int64_t* osh = ish + rank;
            const int64_t* beg = osh + rank;
            const float* x = ptr(op.in[0]);
            float* y = ptr(op.out[0]);
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
            return;
        }
        case kOpCopy: {
            const int64_t n = q[0];
            std::memcpy(ptr(op.out[0]), ptr(op.in[0]), sizeof(float) * size_t(n));
            return;
        }
        default: throw std::invalid_argument("unknown op kind");
    }
}

}  // namespace bfp

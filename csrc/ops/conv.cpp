// Matrix ops: NHWC convolution and dense layers on the BFP core (or in fp32), depthwise
// convolutions on one-element blocks, each with its bias, residual Add and ReLU / Clip fused
// into the epilogue (rounded as the separate vector ops would be).
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

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

// ---------------------------------------------------------------- conv op
// ip: N H W C O kh kw sh sw pt pl pb pr dh dw groups OH OW [quantize input (depthwise)]
static void validate_conv(const Program& p, const Op& op, OpCheck& c) {
    const auto& q = op.ip;
    c.need_ip(18);
    if (op.sub != 0 && op.sub != 1) c.fail("conv takes sub 0 (dense / grouped) or 1 (depthwise)");
    if (op.act < 0 || op.act > 2) c.fail("unknown conv activation " + std::to_string(op.act));
    c.ins(1);
    const int64_t N = q[0], H = q[1], W = q[2], C = q[3], O = q[4], kh = q[5], kw = q[6], G = q[15];
    c.pos(q[7], "stride");
    c.pos(q[8], "stride");
    c.pos(q[13], "dilation");
    c.pos(q[14], "dilation");
    c.pos(kh, "kernel height");
    c.pos(kw, "kernel width");
    c.pos(G, "groups");
    for (int i = 9; i <= 12; ++i)
        if (q[size_t(i)] < 0 || q[size_t(i)] > (1 << 20)) c.fail("padding out of range");
    if (C % G || O % G) c.fail("groups must divide the channels");
    const int64_t OH = (H + q[9] + q[11] - q[13] * (kh - 1) - 1) / q[7] + 1;
    const int64_t OW = (W + q[10] + q[12] - q[14] * (kw - 1) - 1) / q[8] + 1;
    if (OH != q[16] || OW != q[17] || OH < 1 || OW < 1) c.fail("output size does not match the geometry");
    c.fits(op.in[0], c.mul(c.mul(N, H), c.mul(W, C)), "input");
    const int64_t outn = c.mul(c.mul(N, OH), c.mul(OW, O));
    c.fits(op.out[0], outn, "output");
    if (op.bias >= 0) c.fits(op.bias, O, "bias");
    if (op.res >= 0) c.fits(op.res, outn, "residual");
    if (op.sub == 1) {
        if (C != O || G != C) c.fail("depthwise conv needs groups == channels == outputs");
        c.fits(op.wf, c.mul(c.mul(kh, kw), C), "depthwise weight");
    } else if (op.w) {
        const Operand& w = *op.w;
        if (w.R != O || w.K * G != C || w.kh != kh || w.kw != kw || w.groups != G)
            c.fail("the packed weight does not match the conv's geometry");
    } else {
        c.fits(op.wf, c.mul(c.mul(c.mul(kh, kw), C / G), O), "weight");
    }
    (void)p;
}

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

static void exec_conv(Program& p, const Op& op) {
    const auto& q = op.ip;
    const ConvGeom g{q[0], q[3], q[1], q[2], int(q[15]), int(q[7]), int(q[8]), int(q[9]), int(q[10]),
                     int(q[11]), int(q[12]), int(q[13]), int(q[14]), q[16], q[17]};
    const int64_t O = q[4];
    float* y = p.buf(op.out[0]);
    const float* x = p.buf(op.in[0]);
    const KernelDesc& k = current_kernel();
    // bias, residual and activation, each rounded as the separate vector ops would be: applied
    // in registers by kernels that can, else by a pass over the output below
    const VecEpilogue ve{y, O, op.bias >= 0 ? p.buf(op.bias) : nullptr, op.res >= 0 ? p.buf(op.res) : nullptr, p.vec_prec(),
                         op.act, op.fp.size() > 0 ? op.fp[0] : 0.0f, op.fp.size() > 1 ? op.fp[1] : 0.0f,
                         k.simd() ? avx2::epilogue_row : epilogue_row};  // every SIMD kernel's CPU has AVX2 + F16C
    const bool epi = ve.bias || ve.res || ve.act;
    if (op.sub == 1) {  // depthwise: one-element blocks (see dwconv_nhwc)
        const bool quant = p.has_format() && op.ip.size() > 18 && op.ip[18];
        const bool kq = quant && k.dwconv && kernel_quantizes_elements(p.format());  // the kernel quantizes x itself
        const float* xin = x;
        if (quant && !kq) {
            const int64_t n = g.N * g.H * g.W * g.C;
            if (p.scratch().size() < size_t(n)) p.scratch().resize(size_t(n));  // kept across runs
            fake_quantize_elements(x, n, p.format(), p.seed(), p.scratch().data());
            xin = p.scratch().data();
        }
        if (k.dwconv) {  // the kernel's depthwise loop, epilogue applied in registers
            const ElemFix fix{x, &p.format(), p.seed(), 0};
            const DwArgs da{xin, p.buf(op.wf), y, g.N, g.C, g.H, g.W, g.OH, g.OW, int(q[5]), int(q[6]),
                            g.sh, g.sw, g.pt, g.pl, g.dh, g.dw, epi ? &ve : nullptr,
                            kq ? &p.format() : nullptr, fix_element, &fix};
            k.dwconv(da);
            return;
        }
        dwconv_nhwc(xin, p.buf(op.wf), g, int(q[5]), int(q[6]), y);
    } else if (op.w) {
        if (k.fused_epilogue && epi) {  // applied to each tile in registers
            conv2d_impl(x, p.format(), p.seed(), *op.w, g, nullptr, y, true, &ve);
            return;
        }
        conv2d_impl(x, p.format(), p.seed(), *op.w, g, nullptr, y, true);
    } else {
        conv2d_fp32_nhwc(x, p.buf(op.wf), g, O, int(q[5]), int(q[6]), y);
    }
    if (!epi) return;  // the matrix unit's fp32 output goes on as it is
    const int64_t rows = g.N * g.OH * g.OW;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(rows * O))
    for (int64_t i = 0; i < rows; ++i) ve.rows(y + i * O, 1, int(O), O);
}

BFP_REGISTER_OP(kOpConv, validate_conv, exec_conv);

}  // namespace bfp

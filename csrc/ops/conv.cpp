// Matrix ops: NHWC convolution and dense layers on the BFP core (or in fp32), depthwise
// convolutions on one-element blocks, each with its bias, residual Add and ReLU / Clip fused
// into the epilogue (rounded as the separate vector ops would be).
#include <algorithm>
#include <atomic>
#include <cmath>
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
// Checks a window's geometry (shared with pooling): sizes >= 0, kernel, strides and dilations in
// [1, 2^20], padding in [0, 2^20] -- the kernels take them as int.
void check_window(const ConvGeometry& g, OpCheck& c) {
    constexpr int64_t kBig = int64_t(1) << 20;
    for (int64_t v : {g.batch, g.channels, g.height, g.width, g.out_channels, g.out_h, g.out_w}) {
        if (v < 0) c.fail("negative size");
        if (v > (int64_t(1) << 40)) c.fail("size out of range");
    }
    c.range(g.kernel_h, 1, kBig, "kernel height");
    c.range(g.kernel_w, 1, kBig, "kernel width");
    c.range(g.stride_h, 1, kBig, "stride");
    c.range(g.stride_w, 1, kBig, "stride");
    c.range(g.dilation_h, 1, kBig, "dilation");
    c.range(g.dilation_w, 1, kBig, "dilation");
    for (int64_t v : {g.pad_top, g.pad_left, g.pad_bottom, g.pad_right})
        if (v < 0 || v > kBig) c.fail("padding out of range");
}

static void check_quantize_output(const Op& op, OpCheck& c) {
    const ConvParams& q = op.get<ConvParams>();
    c.range(q.quantize_output, 0, 256, "quantize_output");
    if (q.quantize_output && (!q.depthwise || !q.quantize_input || op.res >= 0 || op.out.size() != 1))
        c.fail("quantize_output is for depthwise convs with quantize_input, one output and no residual");
    if (q.quantize_output_elements && (!op.w || q.depthwise || q.expand_channels || op.res >= 0 || op.out.size() != 1))
        c.fail("quantize_output_elements is for BFP convs with one output and no residual");
}

// A depthwise conv with a fused 1x1 expansion (ConvParams::expand_channels): the expansion's
// input, BFP weights (Op::w) and bias (a second input) in place of the depthwise conv's input.
static void validate_expand_dw(const Program& p, const Op& op, OpCheck& c) {
    const ConvParams& q = op.get<ConvParams>();
    const ConvGeometry& g = q.geometry;
    if (!q.depthwise || !q.quantize_input) c.fail("expand_channels is for depthwise convs with quantize_input");
    if (!p.has_format()) c.fail("a fused expansion in a program without format");
    c.range(q.expand_channels, 1, int64_t(1) << 30, "expand_channels");
    if (q.share_input) c.fail("share_input is for convs with BFP weights");
    check_quantize_output(op, c);
    if (op.res >= 0) c.fail("a depthwise conv with a fused expansion takes no residual");
    if (q.activation < 0 || q.activation >= kActCount || q.expand_activation < 0 || q.expand_activation >= kActCount)
        c.fail("unknown conv activation");
    if (op.in.size() > 2) c.fail("a fused expansion takes its input and at most a bias");
    check_window(g, c);
    const int64_t N = g.batch, H = g.height, W = g.width, C = g.channels;
    if (g.out_channels != C || g.groups != C) c.fail("depthwise conv needs groups == channels == outputs");
    const int64_t OH = (H + g.pad_top + g.pad_bottom - g.dilation_h * (g.kernel_h - 1) - 1) / g.stride_h + 1;
    const int64_t OW = (W + g.pad_left + g.pad_right - g.dilation_w * (g.kernel_w - 1) - 1) / g.stride_w + 1;
    if (OH != g.out_h || OW != g.out_w || OH < 1 || OW < 1) c.fail("output size does not match the geometry");
    if (!op.w) c.fail("a fused expansion needs its BFP weights (w)");
    const Operand& w = *op.w;
    if (w.R != C || w.K != q.expand_channels || w.kh != 1 || w.kw != 1 || w.groups != 1)
        c.fail("the packed weight does not match the fused expansion (1x1, expand_channels -> channels)");
    c.fits(op.in[0], c.mul(c.mul(N, H), c.mul(W, q.expand_channels)), "input");
    if (op.in.size() == 2) c.fits(op.in[1], C, "expansion bias");
    c.fits(op.out[0], c.mul(c.mul(N, OH), c.mul(OW, C)), "output");
    if (op.bias >= 0) c.fits(op.bias, C, "bias");
    c.fits(op.wf, c.mul(c.mul(g.kernel_h, g.kernel_w), C), "depthwise weight");
}

static void validate_conv(const Program& p, const Op& op, OpCheck& c) {
    const ConvParams& q = op.get<ConvParams>();
    const ConvGeometry& g = q.geometry;
    c.ins(1);
    if (q.expand_channels) return validate_expand_dw(p, op, c);
    if (!op.w && op.wf < 0) c.fail("conv without weights");
    if (op.w && !p.has_format()) c.fail("BFP conv in a program without format");
    c.range(q.share_input, 0, 256, "share_input");
    if (q.share_input && (!op.w || q.depthwise)) c.fail("share_input is for convs with BFP weights");
    check_quantize_output(op, c);
    if (q.input_nchw && (!op.w || q.depthwise || q.share_input || g.groups != 1 || g.channels > 4))
        c.fail("input_nchw is for BFP convs of at most 4 channels without groups or a shared input");
    if (q.activation < 0 || q.activation >= kActCount)
        c.fail("unknown conv activation " + std::to_string(q.activation));
    check_window(g, c);
    const int64_t N = g.batch, H = g.height, W = g.width, C = g.channels, O = g.out_channels;
    const int64_t kh = g.kernel_h, kw = g.kernel_w, G = g.groups;
    c.range(G, 1, int64_t(1) << 30, "groups");
    if (C % G || O % G) c.fail("groups must divide the channels");
    const int64_t OH = (H + g.pad_top + g.pad_bottom - g.dilation_h * (kh - 1) - 1) / g.stride_h + 1;
    const int64_t OW = (W + g.pad_left + g.pad_right - g.dilation_w * (kw - 1) - 1) / g.stride_w + 1;
    if (OH != g.out_h || OW != g.out_w || OH < 1 || OW < 1) c.fail("output size does not match the geometry");
    c.fits(op.in[0], c.mul(c.mul(N, H), c.mul(W, C)), "input");
    const int64_t outn = c.mul(c.mul(N, OH), c.mul(OW, O));
    c.fits(op.out[0], outn, "output");
    if (op.bias >= 0) c.fits(op.bias, O, "bias");
    if (op.res >= 0) c.fits(op.res, outn, "residual");
    if (q.depthwise) {
        if (C != O || G != C) c.fail("depthwise conv needs groups == channels == outputs");
        if (op.w) c.fail("a depthwise conv takes its weights as floats (wf)");
        c.fits(op.wf, c.mul(c.mul(kh, kw), C), "depthwise weight");
    } else if (op.w) {
        const Operand& w = *op.w;
        if (w.R != O || w.K * G != C || w.kh != kh || w.kw != kw || w.groups != G)
            c.fail("the packed weight does not match the conv's geometry");
    } else {
        if (q.quantize_input) c.fail("quantize_input is for depthwise convs");
        c.fits(op.wf, c.mul(c.mul(c.mul(kh, kw), C / G), O), "weight");
    }
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

void set_elem_quant(VecEpilogue& e, const FmtParams& f) {
    e.fq = &f;
    e.fqc = elem_quant(f);
    e.fq_fast = false;
    if (e.vp != kVecFp16 || !e.bias || e.res || e.act != 2 || !(e.lo <= e.hi) || e.fqc.path != kElemEven) return;
    if (!std::isfinite(e.lo) || !std::isfinite(e.hi)) return;
    const float lo = R<kVecFp16>(e.lo), hi = R<kVecFp16>(e.hi);  // the bounds as the clip rounds them
    const float m = std::fabs(lo) > std::fabs(hi) ? std::fabs(lo) : std::fabs(hi);
    if (!std::isfinite(m)) return;
    uint32_t mb;
    std::memcpy(&mb, &m, 4);
    const auto in = [&](uint32_t bits) { return uint32_t((bits << 1) - e.fqc.lo2) < e.fqc.span2; };
    e.fq_fast = m == 0.0f || (in(mb) && in(0x33800000u));  // 2^-24: fp16's least magnitude
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

// The depthwise conv of a fused expansion (ConvParams::expand_channels): each work item of the
// kernel's depthwise loop gets the expansion's output for its input rows and channel blocks
// from the expansion's GEMM (PointwiseRows), epilogue and element quantization applied in
// registers, written into its tile (through a buffer where the tile's channel blocks do not
// start at a GEMM panel or pass the channels) -- the expanded activation (4.8 MB at 112^2 x 96
// channels in EfficientNet-Lite0) is never stored whole, nor read back.
struct ExpandTile {
    const PointwiseRows* pw;
    const VecEpilogue* epi;  // the expansion's, with the element quantization (fq)
    int64_t H, W, C;
};

// The expansion's output rows [lo, hi] of image n, channel blocks [cb0, cb1), into the tile
// (DwArgs::produce), through the epilogue ve
static void expand_rows(const ExpandTile& e, const VecEpilogue& ve, int64_t n, int64_t lo, int64_t hi, int64_t cb0,
                        int64_t cb1, int64_t plane, float* tile) {
    const int64_t NR = e.pw->nr();
    // Channel blocks from a panel boundary on, none past the channels: the GEMM's epilogue
    // writes the tile itself, each 16 columns into their block's plane (VecEpilogue::cbs), in
    // one call for all the rows
    if (cb0 * 16 % NR == 0 && cb1 * 16 <= e.C && !ve.res && e.pw->applies_epilogue()) {
        VecEpilogue vt = ve;
        vt.cbs = plane;
        e.pw->run((n * e.H + lo) * e.W, (hi + 1 - lo) * e.W, cb0 * 16, (cb1 - cb0) * 16, tile, 16, &vt);
        return;
    }
    // the GEMM's columns: whole panels around the tile's channel blocks
    const int64_t c0 = cb0 * 16 / NR * NR, c1 = std::min<int64_t>(e.C, (cb1 * 16 + NR - 1) / NR * NR), nc = c1 - c0;
    const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, e.W * nc));  // <= 64 KB a GEMM
    thread_local std::vector<float> buf;
    for (int64_t iy = lo; iy <= hi; iy += rows) {
        const int64_t np = std::min<int64_t>(rows, hi + 1 - iy) * e.W;
        buf.resize(size_t(np * nc));
        e.pw->run((n * e.H + iy) * e.W, np, c0, nc, buf.data(), nc, &ve);
        for (int64_t j = 0; j < np; ++j) {  // pixel j of these rows -> the tile (W pixels a row, 16 floats each)
            const float* src = buf.data() + j * nc - c0;
            float* dst = tile + ((iy - lo) * e.W + j) * 16;
            for (int64_t cb = cb0; cb < cb1; ++cb) {
                float* d = dst + (cb - cb0) * plane;
                const float* sc = src + cb * 16;
                const int64_t len = std::min<int64_t>(16, e.C - cb * 16);
                if (len == 16) {
                    std::memcpy(d, sc, 64);
                } else {
                    std::memcpy(d, sc, size_t(len) * 4);
                    std::memset(d + len, 0, size_t(16 - len) * 4);  // lanes past C: +0
                }
            }
        }
    }
}

static void produce_expanded(const void* ctx, int64_t n, int64_t lo, int64_t hi, int64_t cb0, int64_t cb1,
                             int64_t plane, float* tile, ElemRange* range) {
    const ExpandTile& e = *static_cast<const ExpandTile*>(ctx);
    VecEpilogue ve = *e.epi;
    ve.range = range;  // (set untracked by the epilogue where an output took the scalar path)
    expand_rows(e, ve, n, lo, hi, cb0, cb1, plane, tile);
    if (!range) return;
    // the bound of fp16 outputs (VecEpilogue::fp16_rounded); nothing is claimed for the others
    if (ve.fp16_rounded()) range->merge(VecEpilogue::fp16_bounds());
    else range->set_untracked();
}

// The epilogue as a pass over rows already stored (n rows of O at y): kernels that do not
// apply it in registers
static void epilogue_pass(const VecEpilogue& ve, float* y, int64_t n, int64_t O) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(n * O))
    for (int64_t i = 0; i < n; ++i) ve.rows(y + i * O, 1, int(O), O);
}

// Whether a linked pair (ConvParams::quantize_output_elements, Op::elems_to_reader and
// elems_from_producer) moves the depthwise conv's element quantization into its producer's
// epilogue: kernels whose depthwise loop takes a quantized input, with a format their element
// quantizer takes. Both ops ask it in the same run (one kernel), so they agree.
static bool elems_in_producer(const Program& p, const KernelDesc& k) {
    return k.dw_quantized_input && k.dwconv && p.has_format() && kernel_quantizes_elements(p.format());
}

// The kernel's depthwise loop; with ConvParams::quantize_output (linked to its reader) and a
// path that quantizes its input, the reading 1x1 conv's operand is made into that conv's slot
// instead of the output (a format, weights or kernel its row quantizer does not take: the output)
static void run_dwconv(Program& p, const Op& op, const KernelDesc& k, DwArgs& da) {
    const ConvParams& q = op.get<ConvParams>();
    QuantRowsArgs oq{};
    ConvActs* slot = nullptr;
    std::atomic<bool> negative{false};
    if (q.quantize_output && op.reader_w && da.fq) {  // (validated: no residual)
        ConvActs* A = p.shared_acts(q.quantize_output);
        if (begin_pointwise_acts(*A, da.out, da.N, da.OH, da.OW, p.format(), p.seed(), *op.reader_w, &oq, &da.oq_fn)) {
            da.oq = &oq;
            if (k.rows16) da.oq_neg = &negative;
            slot = A;
        }
    }
    k.dwconv(da);
    if (slot) end_pointwise_acts(*slot, negative.load());
}

static void exec_conv(Program& p, const Op& op) {
    const ConvParams& q = op.get<ConvParams>();
    const ConvGeom g = q.geometry.geom();
    const int64_t O = q.geometry.out_channels;
    const int kh = int(q.geometry.kernel_h), kw = int(q.geometry.kernel_w);
    float* y = p.buf(op.out[0]);
    const float* x = p.buf(op.in[0]);
    const KernelDesc& k = current_kernel();
    // quantize_output: the slot holds this conv's output after it only if run_dwconv makes it
    // now (else it may hold an operand of an earlier reader, made from the same buffer)
    if (q.quantize_output) p.shared_acts(q.quantize_output)->valid = false;
    // bias, residual and activation, each rounded as the separate vector ops would be: applied
    // in registers by kernels that can, else by a pass over the output below
    // Clip is min(max(x, lo), hi) (ONNX, and the unary op): hi everywhere when lo > hi, which the
    // epilogues' v < lo ? lo : (v > hi ? hi : v) gives with lo = hi
    const float clip_lo = q.clip_lo > q.clip_hi ? q.clip_hi : q.clip_lo;
    VecEpilogue ve{y, O, op.bias >= 0 ? p.buf(op.bias) : nullptr, op.res >= 0 ? p.buf(op.res) : nullptr,
                   p.vec_prec(), int(q.activation), clip_lo, q.clip_hi,
                   k.simd() ? avx2::epilogue_row : epilogue_row};  // every SIMD kernel's CPU has AVX2 + F16C
    // the depthwise conv reading the output quantizes it as one-element blocks: here, last in
    // the epilogue (in registers on kernels that fuse it; VecEpilogue::rows elsewhere)
    if (op.elems_to_reader && elems_in_producer(p, k)) set_elem_quant(ve, p.format());
    const bool epi = ve.any();
    // A residual add in place (the lowering gives the output the residual's buffer when this op
    // is the residual's last reader): the BFP GEMM's fused epilogue reads each residual value
    // before writing that output value; every other path writes raw values first, so it gets a
    // copy of the residual.
    std::vector<float> res_copy;
    if (ve.res && ve.res == y && !(op.w && !q.depthwise && k.fused_epilogue)) {
        res_copy.assign(ve.res, ve.res + g.N * g.OH * g.OW * O);
        ve.res = res_copy.data();
    }
    if (q.input_nchw) {  // an NCHW stem input: the stem path reads it as it is
        const bool fused = k.fused_epilogue && epi;
        if (conv2d_stem_nchw(x, p.format(), *op.w, g, y, fused ? &ve : nullptr)) {
            p.note_stem();
            if (!fused && epi) epilogue_pass(ve, y, g.N * g.OH * g.OW, O);
            return;
        }
        // elsewhere: a channels-last copy (this thread's buffer), then the usual path
        thread_local FloatVec t_nhwc;
        const int64_t HW = g.H * g.W;
        if (t_nhwc.size() < size_t(g.N * HW * g.C)) t_nhwc.resize(size_t(g.N * HW * g.C));
        for (int64_t n = 0; n < g.N; ++n)
            for (int64_t c = 0; c < g.C; ++c)
                for (int64_t i = 0; i < HW; ++i) t_nhwc[size_t((n * HW + i) * g.C + c)] = x[(n * g.C + c) * HW + i];
        x = t_nhwc.data();
    }
    bool input_quantized = false;  // the depthwise conv's input comes quantized (a fused expansion's epilogue)
    if (q.depthwise && q.expand_channels) {  // a fused expansion: its output made where it is read
        const FmtParams& f = p.format();
        const int64_t npix = g.N * g.H * g.W;
        const float elo = q.expand_clip_lo > q.expand_clip_hi ? q.expand_clip_hi : q.expand_clip_lo;
        VecEpilogue ve1{nullptr, O, op.in.size() > 1 ? p.buf(op.in[1]) : nullptr, nullptr, p.vec_prec(),
                        int(q.expand_activation), elo, q.expand_clip_hi, ve.row};
        thread_local PointwiseRows pw;  // the expansion's quantized input, kept across calls
        if (k.dwconv && k.fused_epilogue && kernel_quantizes_elements(f) && pw.make(x, npix, f, p.seed(), *op.w)) {
            set_elem_quant(ve1, f);
            const ExpandTile et{&pw, &ve1, g.H, g.W, g.C};
            DwArgs da{nullptr, p.buf(op.wf), y, g.N, g.C, g.H, g.W, g.OH, g.OW, kh, kw, g.sh, g.sw, g.pt, g.pl,
                      g.dh, g.dw, epi ? &ve : nullptr, &f, fix_element, nullptr};
            da.produce = produce_expanded;
            da.produce_ctx = &et;
            run_dwconv(p, op, k, da);
            return;
        }
        // elsewhere (a kernel without that path, a weight packed for another): the expansion
        // whole into a buffer, then the depthwise conv on it below -- the same bits. A kernel
        // that applies the epilogue in registers quantizes the depthwise conv's input there too.
        thread_local FloatVec t_expanded;
        if (t_expanded.size() < size_t(npix * O)) t_expanded.resize(size_t(npix * O));
        float* t = t_expanded.data();  // (this thread's buffer: the OpenMP team below gets the pointer)
        ve1.y = t;
        if (k.fused_epilogue && p.has_format() && q.quantize_input && kernel_quantizes_elements(f)) {
            set_elem_quant(ve1, f);
            input_quantized = true;
        }
        const ConvGeom ge{g.N, q.expand_channels, g.H, g.W, 1, 1, 1, 0, 0, 0, 0, 1, 1, g.H, g.W};
        const bool fused1 = k.fused_epilogue && ve1.any();
        conv2d_impl(x, f, p.seed(), *op.w, ge, nullptr, t, true, fused1 ? &ve1 : nullptr);
        if (!fused1 && ve1.any()) epilogue_pass(ve1, t, npix, O);
        x = t;
    }
    if (q.depthwise) {  // one-element blocks (see dwconv_nhwc)
        const bool quant = p.has_format() && q.quantize_input && !input_quantized;
        const bool kq = quant && k.dwconv && kernel_quantizes_elements(p.format());  // the kernel quantizes x itself
        // ... or its producer's epilogue has (Op::elems_from_producer): the kernel reads it as it is
        const bool pre = kq && op.elems_from_producer && elems_in_producer(p, k);
        const float* xin = x;
        if (quant && !kq) {
            const int64_t n = g.N * g.H * g.W * g.C;
            if (p.scratch().size() < size_t(n)) p.scratch().resize(size_t(n));  // kept across runs
            fake_quantize_elements(x, n, p.format(), p.seed(), p.scratch().data());
            xin = p.scratch().data();
        }
        if (k.dwconv) {  // the kernel's depthwise loop, epilogue applied in registers
            const ElemFix fix{x, &p.format(), p.seed(), 0};
            DwArgs da{xin, p.buf(op.wf), y, g.N, g.C, g.H, g.W, g.OH, g.OW, kh, kw,
                      g.sh, g.sw, g.pt, g.pl, g.dh, g.dw, epi ? &ve : nullptr,
                      kq ? &p.format() : nullptr, fix_element, &fix};
            da.x_quantized = pre;
            run_dwconv(p, op, k, da);
            return;
        }
        dwconv_nhwc(xin, p.buf(op.wf), g, kh, kw, y);
    } else if (op.w) {
        // an input read by several convs alike: quantized by the first, reused by the others
        ConvActs* share = q.share_input ? p.shared_acts(q.share_input) : nullptr;
        // the input's producer may have written only this conv's operand (quantize_output)
        const bool produced = op.input_from_producer && share && share->valid;
        const bool fused = k.fused_epilogue && epi;  // applied to each tile in registers
        const ConvRun run = conv2d_impl(x, p.format(), p.seed(), *op.w, g, nullptr, y, true, fused ? &ve : nullptr, share);
        if (produced && run != kConvReused)
            throw std::logic_error("op " + op.name + ": the operand its input's producer made does not fit it");
        if (run == kConvReused) p.note_reused();
        if (run == kConvStem) p.note_stem();
        if (fused) return;
    } else {
        conv2d_fp32_nhwc(x, p.buf(op.wf), g, O, kh, kw, y);
    }
    if (epi) epilogue_pass(ve, y, g.N * g.OH * g.OW, O);  // else the matrix unit's fp32 output goes on as it is
}

BFP_REGISTER_OP(kOpConv, validate_conv, exec_conv);

}  // namespace bfp

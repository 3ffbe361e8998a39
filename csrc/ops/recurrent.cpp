// Recurrent ops: one direction of an ONNX LSTM or GRU over a whole sequence, the time loop in
// here. The input projection x_t W^T (+ Wb) of every step is a dense layer the lowering emits
// before (one GEMM over all steps); each step multiplies the previous h by the recurrence weight
// on the BFP datapath (h quantized as an activation, the weight packed once) and runs the gate
// arithmetic as the separate vector ops would, every result rounded to the vector precision
// (docs/numerics.md#recurrent-cells; bfpaccel.reference.rnn is the same computation in numpy).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

// ---------------------------------------------------------------- activations
// The activation functions in fp32 (ONNX's definitions; exp, tanh and log from the C library,
// as the elementwise ops); the caller rounds the result.
static inline float act_f32(int k, float x, float a, float b) {
    switch (k) {
        case kRnnSigmoid: return 1.0f / (1.0f + std::exp(-x));
        case kRnnTanh: return std::tanh(x);
        case kRnnRelu: return x > 0.0f ? x : (x != x ? x : 0.0f);
        case kRnnHardSigmoid: return x != x ? x : std::max(0.0f, std::min(1.0f, a * x + b));
        case kRnnLeakyRelu: return x >= 0.0f ? x : x * a;
        case kRnnAffine: return a * x + b;
        case kRnnThresholdedRelu: return x > a ? x : 0.0f;
        case kRnnScaledTanh: return a * std::tanh(b * x);
        case kRnnElu: return x >= 0.0f ? x : a * (std::exp(x) - 1.0f);
        case kRnnSoftsign: return x / (1.0f + std::fabs(x));
        case kRnnSoftplus: return std::log(1.0f + std::exp(x));
        default: return x;
    }
}

// fp16 <-> fp32 for the lookup tables below (exact on values that fp16 holds)
static inline uint32_t f16_bits(float x) {
    const uint32_t b = f2u(x), s = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) return s | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
    if (a >= 0x38800000u) return s | (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3ffu);
    return s | uint32_t(u2f(a) * 16777216.0f);  // subnormal: a multiple of 2^-24
}

static inline float f16_value(uint32_t u) {
    const uint32_t s = u & 0x8000u, e = (u >> 10) & 0x1fu, m = u & 0x3ffu;
    float v;
    if (e == 0) v = float(m) * (1.0f / 16777216.0f);
    else if (e == 31) v = m ? std::nanf("") : INFINITY;
    else v = std::ldexp(float(1024u + m), int(e) - 25);
    return s ? -v : v;
}

// At fp16 / bf16 every input of an activation is itself a vector op's rounded result, one of
// 65536 values: the sigmoid and tanh are read from a table of their rounded results (as an
// NPU's activation unit does), the same bits as computing them.
struct ActTable {
    std::vector<float> v;
    std::once_flag once;
};

template <int VP>
static const float* act_table(int k) {
    static ActTable tables[2];
    ActTable& t = tables[k == kRnnTanh ? 1 : 0];
    std::call_once(t.once, [&] {
        t.v.resize(65536);
        for (uint32_t u = 0; u < 65536; ++u) {
            const float x = VP == kVecFp16 ? f16_value(u) : u2f(u << 16);
            t.v[u] = R<VP>(act_f32(k, x, 0.0f, 0.0f));
        }
    });
    return t.v.data();
}

// y[j] = R(f(x[j])), j < n
template <int VP>
static void activate(int k, float a, float b, const float* x, float* y, int64_t n) {
    if constexpr (VP != kVecFp32) {
        if (k == kRnnSigmoid || k == kRnnTanh) {
            const float* tab = act_table<VP>(k);
            for (int64_t j = 0; j < n; ++j)
                y[j] = tab[VP == kVecFp16 ? f16_bits(x[j]) : (f2u(x[j]) >> 16)];
            return;
        }
    }
    for (int64_t j = 0; j < n; ++j) y[j] = R<VP>(act_f32(k, x[j], a, b));
}

// ---------------------------------------------------------------- the recurrence's products
// out[B][rows] = h[B][H] x w^T: on the BFP datapath (a 1x1 convolution over B pixels: h
// quantized per row along H, as a dense layer's input), or in fp32 (w [H][ld], columns
// [c0, c0 + rows), sequential sums over H, a multiply and an add per term).
static void recur_product(Program& p, const Operand* w, const float* wf, int64_t ld, int64_t c0, int64_t rows,
                          const float* h, int64_t B, int64_t H, float* out) {
    if (w) {
        ConvGeom g{B, H, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
        conv2d_impl(h, p.format(), p.seed(), const_cast<Operand&>(*w), g, nullptr, out, true);
        return;
    }
    for (int64_t b = 0; b < B; ++b) {
        float* o = out + b * rows;
        for (int64_t r = 0; r < rows; ++r) o[r] = 0.0f;
        for (int64_t k = 0; k < H; ++k) {
            const float hv = h[b * H + k];
            const float* wr = wf + k * ld + c0;
            for (int64_t r = 0; r < rows; ++r) o[r] = o[r] + hv * wr[r];
        }
    }
}

// ---------------------------------------------------------------- validation
static void check_operand(const Operand* w, int64_t rows, int64_t H, OpCheck& c, const char* what) {
    if (!w) c.fail(std::string("missing ") + what);
    if (w->role != "convw" || w->R != rows || w->K != H || w->kh != 1 || w->kw != 1 || w->groups != 1)
        c.fail(std::string(what) + " does not match the op (needs a 1x1 convw operand of " + std::to_string(rows) +
               " rows and K = " + std::to_string(H) + ")");
}

static void validate_recurrent(const Program& p, const Op& op, OpCheck& c) {
    const RecurrentParams& q = op.get<RecurrentParams>();
    if (q.cell < 0 || q.cell >= kCellCount) c.fail("unknown recurrent cell " + std::to_string(q.cell));
    const bool lstm = q.cell == kCellLstm;
    const int64_t G = lstm ? 4 : 3, nact = lstm ? 3 : 2;
    c.range(q.seq_len, 0, int64_t(1) << 30, "seq_len");
    c.range(q.batch, 0, int64_t(1) << 30, "batch");
    c.range(q.hidden, 1, int64_t(1) << 24, "hidden");
    const int64_t T = q.seq_len, B = q.batch, H = q.hidden, GH = c.mul(G, H);
    c.entries(q.activations.size(), size_t(nact), "activations");
    c.entries(q.alpha.size(), size_t(nact), "alpha");
    c.entries(q.beta.size(), size_t(nact), "beta");
    for (RnnActivation a : q.activations)
        if (a < 0 || a >= kRnnActCount) c.fail("unknown activation " + std::to_string(a));
    if (!q.recurrence_bias.empty()) c.entries(q.recurrence_bias.size(), size_t(GH), "recurrence_bias");
    if (!q.peephole.empty()) {
        if (!lstm) c.fail("a GRU has no peepholes");
        c.entries(q.peephole.size(), size_t(3 * H), "peephole");
    }
    if (q.input_forget && !lstm) c.fail("input_forget is an LSTM attribute");
    if (q.linear_before_reset && lstm) c.fail("linear_before_reset is a GRU attribute");
    if (q.has_clip && !(q.clip >= 0.0f)) c.fail("clip must be >= 0");
    if (!q.lengths.empty()) {
        c.entries(q.lengths.size(), size_t(B), "lengths");
        for (int64_t L : q.lengths) c.range(L, 0, T, "a sequence length");
    }
    // buffers: in = [xg, initial_h?, initial_c?], out = [Y?, Y_h?, Y_c?]
    const size_t nin = 1 + size_t(q.has_initial_h) + size_t(q.has_initial_c);
    const size_t nout = size_t(q.has_y) + size_t(q.has_y_h) + size_t(q.has_y_c);
    if (op.in.size() != nin) c.fail("takes " + std::to_string(nin) + " inputs, got " + std::to_string(op.in.size()));
    if (op.out.size() != nout || nout == 0)
        c.fail("writes " + std::to_string(nout) + " outputs (at least one), got " + std::to_string(op.out.size()));
    if ((q.has_initial_c || q.has_y_c) && !lstm) c.fail("a GRU has no cell state");
    for (int64_t v : {q.xg_offset, q.xg_step, q.xg_batch, q.y_offset, q.y_step, q.y_batch, q.state_offset,
                      q.state_batch})
        if (v < 0) c.fail("negative offset or stride");
    // the last element each strided view touches, +1
    auto extent = [&](int64_t off, int64_t step, int64_t bstride, int64_t len) {
        if (T == 0 || B == 0) return int64_t(0);
        return off + c.mul(T - 1, step) + c.mul(B - 1, bstride) + len;
    };
    auto extent_state = [&](int64_t len) { return B == 0 ? 0 : q.state_offset + c.mul(B - 1, q.state_batch) + len; };
    c.fits(op.in[0], extent(q.xg_offset, q.xg_step, q.xg_batch, GH), "input projection");
    size_t k = 1;
    if (q.has_initial_h) c.fits(op.in[k++], extent_state(H), "initial_h");
    if (q.has_initial_c) c.fits(op.in[k++], extent_state(H), "initial_c");
    k = 0;
    if (q.has_y) c.fits(op.out[k++], extent(q.y_offset, q.y_step, q.y_batch, H), "Y");
    if (q.has_y_h) c.fits(op.out[k++], extent_state(H), "Y_h");
    if (q.has_y_c) c.fits(op.out[k++], extent_state(H), "Y_c");
    // weights
    const bool split = !lstm && !q.linear_before_reset;  // GRU: the h rows multiply r * h
    if (p.has_format()) {
        if (!q.recurrence_f32.empty()) c.fail("fp32 recurrence weights in a program with a block format");
        check_operand(q.recurrence.get(), split ? 2 * H : GH, H, c, "recurrence weight");
        if (split) check_operand(q.recurrence_h.get(), H, H, c, "recurrence_h weight");
        else if (q.recurrence_h) c.fail("recurrence_h is for a GRU without linear_before_reset");
        if (!q.recurrence->f.block || q.recurrence->f.block != p.format().block)
            c.fail("the recurrence weight's block size differs from the program's format");
    } else {
        if (q.recurrence || q.recurrence_h) c.fail("BFP recurrence weights in a program without format");
        c.entries(q.recurrence_f32.size(), size_t(c.mul(H, GH)), "recurrence_f32");
    }
}

// ---------------------------------------------------------------- execution
template <int VP>
static void run_recurrent(Program& p, const Op& op) {
    const RecurrentParams& q = op.get<RecurrentParams>();
    const bool lstm = q.cell == kCellLstm, lbr = q.linear_before_reset;
    const int64_t T = q.seq_len, B = q.batch, H = q.hidden, G = lstm ? 4 : 3, GH = G * H;
    const float* xg = p.buf(op.in[0]);
    size_t k = 1;
    const float* h0 = q.has_initial_h ? p.buf(op.in[k++]) : nullptr;
    const float* c0 = q.has_initial_c ? p.buf(op.in[k++]) : nullptr;
    k = 0;
    float* Y = q.has_y ? p.buf(op.out[k++]) : nullptr;
    float* Yh = q.has_y_h ? p.buf(op.out[k++]) : nullptr;
    float* Yc = q.has_y_c ? p.buf(op.out[k++]) : nullptr;
    const Operand* w = q.recurrence.get();
    const Operand* wh = q.recurrence_h.get();
    const float* wf = q.recurrence_f32.empty() ? nullptr : q.recurrence_f32.data();
    const float* rb = q.recurrence_bias.empty() ? nullptr : q.recurrence_bias.data();
    const float* P = q.peephole.empty() ? nullptr : q.peephole.data();
    const int fk = q.activations[0], gk = q.activations[1], hk = lstm ? q.activations[2] : 0;
    const float fa = q.alpha[0], fb = q.beta[0], ga = q.alpha[1], gb = q.beta[1];
    const float ha = lstm ? q.alpha[2] : 0.0f, hb = lstm ? q.beta[2] : 0.0f;
    const float clip = q.clip;
    auto len = [&](int64_t b) { return q.lengths.empty() ? T : q.lengths[size_t(b)]; };

    // state and scratch: h, c [B][H]; the recurrence's product [B][GH]; gates [GH]
    const bool split = !lstm && !lbr;
    const int64_t grows = split ? 2 * H : GH;
    const size_t nbh = size_t(B * H), ngh = size_t(B * grows), nsplit = split ? nbh : 0;
    std::vector<float> h(nbh, 0.0f), c(lstm ? nbh : 0, 0.0f), gh(ngh), a(static_cast<size_t>(GH));
    std::vector<float> t1(static_cast<size_t>(H)), rh(nsplit, 0.0f), ghh(nsplit);
    std::vector<float> zr(2 * nsplit);  // GRU split: z, r per row (before the second product)
    for (int64_t b = 0; b < B; ++b) {
        const int64_t so = q.state_offset + b * q.state_batch;
        if (h0) std::memcpy(&h[size_t(b * H)], h0 + so, sizeof(float) * size_t(H));
        if (c0) std::memcpy(&c[size_t(b * H)], c0 + so, sizeof(float) * size_t(H));
        if (Y)  // steps past the entry's length output zeros
            for (int64_t t = len(b); t < T; ++t)
                std::memset(Y + q.y_offset + t * q.y_step + b * q.y_batch, 0, sizeof(float) * size_t(H));
    }
    auto clipped = [&](float* v, int64_t n) {
        if (!q.has_clip) return;
        for (int64_t j = 0; j < n; ++j) v[j] = v[j] != v[j] ? v[j] : R<VP>(std::min(std::max(v[j], -clip), clip));
    };

    for (int64_t s = 0; s < T; ++s) {
        bool any = false;
        for (int64_t b = 0; b < B; ++b) any |= len(b) > s;
        if (!any) break;
        recur_product(p, w, wf, GH, 0, grows, h.data(), B, H, gh.data());
        for (int64_t b = 0; b < B; ++b) {
            if (len(b) <= s) continue;  // past its length: the state stays
            const int64_t t = q.reverse ? len(b) - 1 - s : s;
            const float* x = xg + q.xg_offset + t * q.xg_step + b * q.xg_batch;
            const float* g = gh.data() + b * grows;
            float* hb_ = h.data() + b * H;
            const int64_t na = split ? 2 * H : GH;  // gates ready after the first product
            if (rb) for (int64_t j = 0; j < na; ++j) a[j] = R<VP>(x[j] + R<VP>(g[j] + rb[j]));
            else for (int64_t j = 0; j < na; ++j) a[j] = R<VP>(x[j] + g[j]);
            if (lstm) {
                float* cb = c.data() + b * H;
                // each gate's input (with its peephole) is clipped just before its activation
                float *ai = a.data(), *ao = ai + H, *af = ai + 2 * H, *ac = ai + 3 * H;
                if (P) {
                    for (int64_t j = 0; j < H; ++j) ai[j] = R<VP>(ai[j] + R<VP>(P[j] * cb[j]));
                    if (!q.input_forget)
                        for (int64_t j = 0; j < H; ++j) af[j] = R<VP>(af[j] + R<VP>(P[2 * H + j] * cb[j]));
                }
                clipped(ai, H);
                activate<VP>(fk, fa, fb, ai, ai, H);  // i
                if (q.input_forget) {
                    for (int64_t j = 0; j < H; ++j) af[j] = R<VP>(1.0f - ai[j]);
                } else {
                    clipped(af, H);
                    activate<VP>(fk, fa, fb, af, af, H);
                }
                clipped(ac, H);
                activate<VP>(gk, ga, gb, ac, ac, H);  // g
                for (int64_t j = 0; j < H; ++j) cb[j] = R<VP>(R<VP>(af[j] * cb[j]) + R<VP>(ai[j] * ac[j]));
                if (P) for (int64_t j = 0; j < H; ++j) ao[j] = R<VP>(ao[j] + R<VP>(P[H + j] * cb[j]));
                clipped(ao, H);
                activate<VP>(fk, fa, fb, ao, ao, H);  // o
                activate<VP>(hk, ha, hb, cb, t1.data(), H);
                for (int64_t j = 0; j < H; ++j) hb_[j] = R<VP>(ao[j] * t1[j]);
            } else {
                clipped(a.data(), 2 * H);
                activate<VP>(fk, fa, fb, a.data(), a.data(), 2 * H);  // z, r
                if (split) {  // r * h goes through a second product
                    float* rr = rh.data() + b * H;
                    for (int64_t j = 0; j < H; ++j) rr[j] = R<VP>(a[size_t(H + j)] * hb_[j]);
                    std::memcpy(zr.data() + b * 2 * H, a.data(), sizeof(float) * size_t(2 * H));
                    continue;
                }
                const float *z = a.data(), *r = z + H;
                float* n = a.data() + 2 * H;
                if (rb) for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[2 * H + j] + R<VP>(r[j] * R<VP>(g[2 * H + j] + rb[2 * H + j])));
                else for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[2 * H + j] + R<VP>(r[j] * g[2 * H + j]));
                clipped(n, H);
                activate<VP>(gk, ga, gb, n, n, H);
                for (int64_t j = 0; j < H; ++j)
                    hb_[j] = R<VP>(R<VP>(R<VP>(1.0f - z[j]) * n[j]) + R<VP>(z[j] * hb_[j]));
            }
            if (Y) std::memcpy(Y + q.y_offset + t * q.y_step + b * q.y_batch, hb_, sizeof(float) * size_t(H));
        }
        if (!split) continue;
        // GRU without linear_before_reset: (r * h) R_h^T, then the h gate and the new state
        recur_product(p, wh, wf, GH, 2 * H, H, rh.data(), B, H, ghh.data());
        for (int64_t b = 0; b < B; ++b) {
            if (len(b) <= s) continue;
            const int64_t t = q.reverse ? len(b) - 1 - s : s;
            const float* x = xg + q.xg_offset + t * q.xg_step + b * q.xg_batch + 2 * H;
            const float* z = zr.data() + b * 2 * H;
            const float* g = ghh.data() + b * H;
            float* n = t1.data();
            float* hb_ = h.data() + b * H;
            if (rb) for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[j] + R<VP>(g[j] + rb[2 * H + j]));
            else for (int64_t j = 0; j < H; ++j) n[j] = R<VP>(x[j] + g[j]);
            clipped(n, H);
            activate<VP>(gk, ga, gb, n, n, H);
            for (int64_t j = 0; j < H; ++j) hb_[j] = R<VP>(R<VP>(R<VP>(1.0f - z[j]) * n[j]) + R<VP>(z[j] * hb_[j]));
            if (Y) std::memcpy(Y + q.y_offset + t * q.y_step + b * q.y_batch, hb_, sizeof(float) * size_t(H));
        }
    }
    // final states (an entry of length 0: zeros)
    for (int64_t b = 0; b < B; ++b) {
        const int64_t so = q.state_offset + b * q.state_batch;
        const bool ran = len(b) > 0;
        for (int64_t j = 0; j < H; ++j) {
            if (Yh) Yh[so + j] = ran ? h[size_t(b * H + j)] : 0.0f;
            if (Yc) Yc[so + j] = ran ? c[size_t(b * H + j)] : 0.0f;
        }
    }
}

static void exec_recurrent(Program& p, const Op& op) {
    with_vp(p.vec_prec(), [&](auto V) { run_recurrent<decltype(V)::value>(p, op); });
}

BFP_REGISTER_OP(kOpRecurrent, validate_recurrent, exec_recurrent);

}  // namespace bfp

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

#include "ops/rnn_cell.h"
#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

// ---------------------------------------------------------------- activation tables
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

template <int VP>
static Act make_act(int k, float a, float b) {
    const float* tab = nullptr;
    if constexpr (VP != kVecFp32)
        if (k == kRnnSigmoid || k == kRnnTanh) tab = act_table<VP>(k);
    return Act{k, a, b, tab};
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
// the portable build of a row's gate arithmetic (AVX2 CPUs run avx2::rnn_row, the same bits)
static void cell_row(int vp, int part, const RowCtx& r) {
    if (vp == kVecFp16) row_t<kVecFp16>(part, r);
    else if (vp == kVecBf16) row_t<kVecBf16>(part, r);
    else row_t<kVecFp32>(part, r);
}

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
    auto len = [&](int64_t b) { return q.lengths.empty() ? T : q.lengths[size_t(b)]; };

    // state and scratch: h, c [B][H]; the recurrence's product [B][rows]; gates
    const bool split = !lstm && !lbr;
    const int64_t grows = split ? 2 * H : GH;
    const size_t nbh = size_t(B * H), ngh = size_t(B * grows), nsplit = split ? nbh : 0;
    std::vector<float> h(nbh, 0.0f), c(lstm ? nbh : 0, 0.0f), gh(ngh), a(static_cast<size_t>(GH));
    std::vector<float> t1(static_cast<size_t>(H)), rh(nsplit, 0.0f), ghh(nsplit), zr(2 * nsplit);
    for (int64_t b = 0; b < B; ++b) {
        const int64_t so = q.state_offset + b * q.state_batch;
        if (h0) std::memcpy(&h[size_t(b * H)], h0 + so, sizeof(float) * size_t(H));
        if (c0) std::memcpy(&c[size_t(b * H)], c0 + so, sizeof(float) * size_t(H));
        if (Y)  // steps past the entry's length output zeros
            for (int64_t t = len(b); t < T; ++t)
                std::memset(Y + q.y_offset + t * q.y_step + b * q.y_batch, 0, sizeof(float) * size_t(H));
    }
    RowCtx r{};
    r.rb = rb;
    r.P = q.peephole.empty() ? nullptr : q.peephole.data();
    r.a = a.data();
    r.t1 = t1.data();
    r.H = H;
    r.input_forget = q.input_forget;
    r.has_clip = q.has_clip;
    r.clip = q.clip;
    r.f = make_act<VP>(q.activations[0], q.alpha[0], q.beta[0]);
    r.g_ = make_act<VP>(q.activations[1], q.alpha[1], q.beta[1]);
    if (lstm) r.h_ = make_act<VP>(q.activations[2], q.alpha[2], q.beta[2]);
    const int part = lstm ? kLstmRow : split ? kGruSplit1 : kGruRow;
    const int vp = p.vec_prec();
    const auto cell_row = current_kernel().simd() ? avx2::rnn_row : bfp::cell_row;  // their CPUs have AVX2
    auto row_time = [&](int64_t b, int64_t s) { return q.reverse ? len(b) - 1 - s : s; };
    auto store = [&](int64_t b, int64_t t) {
        if (Y) std::memcpy(Y + q.y_offset + t * q.y_step + b * q.y_batch, &h[size_t(b * H)], sizeof(float) * size_t(H));
    };

    for (int64_t s = 0; s < T; ++s) {
        bool any = false;
        for (int64_t b = 0; b < B; ++b) any |= len(b) > s;
        if (!any) break;
        recur_product(p, w, wf, GH, 0, grows, h.data(), B, H, gh.data());
        for (int64_t b = 0; b < B; ++b) {
            if (len(b) <= s) continue;  // past its length: the state stays
            const int64_t t = row_time(b, s);
            r.x = xg + q.xg_offset + t * q.xg_step + b * q.xg_batch;
            r.g = gh.data() + b * grows;
            r.h = h.data() + b * H;
            r.c = lstm ? c.data() + b * H : nullptr;
            r.zr = split ? zr.data() + b * 2 * H : nullptr;
            r.rh = split ? rh.data() + b * H : nullptr;
            cell_row(vp, part, r);
            if (!split) store(b, t);
        }
        if (!split) continue;
        // GRU without linear_before_reset: (r * h) R_h^T, then the h gate and the new state
        recur_product(p, wh, wf, GH, 2 * H, H, rh.data(), B, H, ghh.data());
        for (int64_t b = 0; b < B; ++b) {
            if (len(b) <= s) continue;
            const int64_t t = row_time(b, s);
            r.x = xg + q.xg_offset + t * q.xg_step + b * q.xg_batch + 2 * H;
            r.g = ghh.data() + b * H;
            r.rb = rb ? rb + 2 * H : nullptr;
            r.h = h.data() + b * H;
            r.zr = zr.data() + b * 2 * H;
            cell_row(vp, kGruSplit2, r);
            r.rb = rb;
            store(b, t);
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

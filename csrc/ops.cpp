// Operators: threads and kernel choice, tensor quantization, operands, GEMM and conv drivers,
// and the exact scalar datapath (the "scalar" kernel, and the fallback of the SIMD ones).
#include "ops.h"

#include <omp.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "quantize.h"

namespace bfp {

// ---------------------------------------------------------------- threads, ISA
static std::atomic<int> g_threads{0};
static std::atomic<int> g_isa{-1};

static bool cpu_has(Isa isa) {
    if (isa == kScalar) return true;
    __builtin_cpu_init();
    if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma");
}

const char* isa_name(Isa isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

std::vector<std::string> available_isas() {
    std::vector<std::string> out;
    for (Isa i : {kScalar, kAvx2, kAvx512})
        if (cpu_has(i)) out.push_back(isa_name(i));
    return out;
}

Isa current_isa() {
    int v = g_isa.load();
    if (v < 0) {
        v = cpu_has(kAvx512) ? kAvx512 : cpu_has(kAvx2) ? kAvx2 : kScalar;
        g_isa.store(v);
    }
    return Isa(v);
}

void set_isa(Isa isa) {
    if (!cpu_has(isa)) throw std::invalid_argument(std::string("this CPU cannot run the ") + isa_name(isa) + " kernel");
    g_isa.store(isa);
}

int num_threads() {
    int n = g_threads.load();
    if (n <= 0) {
        n = omp_get_num_procs();
        if (n < 1) n = 1;
        g_threads.store(n);
    }
    return n;
}

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("number of threads must be >= 1");
    g_threads.store(n);
}

AlignedBuf::AlignedBuf(size_t bytes) : n(bytes) {
    p = static_cast<uint8_t*>(std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64));
    if (!p) throw std::bad_alloc();
}
AlignedBuf::~AlignedBuf() { std::free(p); }

// ---------------------------------------------------------------- tensors
// The AVX2 block quantizer serves int8-unit formats with deterministic rounding whenever a
// SIMD kernel is selected ("scalar" keeps everything on the exact scalar code).
static bool fast_quant_ok(const FmtParams& f) {
    return current_isa() != kScalar && f.int8_units() && f.rounding != kStochastic &&
           (f.kind == kInt || f.exp_max >= 127 - f.emax_elem);
}

// n contiguous floats (flat index idx0 + k) -> int8 units; returns the block exponent.
static int16_t quantize_units_i8(const float* x, int n, uint64_t idx0, const FmtParams& f, uint64_t seed,
                                 int8_t* out, bool fast) {
    if (fast) return avx2::quantize_block_i8(x, n, f, out);
    int64_t u[4096];
    const int16_t e = quantize_block(x, 1, n, idx0, 1, f, seed, u);
    for (int k = 0; k < n; ++k) out[k] = int8_t(u[k]);
    return e;
}

template <class Fn>
static void for_each_block(int64_t outer, int64_t K, int64_t inner, int block, Fn fn) {
    const int64_t nb = (K + block - 1) / block;
    const int64_t total = outer * nb * inner;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (total * block > 32768)
    for (int64_t i = 0; i < total; ++i) {
        const int64_t o = i / (nb * inner), b = (i / inner) % nb, in = i % inner;
        const int64_t k0 = b * block;
        const int n = int(K - k0 < block ? K - k0 : block);
        fn(o, b, in, (o * K + k0) * inner + in, n);
    }
}

void quantize_tensor(const float* x, int64_t outer, int64_t K, int64_t inner, const FmtParams& f, uint64_t seed,
                     int8_t* codes, int16_t* exps) {
    const int64_t nb = (K + f.block - 1) / f.block;
    if (inner == 1 && f.kind == kInt && fast_quant_ok(f)) {
        for_each_block(outer, K, inner, f.block, [&](int64_t o, int64_t b, int64_t, int64_t off, int n) {
            exps[o * nb + b] = avx2::quantize_block_i8(x + off, n, f, codes + off);
        });
        return;
    }
    for_each_block(outer, K, inner, f.block, [&](int64_t o, int64_t b, int64_t in, int64_t off, int n) {
        int64_t units[4096];
        exps[(o * nb + b) * inner + in] = quantize_block(x + off, inner, n, uint64_t(off), inner, f, seed, units);
        for (int k = 0; k < n; ++k)
            codes[off + k * inner] = f.kind == kInt ? int8_t(units[k]) : int8_t(encode_fp(units[k], f));
    });
}

static inline float unit_value(int64_t units, int E, const FmtParams& f) {
    if (E == kNanExp) return std::nanf("");
    return float(std::ldexp(double(units), E - f.unit_shift));  // exact in float32
}

void fake_quantize_tensor(const float* x, int64_t outer, int64_t K, int64_t inner, const FmtParams& f,
                          uint64_t seed, float* out) {
    for_each_block(outer, K, inner, f.block, [&](int64_t, int64_t, int64_t, int64_t off, int n) {
        int64_t units[4096];
        const int E = quantize_block(x + off, inner, n, uint64_t(off), inner, f, seed, units);
        for (int k = 0; k < n; ++k) out[off + k * inner] = unit_value(units[k], E, f);
    });
}

void dequantize_tensor(const int8_t* codes, const int16_t* exps, int64_t outer, int64_t K, int64_t inner,
                       const FmtParams& f, float* out) {
    const int64_t nb = (K + f.block - 1) / f.block;
    const UnitsLut lut(f);
    for_each_block(outer, K, inner, f.block, [&](int64_t o, int64_t b, int64_t in, int64_t off, int n) {
        const int E = exps[(o * nb + b) * inner + in];
        for (int k = 0; k < n; ++k) out[off + k * inner] = unit_value(lut(codes[off + k * inner]), E, f);
    });
}

// ---------------------------------------------------------------- operands
static void prepare_rows(Operand& op, Isa isa);

void Operand::build(const int8_t* codes, const int16_t* exps, int64_t outer, int64_t Kdim, int64_t inner,
                    bool transpose) {
    // rows r and taps t: (o, i) = transpose ? (t, r) : (r, t); element k of (r, t) at codes[(o*K + k)*inner + i]
    K = Kdim;
    R = transpose ? inner : outer;
    taps = int(transpose ? outer : inner);
    nbt = int((K + f.block - 1) / f.block);
    Bp = (f.block + 3) / 4 * 4;
    const int nbk = nb();
    const int64_t rlen = int64_t(nbk) * Bp;
    const UnitsLut lut(f);
    exp.assign(size_t(R * nbk), 0);
    if (int8()) u8.assign(size_t(R * rlen), 0);
    else u64.assign(size_t(R * rlen), 0);
    for (int64_t r = 0; r < R; ++r)
        for (int t = 0; t < taps; ++t) {
            const int64_t o = transpose ? t : r, i = transpose ? r : t;
            for (int bt = 0; bt < nbt; ++bt) {
                exp[r * nbk + t * nbt + bt] = exps[(o * nbt + bt) * inner + i];
                const int64_t k0 = int64_t(bt) * f.block;
                const int n = int(K - k0 < f.block ? K - k0 : f.block);
                const int64_t dst = r * rlen + (int64_t(t) * nbt + bt) * Bp;
                for (int k = 0; k < n; ++k) {
                    const int64_t u = lut(codes[(o * K + k0 + k) * inner + i]);
                    if (int8()) u8[dst + k] = int8_t(u);
                    else u64[dst + k] = u;
                }
            }
        }
}

void Operand::build_rows_from_float(const float* x, int64_t rows, int64_t Kdim, uint64_t seed) {
    K = Kdim;
    R = rows;
    taps = 1;
    nbt = int((K + f.block - 1) / f.block);
    Bp = (f.block + 3) / 4 * 4;
    const int64_t rlen = int64_t(nbt) * Bp;
    exp.assign(size_t(R * nbt), 0);
    const bool i8 = int8(), fast = fast_quant_ok(f);
    if (i8) u8.assign(size_t(R * rlen), 0);
    else u64.assign(size_t(R * rlen), 0);
    const int64_t total = R * nbt;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (total * f.block > 32768)
    for (int64_t i = 0; i < total; ++i) {
        const int64_t r = i / nbt, bt = i % nbt, k0 = bt * f.block;
        const int n = int(K - k0 < f.block ? K - k0 : f.block);
        const uint64_t idx0 = uint64_t(r * K + k0);
        if (i8) {
            exp[i] = quantize_units_i8(x + r * K + k0, n, idx0, f, seed, u8.data() + r * rlen + bt * Bp, fast);
        } else {
            exp[i] = quantize_block(x + r * K + k0, 1, n, idx0, 1, f, seed, u64.data() + r * rlen + bt * Bp);
        }
    }
}

std::shared_ptr<Operand> quantize_rows(const float* x, int64_t rows, int64_t K, const FmtParams& f, uint64_t seed) {
    auto op = std::make_shared<Operand>();
    op->f = f;
    op->role = "rows";
    op->isa = current_isa();
    op->build_rows_from_float(x, rows, K, seed);
    if (op->int8()) prepare_rows(*op, op->isa);
    return op;
}

void Operand::ensure_u64() {
    if (!u64.empty() || R * nb() == 0) return;
    u64.assign(u8.begin(), u8.end());
}

RowsView Operand::rows_view() const {
    return RowsView{R, nb(), Bp, u8.data(), u16.empty() ? nullptr : u16.data(), scale.data(), corr.data(),
                    emin.data(), emax.data()};
}

ColsView Operand::cols_view() const {
    return ColsView{R,  taps, nbt, Bp, cu8.data(), ce.data(), f.unit_shift, panels ? panels->p : nullptr,
                    pmin.data(), pmax.data()};
}

// Scales, VNNI corrections and exponent ranges of rows (see RowsView).
static void prepare_rows(Operand& op, Isa isa) {
    const int nbk = op.nb();
    const int64_t R = op.R;
    op.scale.assign(size_t(R * nbk), 1.0f);
    op.corr.assign(size_t(R * nbk), 0);
    op.emin.assign(size_t(R), INT32_MAX);
    op.emax.assign(size_t(R), INT32_MIN);
    for (int64_t r = 0; r < R; ++r)
        for (int b = 0; b < nbk; ++b) {
            const int8_t* u = op.u8.data() + (r * nbk + b) * op.Bp;
            int32_t sum = 0;
            bool any = false;
            for (int k = 0; k < op.Bp; ++k) {
                sum += u[k];
                any |= u[k] != 0;
            }
            const int16_t e = op.exp[r * nbk + b];
            op.corr[r * nbk + b] = -128 * sum;
            op.scale[r * nbk + b] = block_scale(e, op.f.unit_shift, !any);
            if (e != kNanExp && any) {
                const int32_t ee = int32_t(e) - op.f.unit_shift;
                op.emin[r] = std::min(op.emin[r], ee);
                op.emax[r] = std::max(op.emax[r], ee);
            }
        }
    if (isa == kAvx2) op.u16.assign(op.u8.begin(), op.u8.end());
}

static void prepare_cols(Operand& op, Isa isa) {
    op.cu8.resize(size_t(op.R));
    op.ce.resize(size_t(op.R));
    const int64_t rlen = int64_t(op.nb()) * op.Bp;
    for (int64_t r = 0; r < op.R; ++r) {
        op.cu8[r] = op.u8.data() + r * rlen;
        op.ce[r] = op.exp.data() + r * op.nb();
    }
    if (isa == kScalar) return;
    const int NR = isa == kAvx512 ? avx512::NR : avx2::NR;
    const int64_t np = (op.R + NR - 1) / NR;
    const size_t pb = isa == kAvx512 ? avx512::panel_bytes(op.nb(), op.Bp) : avx2::panel_bytes(op.nb(), op.Bp);
    op.panels = std::make_unique<AlignedBuf>(size_t(np) * pb);
    op.pmin.assign(size_t(np), 0);
    op.pmax.assign(size_t(np), 0);
    const ColsView cv = op.cols_view();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t p = 0; p < np; ++p) {
        const int nc = int(std::min<int64_t>(NR, op.R - p * NR));
        if (isa == kAvx512)
            avx512::pack_panel(cv, p * NR, nc, op.panels->p + p * pb, &op.pmin[p], &op.pmax[p]);
        else
            avx2::pack_panel(cv, p * NR, nc, op.panels->p + p * pb, &op.pmin[p], &op.pmax[p]);
    }
}

std::shared_ptr<Operand> make_operand(const int8_t* codes, const int16_t* exps, const std::vector<int64_t>& shape,
                                      const FmtParams& f, const std::string& role, int taps) {
    auto op = std::make_shared<Operand>();
    op->f = f;
    op->role = role;
    op->isa = current_isa();
    if (role == "rows") {  // A [M, K], blocked on axis 1
        op->build(codes, exps, shape[0], shape[1], 1, false);
    } else if (role == "cols") {  // B [K, N], blocked on axis 0
        op->build(codes, exps, 1, shape[0], shape[1], true);
    } else if (role == "convw") {  // W [O, Cg, KH, KW], blocked on axis 1, taps = KH*KW
        op->kh = int(shape[2]);
        op->kw = int(shape[3]);
        op->build(codes, exps, shape[0], shape[1], int64_t(taps), false);
    } else {
        throw std::invalid_argument("unknown operand role " + role);
    }
    if (op->int8()) {
        if (role == "cols") prepare_cols(*op, op->isa);
        else prepare_rows(*op, op->isa);
    }
    return op;
}

// ---------------------------------------------------------------- the exact datapath
static inline float i128_to_f32(__int128 s) {  // round to nearest even, one rounding
    const bool neg = s < 0;
    unsigned __int128 m = neg ? (unsigned __int128)(-s) : (unsigned __int128)s;
    int bits = 0;
    for (unsigned __int128 t = m; t; t >>= 1) ++bits;
    const int shift = bits > 24 ? bits - 24 : 0;
    uint64_t q = uint64_t(m >> shift);
    if (shift) {
        const unsigned __int128 r = m & ((((unsigned __int128)1) << shift) - 1);
        const unsigned __int128 half = ((unsigned __int128)1) << (shift - 1);
        if (r > half || (r == half && (q & 1))) ++q;
    }
    const float v = float(std::ldexp(double(q), shift));
    return neg ? -v : v;
}

template <class S>
static inline float sum_to_f32(S s) {
    if constexpr (sizeof(S) > 8) return i128_to_f32(s);
    else return float(s);  // int64 -> float: one RNE rounding
}

struct ExactCtx {
    const void* ru;  // rows units: int8 or int64 [R][nb*Bp]
    const int16_t* re;
    const void* const* cu;  // column pointers (per col*taps) to int8 or int64 units
    const int16_t* const* ce;
    int nb, Bp, taps, nbt, rshift, cshift;
    int wide;  // 0: int8 units, 1: int64 units with int64 sums, 2: int64 units with int128 sums
};

template <class U, class S>
static void exact_tile_t(const ExactCtx& c, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo) {
    const U* ru = static_cast<const U*>(c.ru);
    const int64_t rlen = int64_t(c.nb) * c.Bp;
    for (int i = 0; i < nr; ++i) {
        const U* a = ru + (r0 + i) * rlen;
        const int16_t* ea = c.re + (r0 + i) * c.nb;
        for (int j = 0; j < nc; ++j) {
            float acc = 0.0f;
            for (int t = 0; t < c.taps; ++t) {
                const U* bcol = static_cast<const U*>(c.cu[(c0 + j) * c.taps + t]);
                const int16_t* eb = c.ce[(c0 + j) * c.taps + t];
                for (int bt = 0; bt < c.nbt; ++bt) {
                    const int b = t * c.nbt + bt;
                    const U* x = a + int64_t(b) * c.Bp;
                    const U* y = bcol + int64_t(bt) * c.Bp;
                    S s = 0;
                    for (int k = 0; k < c.Bp; ++k) s += S(x[k]) * S(y[k]);
                    float tb;
                    if (ea[b] == kNanExp || eb[bt] == kNanExp) {
                        tb = std::nanf("");
                    } else {
                        const int e = int(ea[b]) - c.rshift + int(eb[bt]) - c.cshift;
                        tb = float(std::ldexp(double(sum_to_f32(s)), e));  // exact scaling, one rounding
                    }
                    acc = acc + tb;
                }
            }
            out[i * ldo + j] = acc;
        }
    }
}

static void exact_tile(const void* ctx, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo) {
    const ExactCtx& c = *static_cast<const ExactCtx*>(ctx);
    if (c.wide == 0) exact_tile_t<int8_t, int64_t>(c, r0, nr, c0, nc, out, ldo);
    else if (c.wide == 1) exact_tile_t<int64_t, int64_t>(c, r0, nr, c0, nc, out, ldo);
    else exact_tile_t<int64_t, __int128>(c, r0, nr, c0, nc, out, ldo);
}

static int sum_bits(const FmtParams& a, const FmtParams& b) {
    const long double bound = (long double)a.block * (long double)a.max_units * (long double)b.max_units;
    int bits = 0;
    while ((long double)std::ldexp(1.0L, bits) <= bound) ++bits;
    return bits;  // |S| < 2^bits
}

static void exact_gemm(const ExactCtx& c, int64_t R, int64_t N, float* out, int64_t ldo) {
    const int64_t RT = 8, CT = 64;
    const int64_t nrt = (R + RT - 1) / RT, nct = (N + CT - 1) / CT;
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic)
    for (int64_t it = 0; it < nrt * nct; ++it) {
        const int64_t r0 = (it / nct) * RT, c0 = (it % nct) * CT;
        exact_tile(&c, r0, int(std::min(RT, R - r0)), c0, int(std::min(CT, N - c0)), out + r0 * ldo + c0, ldo);
    }
}

// Runs rows x cols into out (ldo), choosing the SIMD kernel when both operands have int8 units.
static void run_gemm(const RowsView& rv, const void* rows_units, const int16_t* rows_exp, const FmtParams& fa,
                     const ColsView& cv, const void* const* col_units, const FmtParams& fb, bool int8, Isa isa,
                     float* out, int64_t ldo) {
    const int bits = sum_bits(fa, fb);
    ExactCtx ctx{rows_units, rows_exp, col_units, cv.e, rv.nb, rv.Bp, cv.taps, cv.nbt, fa.unit_shift, fb.unit_shift,
                 int8 ? 0 : (bits <= 62 ? 1 : 2)};
    if (!int8 || isa == kScalar) {
        exact_gemm(ctx, rv.R, cv.N, out, ldo);
        return;
    }
    GemmArgs g{rv, cv, bits, out, ldo, ExactTile{&ctx, exact_tile}, num_threads()};
    if (isa == kAvx512) avx512::gemm(g);
    else avx2::gemm(g);
}

void gemm(Operand& a, Operand& b, float* out) {
    if (a.K != b.K || a.f.block != b.f.block) throw std::invalid_argument("operands do not match");
    const bool int8 = a.int8() && b.int8();
    const int64_t M = a.R, N = b.R;
    if (M == 0 || N == 0) return;
    if (a.nb() == 0) {
        std::memset(out, 0, sizeof(float) * size_t(M * N));
        return;
    }
    Isa isa = int8 ? b.isa : kScalar;
    if (int8 && a.isa != b.isa) isa = kScalar;  // packed for different kernels: use the exact path
    std::vector<const void*> cptr(static_cast<size_t>(N));
    std::vector<const int16_t*> eptr(static_cast<size_t>(N));
    if (!int8) {
        a.ensure_u64();
        b.ensure_u64();
    }
    const int64_t rlen = int64_t(b.nb()) * b.Bp;
    for (int64_t n = 0; n < N; ++n) {
        cptr[n] = int8 ? static_cast<const void*>(b.u8.data() + n * rlen) : static_cast<const void*>(b.u64.data() + n * rlen);
        eptr[n] = b.exp.data() + n * b.nb();
    }
    ColsView cv = b.cols_view();
    cv.e = eptr.data();
    RowsView rv = a.rows_view();
    run_gemm(rv, int8 ? static_cast<const void*>(a.u8.data()) : static_cast<const void*>(a.u64.data()), a.exp.data(),
             a.f, cv, cptr.data(), b.f, int8, isa, out, N);
}

// ---------------------------------------------------------------- convolution
void conv2d(const float* x, const FmtParams& fx, uint64_t seed, Operand& w, const ConvGeom& g, const float* bias,
            float* out) {
    const int G = g.groups;
    const int64_t C = g.C, H = g.H, W = g.W, Cg = C / G, O = w.R, Og = O / G;
    const int64_t Hp = H + g.pt + g.pb, Wp = W + g.pl + g.pr, P = g.OH * g.OW;
    const int nbc = w.nbt, Bp = w.Bp, B = fx.block, taps = w.taps;
    const bool int8 = fx.int8_units() && w.int8();
    Isa isa = int8 ? current_isa() : kScalar;
    if (int8 && w.isa != isa) isa = kScalar;  // weights were packed for another kernel
    if (!int8) w.ensure_u64();
    if (P == 0 || O == 0 || g.N == 0) return;

    // activations: per (image, group, padded pixel) nbc blocks of Bp units; padding = zero blocks
    const int64_t npix = Hp * Wp, plen = int64_t(nbc) * Bp;
    std::vector<int8_t> a8;
    std::vector<int64_t> a64;
    if (int8) a8.assign(size_t(g.N * G * npix * plen), 0);
    else a64.assign(size_t(g.N * G * npix * plen), 0);
    std::vector<int16_t> ae(size_t(g.N * G * npix * nbc), int16_t(fx.exp_min));
    const int64_t nblk = g.N * G * H * W * nbc;
    if (int8 && fast_quant_ok(fx)) {
        // channels-last copy of each (image, group), then contiguous blocks per pixel
        std::vector<float> xt(size_t(H * W * Cg));
        for (int64_t ng = 0; ng < g.N * G; ++ng) {
            const float* src = x + ng * Cg * H * W;  // (n, g) channels are contiguous in NCHW
            const int64_t HW = H * W;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (HW * Cg > 32768)
            for (int64_t p0 = 0; p0 < HW; p0 += 64) {
                const int64_t p1 = std::min(HW, p0 + 64);
                for (int64_t c = 0; c < Cg; ++c)
                    for (int64_t p = p0; p < p1; ++p) xt[p * Cg + c] = src[c * HW + p];
                for (int64_t p = p0; p < p1; ++p) {
                    const int64_t ppix = ng * npix + (p / W + g.pt) * Wp + (p % W + g.pl);
                    for (int cb = 0; cb < nbc; ++cb) {
                        const int len = int(std::min<int64_t>(B, Cg - int64_t(cb) * B));
                        ae[ppix * nbc + cb] = avx2::quantize_block_i8(xt.data() + p * Cg + int64_t(cb) * B, len, fx,
                                                                       a8.data() + ppix * plen + int64_t(cb) * Bp);
                    }
                }
            }
        }
    } else {
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t i = 0; i < nblk; ++i) {
        const int cb = int(i % nbc);
        const int64_t pix = i / nbc, xw = pix % W, xh = (pix / W) % H, ng = pix / (H * W);
        const int64_t n = ng / G, gi = ng % G;
        const int64_t c0 = gi * Cg + int64_t(cb) * B;
        const int len = int(std::min<int64_t>(B, Cg - int64_t(cb) * B));
        const int64_t off = ((n * C + c0) * H + xh) * W + xw;
        int64_t units[4096];
        const int64_t ppix = ng * npix + (xh + g.pt) * Wp + (xw + g.pl);
        ae[ppix * nbc + cb] = quantize_block(x + off, H * W, len, uint64_t(off), H * W, fx, seed, units);
        const int64_t dst = ppix * plen + int64_t(cb) * Bp;
        for (int k = 0; k < len; ++k) {
            if (int8) a8[dst + k] = int8_t(units[k]);
            else a64[dst + k] = units[k];
        }
    }
    }

    std::vector<const void*> cptr(size_t(P * taps));
    std::vector<const int16_t*> eptr(size_t(P * taps));
    for (int64_t n = 0; n < g.N; ++n)
        for (int gi = 0; gi < G; ++gi) {
            const int64_t ng = n * G + gi;
            for (int64_t oh = 0; oh < g.OH; ++oh)
                for (int64_t ow = 0; ow < g.OW; ++ow)
                    for (int t = 0; t < taps; ++t) {
                        const int64_t ih = oh * g.sh + (t / w.kw) * g.dh, iw = ow * g.sw + (t % w.kw) * g.dw;
                        const int64_t ppix = ng * npix + ih * Wp + iw;
                        const int64_t k = (oh * g.OW + ow) * taps + t;
                        cptr[k] = int8 ? static_cast<const void*>(a8.data() + ppix * plen)
                                       : static_cast<const void*>(a64.data() + ppix * plen);
                        eptr[k] = ae.data() + ppix * nbc;
                    }
            ColsView cv{P, taps, nbc, Bp, reinterpret_cast<const int8_t* const*>(cptr.data()), eptr.data(),
                        fx.unit_shift, nullptr, nullptr, nullptr};
            RowsView rv{};
            const int64_t wlen = int64_t(w.nb()) * Bp, r0 = gi * Og;
            rv.R = Og;
            rv.nb = w.nb();
            rv.Bp = Bp;
            const void* ru;
            if (int8) {
                rv.u = w.u8.data() + r0 * wlen;
                rv.u16 = w.u16.empty() ? nullptr : w.u16.data() + r0 * wlen;
                rv.scale = w.scale.data() + r0 * w.nb();
                rv.corr = w.corr.data() + r0 * w.nb();
                rv.emin = w.emin.data() + r0;
                rv.emax = w.emax.data() + r0;
                ru = rv.u;
            } else {
                ru = w.u64.data() + r0 * wlen;
            }
            run_gemm(rv, ru, w.exp.data() + r0 * w.nb(), w.f, cv, cptr.data(), fx, int8, isa,
                     out + (n * O + r0) * P, P);
        }
    if (bias) {
        for (int64_t n = 0; n < g.N; ++n)
            for (int64_t o = 0; o < O; ++o) {
                float* po = out + (n * O + o) * P;
                for (int64_t p = 0; p < P; ++p) po[p] = po[p] + bias[o];
            }
    }
}

}  // namespace bfp

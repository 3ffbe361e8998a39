// Operators: threads and kernel choice, tensor quantization, operands, GEMM and conv drivers,
// and the exact scalar datapath (the "scalar" kernel, and the fallback of the SIMD ones).
#include "ops.h"
#include "pool.h"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <mutex>
#include <thread>
#include <tuple>

#include "quantize.h"

namespace bfp {

// ---------------------------------------------------------------- threads, kernels
// Process-wide defaults, and a per-thread override that a Session installs around its calls
// (ExecScope): options belong to a session, not to the process.
static std::atomic<int> g_threads{0};
static std::atomic<int> g_kernel{-1};
static thread_local const KernelDesc* t_kernel = nullptr;
static thread_local int t_threads = 0;

int max_threads() { return 1024; }

static int kernel_index(const KernelDesc& k) {
    for (int i = 0; i < kernel_count(); ++i)
        if (&kernel_at(i) == &k) return i;
    return 0;
}

const KernelDesc& find_kernel(const std::string& name) {
    for (int i = 0; i < kernel_count(); ++i) {
        const KernelDesc& k = kernel_at(i);
        if (name != k.name) continue;
        if (!k.available()) throw std::invalid_argument(std::string("this CPU cannot run the ") + k.name + " kernel");
        return k;
    }
    std::string known;
    for (int i = 0; i < kernel_count(); ++i) known += std::string(i ? ", " : "") + kernel_at(i).name;
    throw std::invalid_argument("unknown kernel " + name + " (this build has: " + known + ")");
}

std::vector<std::string> available_kernels() {
    std::vector<std::string> out;
    for (int i = 0; i < kernel_count(); ++i)
        if (kernel_at(i).available()) out.push_back(kernel_at(i).name);
    return out;
}

static const KernelDesc& default_kernel() {
    int best = 0;
    for (int i = 0; i < kernel_count(); ++i)
        if (!kernel_at(i).emulated && kernel_at(i).available()) best = i;
    return kernel_at(best);
}

const KernelDesc& current_kernel() {
    if (t_kernel) return *t_kernel;
    int v = g_kernel.load();
    if (v < 0) {
        v = kernel_index(default_kernel());
        g_kernel.store(v);
    }
    return kernel_at(v);
}

void set_kernel(const KernelDesc* k) { g_kernel.store(k ? kernel_index(*k) : -1); }

static int checked_threads(int n) {
    if (n < 1 || n > max_threads())
        throw std::invalid_argument("number of threads must be in [1, " + std::to_string(max_threads()) + "], got " +
                                    std::to_string(n));
    return n;
}

// GNU OpenMP cannot start a team in a child of fork() once the parent has run one (the child
// waits forever for the parent's threads, which it does not have): a forked child runs every
// op on its calling thread. The bits do not depend on the thread count.
static std::atomic<bool> g_forked_child{false};
static void mark_forked_child() { g_forked_child.store(true); }
static const bool g_atfork_registered = [] { return pthread_atfork(nullptr, nullptr, mark_forked_child) == 0; }();

bool in_forked_child() { return g_forked_child.load(std::memory_order_relaxed); }

// Inside an item of parallel_items (a fused expansion's GEMM in a depthwise conv's item, say)
// every nested loop runs on the calling thread: 1, so that an OpenMP region there (the amx
// kernel's teams, a packing loop) does not start a team of its own beside the pool's threads.
int num_threads() {
    if (in_forked_child() || in_parallel_item()) return 1;
    if (t_threads > 0) return t_threads;
    int n = g_threads.load();
    if (n <= 0) {
        n = omp_get_num_procs();
        if (n < 1) n = 1;
        if (n > max_threads()) n = max_threads();
        g_threads.store(n);
    }
    return n;
}

void set_num_threads(int n) { g_threads.store(checked_threads(n)); }

ExecScope::ExecScope(const KernelDesc* k, int threads) : prev_k_(t_kernel), prev_t_(t_threads) {
    if (threads) checked_threads(threads);
    if (k) t_kernel = k;
    if (threads) t_threads = threads;
}
ExecScope::~ExecScope() {
    t_kernel = prev_k_;
    t_threads = prev_t_;
}

AlignedBuf::AlignedBuf(size_t bytes) : n(bytes) {
    p = static_cast<uint8_t*>(std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64));
    if (!p) throw std::bad_alloc();
}
AlignedBuf::~AlignedBuf() { std::free(p); }

// ---------------------------------------------------------------- tensors
// The AVX2 block quantizer serves int8-unit formats with deterministic rounding whenever a
// SIMD kernel is selected ("scalar" keeps everything on the exact scalar code).
// An uninitialized array (std::vector would zero MBs that are about to be overwritten).
template <class T>
struct RawBuf {
    std::unique_ptr<T[]> p;
    explicit RawBuf(size_t n) : p(n ? new T[n] : nullptr) {}
    T& operator[](size_t i) { return p[i]; }
    const T& operator[](size_t i) const { return p[i]; }
    T* data() { return p.get(); }
    const T* data() const { return p.get(); }
};

static bool fast_quant_ok(const FmtParams& f) {
    return current_kernel().simd() && f.int8_units() && f.rounding != kStochastic &&
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
    parallel_ranges(total * block > 32768 ? num_threads() : 1, total, std::max<int64_t>(1, 8192 / block),
                    [&](int64_t lo, int64_t hi) {
                        for (int64_t i = lo; i < hi; ++i) {
                            const int64_t o = i / (nb * inner), b = (i / inner) % nb, in = i % inner;
                            const int64_t k0 = b * block;
                            const int n = int(K - k0 < block ? K - k0 : block);
                            fn(o, b, in, (o * K + k0) * inner + in, n);
                        }
                    });
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

bool kernel_quantizes_elements(const FmtParams& f) {
    return current_kernel().fake_quantize_elems && f.simd_elements();
}

float quantize_element(float v, const FmtParams& f) {
    int64_t u;
    const int16_t e = quantize_block(&v, 1, 1, 0, 1, f, 0, &u);  // deterministic rounding: no seed, no index
    return unit_value(u, e, f);
}

float fix_element(const void* ctx, int64_t i) {
    const ElemFix& c = *static_cast<const ElemFix*>(ctx);
    const int64_t g = c.base + i;
    int64_t u;
    const int16_t e = quantize_block(c.x + g, 1, 1, uint64_t(g), 1, *c.f, c.seed, &u);
    return unit_value(u, e, *c.f);
}

void fake_quantize_elements(const float* x, int64_t n, const FmtParams& f, uint64_t seed, float* out) {
    if (kernel_quantizes_elements(f)) {  // the kernel's loop; elements it leaves out: the scalar path
        const KernelDesc& k = current_kernel();
        constexpr int64_t kChunk = 16384;
        const int64_t nchunk = (n + kChunk - 1) / kChunk;
        parallel_for(n > 32768 ? num_threads() : 1, nchunk, [&](int64_t c) {
            const int64_t i0 = c * kChunk, len = std::min<int64_t>(kChunk, n - i0);
            const ElemFix ctx{x, &f, seed, i0};
            k.fake_quantize_elems(x + i0, len, f, out + i0, fix_element, &ctx);
        });
        return;
    }
    fake_quantize_tensor(x, n, 1, 1, f, seed, out);
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
// Units stored per block: the block, or the whole axis when that is shorter (a 3-channel
// input keeps 4 units per tap, not 16), rounded up to the kernels' multiple of 4. The
// padding holds zeros, which add nothing to any block sum.
static int padded_block(int block, int64_t K) {
    const int64_t n = K < block ? (K > 0 ? K : 1) : block;
    return int((n + 3) / 4 * 4);
}

static void prepare_rows(Operand& op, const KernelDesc& k);
static void index_rows(Operand& op);

void Operand::build(const int8_t* codes, const int16_t* exps, int64_t outer, int64_t Kdim, int64_t inner,
                    bool transpose) {
    // rows r and taps t: (o, i) = transpose ? (t, r) : (r, t); element k of (r, t) at codes[(o*K + k)*inner + i]
    K = Kdim;
    R = transpose ? inner : outer;
    taps = int(transpose ? outer : inner);
    nbt = int((K + f.block - 1) / f.block);
    Bp = padded_block(f.block, K);
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
    Bp = padded_block(f.block, K);
    const int64_t rlen = int64_t(nbt) * Bp;
    exp.assign(size_t(R * nbt), 0);
    const bool i8 = int8(), fast = fast_quant_ok(f);
    if (i8) u8.assign(size_t(R * rlen), 0);
    else u64.assign(size_t(R * rlen), 0);
    const KernelDesc& k = current_kernel();
    if (i8 && fast && k.quantize_rows && !k.rows16 && Bp <= 128 && f.kind == kInt) {
        // the kernel's row quantizer writes the units and the kernels' extras in one pass
        scale.assign(size_t(R * nbt), 1.0f);
        corr.assign(size_t(R * nbt), kVnniSumStart);
        emin.assign(size_t(R), INT32_MAX);
        emax.assign(size_t(R), INT32_MIN);
        // items of >= ~8K elements (16-row groups; the quantizer's own group size): 16 rows of a
        // short K were ~0.3 us, less than claiming an item from the other core costs
        const int64_t chunk = 16 * std::min<int64_t>(64, std::max<int64_t>(1, 8192 / (16 * std::max<int64_t>(K, 1))));
        parallel_for(R * K > 32768 ? num_threads() : 1, (R + chunk - 1) / chunk, [&](int64_t ci) {
            const int64_t r0 = ci * chunk;
            const int64_t n = std::min<int64_t>(chunk, R - r0);
            const QuantRowsArgs qa{x + r0 * K, n, K, int(K), &f, Bp, u8.data() + r0 * rlen, rlen,
                                   exp.data() + r0 * nbt, scale.data() + r0 * nbt, corr.data() + r0 * nbt,
                                   emin.data() + r0, emax.data() + r0};
            k.quantize_rows(qa);
        });
        extras_ready = true;
        return;
    }
    const int64_t total = R * nbt;
    parallel_ranges(total * f.block > 32768 ? num_threads() : 1, total, std::max<int64_t>(1, 8192 / f.block),
                    [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
        const int64_t r = i / nbt, bt = i % nbt, k0 = bt * f.block;
        const int n = int(K - k0 < f.block ? K - k0 : f.block);
        const uint64_t idx0 = uint64_t(r * K + k0);
        if (i8) {
            exp[i] = quantize_units_i8(x + r * K + k0, n, idx0, f, seed, u8.data() + r * rlen + bt * Bp, fast);
        } else {
            exp[i] = quantize_block(x + r * K + k0, 1, n, idx0, 1, f, seed, u64.data() + r * rlen + bt * Bp);
        }
    }
                    });
}

std::shared_ptr<Operand> quantize_rows(const float* x, int64_t rows, int64_t K, const FmtParams& f, uint64_t seed) {
    auto op = std::make_shared<Operand>();
    op->f = f;
    op->role = "rows";
    op->kern = &current_kernel();
    op->build_rows_from_float(x, rows, K, seed);
    index_rows(*op);
    if (op->int8()) prepare_rows(*op, *op->kern);
    return op;
}

static void prepare_cols(Operand& op, const KernelDesc& k, int groups);

std::shared_ptr<Operand> quantize_cols_t(const float* x, int64_t n, int64_t K, const FmtParams& f, uint64_t seed) {
    auto op = std::make_shared<Operand>();
    op->f = f;
    op->role = "cols";
    op->kern = &current_kernel();
    op->build_rows_from_float(x, n, K, seed);  // rows of B^T = columns of B, blocked along K
    prepare_cols(*op, op->int8() ? *op->kern : kernel_at(0), 1);
    return op;
}

void Operand::ensure_u64() {
    // made on first use by a GEMM with a wide-unit partner; callers run without the GIL
    std::call_once(u64_once, [this] {
        if (u64.empty() && R * nb() > 0) u64.assign(u8.begin(), u8.end());
    });
}

// Row offsets of a canonical rows operand [R][nb*Bp] (taps = 1, row r at r * nb*Bp).
static void index_rows(Operand& op) {
    op.roff.resize(size_t(op.R));
    for (int64_t r = 0; r < op.R; ++r) op.roff[r] = r;
    op.toff.assign(1, 0);
}

// Scale, VNNI correction and the exponent range of one block of int8 units (see RowsView).
// sum: the units' sum, any: a unit is nonzero
static inline void block_extras(int32_t sum, bool any, int16_t e, int unit_shift, float* scale, int32_t* corr,
                                int32_t* emin, int32_t* emax) {
    *corr = kVnniSumStart - 128 * sum;
    *scale = block_scale(e, unit_shift, !any);
    if (e != kNanExp && any) {
        const int32_t ee = int32_t(e) - unit_shift;
        if (ee < *emin) *emin = ee;
        if (ee > *emax) *emax = ee;
    }
}

static void prepare_rows(Operand& op, const KernelDesc& k) {
    const int nbk = op.nb();
    const int64_t R = op.R;
    if (op.extras_ready) {  // the row quantizer made them
        if (k.rows16) op.u16.assign(op.u8.begin(), op.u8.end());
        return;
    }
    op.scale.assign(size_t(R * nbk), 1.0f);
    op.corr.assign(size_t(R * nbk), kVnniSumStart);
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
            block_extras(sum, any, op.exp[r * nbk + b], op.f.unit_shift, &op.scale[r * nbk + b], &op.corr[r * nbk + b],
                         &op.emin[r], &op.emax[r]);
        }
    if (k.rows16) op.u16.assign(op.u8.begin(), op.u8.end());
}

// Column pointers, and (SIMD kernels) panels packed once, per group of columns.
static void prepare_cols(Operand& op, const KernelDesc& k, int groups) {
    const int64_t rlen = int64_t(op.nb()) * op.Bp;
    op.groups = groups;
    op.cu8.resize(size_t(op.R));
    op.ce.resize(size_t(op.R));
    for (int64_t r = 0; r < op.R; ++r) {
        op.cu8[r] = op.u8.data() + r * rlen;
        op.ce[r] = op.exp.data() + r * op.nb();
    }
    if (!k.simd()) return;
    const int NR = k.nr;
    const int64_t per = op.R / groups, npg = (per + NR - 1) / NR, np = npg * groups;
    const size_t pb = k.panel_bytes(op.nb(), op.Bp);
    op.panels = std::make_unique<AlignedBuf>(size_t(np) * pb);
    op.pmin.assign(size_t(np), 0);
    op.pmax.assign(size_t(np), 0);
    ColsView cv = op.cols_view();
    cv.taps = 1;
    cv.nbt = op.nb();
#pragma omp parallel for num_threads(num_threads()) schedule(static)
    for (int64_t p = 0; p < np; ++p) {
        const int64_t g = p / npg, q = p % npg, c0 = g * per + q * NR;
        const int nc = int(std::min<int64_t>(NR, per - q * NR));
        k.pack_panel(cv, c0, nc, op.panels->p + p * pb, &op.pmin[p], &op.pmax[p]);
    }
}

RowsView Operand::rows_view() const {
    const void* u = u16.empty() ? static_cast<const void*>(u8.data()) : static_cast<const void*>(u16.data());
    return RowsView{R, 1, nb(), Bp, u, scale.data(), corr.data(), roff.data(), toff.data(), emin.data(), emax.data()};
}

ColsView Operand::cols_view() const {
    return ColsView{R, 1, nb(), Bp, cu8.data(), ce.data(), f.unit_shift, panels ? panels->p : nullptr,
                    pmin.data(), pmax.data()};
}

std::shared_ptr<Operand> make_operand(const int8_t* codes, const int16_t* exps, const std::vector<int64_t>& shape,
                                      const FmtParams& f, const std::string& role, int taps, int groups) {
    auto op = std::make_shared<Operand>();
    op->f = f;
    op->role = role;
    op->kern = &current_kernel();
    if (role == "rows") {  // A [M, K], blocked on axis 1
        op->build(codes, exps, shape[0], shape[1], 1, false);
    } else if (role == "cols") {  // B [K, N], blocked on axis 0
        op->build(codes, exps, 1, shape[0], shape[1], true);
    } else if (role == "cols_t") {  // B^T [N, K], blocked on axis 1: the columns of B, stored as rows
        op->role = "cols";
        op->build(codes, exps, shape[0], shape[1], 1, false);
    } else if (role == "convw") {  // W [O, Cg, KH, KW], blocked on axis 1, K order tap-major
        op->kh = int(shape[2]);
        op->kw = int(shape[3]);
        op->build(codes, exps, shape[0], shape[1], int64_t(taps), false);
    } else {
        throw std::invalid_argument("unknown operand role " + role);
    }
    if (role == "rows") index_rows(*op);
    if (op->int8()) {
        if (role == "rows") prepare_rows(*op, *op->kern);
        else prepare_cols(*op, *op->kern, role == "convw" ? groups : 1);
    } else if (role != "rows") {
        prepare_cols(*op, kernel_at(0), role == "convw" ? groups : 1);
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

// Rows at ru + (roff[r] + toff[t]) * nbt*Bp (exponents at re + (...) * nbt), as in RowsView;
// columns: one pointer per column to its taps*nbt blocks.
struct ExactCtx {
    const void* ru;
    const int16_t* re;
    const int64_t* roff;
    const int64_t* toff;
    const void* const* cu;
    const int16_t* const* ce;
    int taps, nbt, Bp, rshift, cshift;
    int kind;  // 0: int8 x int8, 1: int16 x int8, 2: int64 x int64 (int64 sums), 3: int64 x int64 (int128 sums)
    bool trans;
};

template <class UA, class UB, class S>
static void exact_tile_t(const ExactCtx& c, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo) {
    const int64_t plen = int64_t(c.nbt) * c.Bp;
    for (int i = 0; i < nr; ++i) {
        for (int j = 0; j < nc; ++j) {
            const UB* bcol = static_cast<const UB*>(c.cu[c0 + j]);
            const int16_t* eb = c.ce[c0 + j];
            float acc = 0.0f;
            for (int t = 0; t < c.taps; ++t) {
                const int64_t pix = c.roff[r0 + i] + c.toff[t];
                const UA* a = static_cast<const UA*>(c.ru) + pix * plen;
                const int16_t* ea = c.re + pix * c.nbt;
                for (int bt = 0; bt < c.nbt; ++bt) {
                    const int b = t * c.nbt + bt;
                    const UA* x = a + int64_t(bt) * c.Bp;
                    const UB* y = bcol + int64_t(b) * c.Bp;
                    S s = 0;
                    for (int k = 0; k < c.Bp; ++k) s += S(x[k]) * S(y[k]);
                    float tb;
                    if (ea[bt] == kNanExp || eb[b] == kNanExp) {
                        tb = std::nanf("");
                    } else {
                        const int e = int(ea[bt]) - c.rshift + int(eb[b]) - c.cshift;
                        tb = float(std::ldexp(double(sum_to_f32(s)), e));  // exact scaling, one rounding
                    }
                    acc = acc + tb;
                }
            }
            out[c.trans ? j * ldo + i : i * ldo + j] = acc;
        }
    }
}

static void exact_tile(const void* ctx, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo) {
    const ExactCtx& c = *static_cast<const ExactCtx*>(ctx);
    switch (c.kind) {
        case 0: exact_tile_t<int8_t, int8_t, int64_t>(c, r0, nr, c0, nc, out, ldo); break;
        case 1: exact_tile_t<int16_t, int8_t, int64_t>(c, r0, nr, c0, nc, out, ldo); break;
        case 2: exact_tile_t<int64_t, int64_t, int64_t>(c, r0, nr, c0, nc, out, ldo); break;
        default: exact_tile_t<int64_t, int64_t, __int128>(c, r0, nr, c0, nc, out, ldo);
    }
}

static int sum_bits(const FmtParams& a, const FmtParams& b) {
    const long double bound = (long double)a.block * (long double)a.max_units * (long double)b.max_units;
    int bits = 0;
    while ((long double)std::ldexp(1.0L, bits) <= bound) ++bits;
    return bits;  // |S| < 2^bits
}

static void exact_gemm(const ExactCtx& c, int64_t R, int64_t N, float* out, int64_t ldo, const VecEpilogue* epi) {
    const int64_t RT = 8, CT = 64;
    const int64_t nrt = (R + RT - 1) / RT, nct = (N + CT - 1) / CT;
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic)
    for (int64_t it = 0; it < nrt * nct; ++it) {
        const int64_t r0 = (it / nct) * RT, c0 = (it % nct) * CT;
        float* o = c.trans ? out + c0 * ldo + r0 : out + r0 * ldo + out_col(epi, c0);
        float tmp[RT * CT];
        exact_tile_epi(ExactTile{&c, exact_tile}, epi, r0, int(std::min(RT, R - r0)), c0, int(std::min(CT, N - c0)),
                       o, ldo, tmp);
    }
}

// rows x cols -> out (ldo). A SIMD kernel: both sides hold int8 units packed for `k` (then the
// exact path only serves tiles outside the fast path's range); otherwise all of it is exact.
static thread_local double* t_gemm_seconds = nullptr;

GemmTimer::GemmTimer(double* sink) : prev_(t_gemm_seconds) { t_gemm_seconds = sink; }
GemmTimer::~GemmTimer() { t_gemm_seconds = prev_; }

// While alive, the matrix kernel runs: its wall time goes to this thread's GemmTimer sink, if any
struct KernelSpan {
    std::chrono::steady_clock::time_point t0;
    KernelSpan() : t0(t_gemm_seconds ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
    ~KernelSpan() {
        if (t_gemm_seconds) *t_gemm_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    KernelSpan(const KernelSpan&) = delete;
    KernelSpan& operator=(const KernelSpan&) = delete;
};

static void run_gemm(const RowsView& rv, const ExactCtx& ex, const ColsView& cv, const FmtParams& fa,
                     const FmtParams& fb, const KernelDesc& k, float* out, int64_t ldo, const VecEpilogue* epi = nullptr) {
    const KernelSpan span;
    if (epi && ex.trans) throw std::logic_error("a fused epilogue needs a channels-last (untransposed) output");
    if (epi && epi->cbs && (!k.fused_epilogue || epi->res))
        throw std::logic_error("split output columns need a kernel that applies the epilogue, and no residual");
    if (!k.simd()) {
        exact_gemm(ex, rv.R, cv.N, out, ldo, epi);
    } else {
        GemmArgs g{rv, cv, sum_bits(fa, fb), out, ldo, ex.trans, ExactTile{&ex, exact_tile}, num_threads(), epi};
        k.gemm(g);
    }
}

static int exact_kind(bool int8, bool rows16, const FmtParams& fa, const FmtParams& fb) {
    if (int8) return rows16 ? 1 : 0;
    return sum_bits(fa, fb) <= 62 ? 2 : 3;
}

void gemm(Operand& a, Operand& b, float* out) {
    if (a.K != b.K || a.f.block != b.f.block) throw std::invalid_argument("operands do not match");
    const int64_t M = a.R, N = b.R;
    if (M == 0 || N == 0) return;
    if (a.nb() == 0) {
        std::memset(out, 0, sizeof(float) * size_t(M * N));
        return;
    }
    const bool int8 = a.int8() && b.int8();
    const KernelDesc* k = int8 ? b.kern : &kernel_at(0);
    if (int8 && a.kern != b.kern) k = &kernel_at(0);  // packed for different kernels: use the exact path
    const int64_t clen = int64_t(b.nb()) * b.Bp;
    if (!int8) {
        a.ensure_u64();
        b.ensure_u64();
    }
    std::vector<const void*> cu(static_cast<size_t>(N));
    std::vector<const int16_t*> ce(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
        cu[n] = int8 ? static_cast<const void*>(b.u8.data() + n * clen) : static_cast<const void*>(b.u64.data() + n * clen);
        ce[n] = b.exp.data() + n * b.nb();
    }
    const void* ru = int8 ? static_cast<const void*>(a.u8.data()) : static_cast<const void*>(a.u64.data());
    const ExactCtx ex{ru, a.exp.data(), a.roff.data(), a.toff.data(), cu.data(), ce.data(), 1, a.nb(), a.Bp,
                      a.f.unit_shift, b.f.unit_shift, exact_kind(int8, false, a.f, b.f), false};
    run_gemm(a.rows_view(), ex, b.cols_view(), a.f, b.f, *k, out, N);
}

// ---------------------------------------------------------------- convolution
// The kernel's stem path (StemArgs): a channels-last conv without groups whose input has at
// most 4 channels (every tap one block). The input is quantized by the kernel's row quantizer
// (the same bits as the GEMM path's operand) and expanded into values; weights and input then
// meet in fp32, which is the datapath bit for bit when every product and block sum is exact:
// every non-zero block's value exponent k = E - unit_shift in [-149, 120] (units * 2^k exact)
// and, for an input block and a weight block, ka + kb in [-149, 111] (a sum of <= 4 products of
// |units| <= 127 stays below 2^16 * 2^(ka + kb)); no NaN/Inf block. Returns false (nothing
// written) where that does not hold or the path does not apply: the GEMM path runs instead.
// nchw: x is [N][C][H][W] (the network's input as given: no transposed copy), else [N][H][W][C].
static bool try_stem_conv(const float* x, const FmtParams& fx, Operand& w, const ConvGeom& g, float* out,
                          const VecEpilogue* epi, bool nchw = false) {
    const KernelDesc& k = current_kernel();
    const int64_t C = g.C, O = w.R;
    if (!k.stem_conv || !k.quantize_rows || g.groups != 1 || C < 1 || C > 4 || C > fx.block ||
        padded_block(fx.block, C) != 4 ||
        w.nbt != 1 || w.taps != w.kh * w.kw || !w.int8() || w.u8.empty() || !fx.int8_units() || fx.kind != kInt ||
        !fast_quant_ok(fx) || w.f.kind != kInt || O < 1)
        return false;
    // a residual in place would be read after the raw output overwrote it
    if (epi && epi->res && epi->res < out + g.N * g.OH * g.OW * O && out < epi->res + g.N * g.OH * g.OW * O)
        return false;
    const int cp = C == 3 ? 3 : 4;
    const int64_t Op = (O + 15) / 16 * 16, taps = w.taps;
    std::call_once(w.stem_once, [&] {
        const int64_t rlen = taps * w.Bp;
        FloatVec v(size_t(taps * cp * Op), 0.0f);
        bool ok = true;
        for (int64_t o = 0; o < O && ok; ++o)
            for (int64_t t = 0; t < taps && ok; ++t) {
                const int8_t* u = w.u8.data() + o * rlen + t * w.Bp;
                const int16_t e = w.exp[size_t(o * taps + t)];
                bool nz = false;
                for (int c = 0; c < C; ++c) nz |= u[c] != 0;
                const int32_t kb = int32_t(e) - w.f.unit_shift;
                if (e == kNanExp || (nz && (kb < -149 || kb > 120))) ok = false;
                if (!nz || !ok) continue;
                w.stem_kmin = std::min(w.stem_kmin, kb);
                w.stem_kmax = std::max(w.stem_kmax, kb);
                for (int c = 0; c < C; ++c) v[size_t((t * cp + c) * Op + o)] = std::ldexp(float(u[c]), kb);
            }
        w.stem_ok = ok;
        if (ok) w.stem_w = std::move(v);
    });
    if (!w.stem_ok) return false;
    // the input's blocks, as the GEMM path quantizes them
    const int64_t n = g.N * g.H * g.W;
    const int Bp = 4;
    // kept by the calling thread across calls; the workers below reach them through these names
    // (a thread_local named inside the lambda would be the worker's own)
    thread_local std::vector<int8_t> t_u;
    thread_local std::vector<int16_t> t_E;
    thread_local std::vector<float> t_sc;
    thread_local std::vector<int32_t> t_corr, t_emn, t_emx, t_range;
    thread_local FloatVec t_xq;
    auto& u = t_u;
    auto& E = t_E;
    auto& sc = t_sc;
    auto& corr = t_corr;
    auto& emn = t_emn;
    auto& emx = t_emx;
    auto& range = t_range;
    auto& xq = t_xq;
    u.resize(size_t(n * Bp));
    E.resize(size_t(n));
    sc.resize(size_t(n));
    corr.resize(size_t(n));
    emn.resize(size_t(n));
    emx.resize(size_t(n));
    // chunks of up to 1024 pixels (NCHW: within one image, whose channel planes are HW apart)
    const int64_t chunk = 1024, HW = g.H * g.W, per_img = (HW + chunk - 1) / chunk;
    const int64_t nchunk = nchw ? g.N * per_img : (n + chunk - 1) / chunk;
    range.resize(size_t(3 * nchunk));  // per chunk: min, max, any NaN block
    const int nt = n * C > 32768 ? num_threads() : 1;
    parallel_for(nt, nchunk, [&](int64_t ci) {
        const int64_t img = nchw ? ci / per_img : 0, p0 = nchw ? (ci % per_img) * chunk : ci * chunk;
        const int64_t r0 = nchw ? img * HW + p0 : p0, len = std::min(chunk, (nchw ? HW : n) - p0);
        std::fill(emn.begin() + r0, emn.begin() + r0 + len, INT32_MAX);
        std::fill(emx.begin() + r0, emx.begin() + r0 + len, INT32_MIN);
        QuantRowsArgs qa{x + r0 * C, len, C, int(C), &fx, Bp, u.data() + r0 * Bp, Bp, E.data() + r0,
                         sc.data() + r0, corr.data() + r0, emn.data() + r0, emx.data() + r0};
        if (nchw) {  // pixel p0 of image img's planes
            qa.x = x + img * C * HW + p0;
            qa.xs = 1;
            qa.cs = HW;
        }
        k.quantize_rows(qa);
        int32_t mn = INT32_MAX, mx = INT32_MIN, bad = 0;
        for (int64_t i = r0; i < r0 + len; ++i) {
            mn = std::min(mn, emn[size_t(i)]);
            mx = std::max(mx, emx[size_t(i)]);
            bad |= E[size_t(i)] == kNanExp;
        }
        range[size_t(3 * ci)] = mn;
        range[size_t(3 * ci + 1)] = mx;
        range[size_t(3 * ci + 2)] = bad;
    });
    int32_t amin = INT32_MAX, amax = INT32_MIN;
    for (int64_t ci = 0; ci < nchunk; ++ci) {
        if (range[size_t(3 * ci + 2)]) return false;  // a NaN/Inf block
        amin = std::min(amin, range[size_t(3 * ci)]);
        amax = std::max(amax, range[size_t(3 * ci + 1)]);
    }
    if (amin <= amax && w.stem_kmin <= w.stem_kmax &&
        (amin < -149 || amax > 120 || amin + w.stem_kmin < -149 || amax + w.stem_kmax > 111))
        return false;
    const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
    xq.resize(size_t(g.N * Hp * Wp * cp));  // every value written by the kernel
    const StemArgs sa{u.data(), sc.data(), xq.data(), w.stem_w.data(), out, g.N, g.H, g.W, Hp, Wp, g.OH, g.OW, O,
                      Op, int(C), cp, g.pt, g.pl, w.kh, w.kw, g.sh, g.sw, g.dh, g.dw, epi};
    {
        const KernelSpan span;
        k.stem_conv(sa);
    }
    return true;
}

bool conv2d_stem_nchw(const float* x, const FmtParams& fx, Operand& w, const ConvGeom& g, float* out,
                      const VecEpilogue* epi) {
    if (g.OH * g.OW == 0 || w.R == 0 || g.N == 0) return true;
    return try_stem_conv(x, fx, w, g, out, epi, true);  // (it checks the formats)
}

// Implicit GEMM per (image, group): rows = output pixels (one pointer per kernel tap into the
// quantized, zero-padded channels-last activation), columns = output channels (the weights,
// packed once). Result [pixels][channels] is transposed into NCHW with the bias added.
void conv2d(const float* x, const FmtParams& fx, uint64_t seed, Operand& w, const ConvGeom& g, const float* bias,
            float* out) {
    conv2d_impl(x, fx, seed, w, g, bias, out, false);
}

// nhwc: x is [N][H][W][C] and out [N][OH][OW][O] (the runtime's layout: the GEMM's pixel rows
// are stored as they come); otherwise NCHW in and out.
// f(image, p0, p1) over runs [p0, p1) of an image's n pixels, for each of `images`, as items on
// nthr threads: runs of 16..128 pixels (the row quantizer's groups of 16 rows; short image rows
// such as 7 or 14 pixels still fill them), at least 4 items per thread where the image allows;
// the last run of an image takes the rest
template <class F>
static void for_pixel_runs(int nthr, int64_t images, int64_t n, F&& f) {
    const int64_t run = 16 * std::max<int64_t>(1, std::min<int64_t>(8, n / (16 * 4 * nthr)));
    const int64_t nrun = std::max<int64_t>(1, n / run);
    parallel_for(nthr, images * nrun, [&](int64_t it) {
        const int64_t img = it / nrun, j = it % nrun, p0 = j * run;
        f(img, p0, j + 1 == nrun ? n : p0 + run);
    });
}

bool ConvActs::Key::operator==(const Key& o) const {
    const auto fk = [](const FmtParams& q) {
        return std::make_tuple(q.block, q.kind, q.mbits, q.ebits, q.bias, q.specials, q.unit_shift, q.max_units,
                               q.exp_min, q.exp_max, q.emax_elem, q.rounding);
    };
    return x == o.x && N == o.N && C == o.C && H == o.H && W == o.W && G == o.G && pt == o.pt && pl == o.pl &&
           pb == o.pb && pr == o.pr && sh == o.sh && sw == o.sw && nbc == o.nbc && Bp == o.Bp && k == o.k &&
           cur == o.cur && int8 == o.int8 && nhwc == o.nhwc && seed == o.seed && fk(f) == fk(o.f);
}

// The kernel conv2d_impl runs a conv with weights w on: the calling thread's, or the scalar one
// for wide units or weights packed for another kernel
static const KernelDesc& conv_kernel(const FmtParams& fx, const Operand& w) {
    if (!(fx.int8_units() && w.int8())) return kernel_at(0);
    const KernelDesc& k = current_kernel();
    return w.kern == &k ? k : kernel_at(0);
}

// The key of conv2d_impl's activation operand (sub: a strided 1x1 conv quantizing only the
// pixels it reads)
static ConvActs::Key acts_key(const float* x, const ConvGeom& g, bool sub, const Operand& w, const KernelDesc& k,
                              bool int8, bool nhwc, const FmtParams& fx, uint64_t seed) {
    ConvActs::Key key;
    key.x = x;
    key.N = g.N;
    key.C = g.C;
    key.H = g.H;
    key.W = g.W;
    key.sh = sub ? g.sh : 1;
    key.sw = sub ? g.sw : 1;
    key.G = g.groups;
    key.pt = g.pt;
    key.pl = g.pl;
    key.pb = g.pb;
    key.pr = g.pr;
    key.nbc = w.nbt;
    key.Bp = w.Bp;
    key.k = &k;
    key.cur = &current_kernel();
    key.int8 = int8;
    key.nhwc = nhwc;
    key.seed = seed;
    key.f = fx;
    return key;
}

// An operand a row quantizer makes: deterministic rounding, int8 units in blocks of at most 128
static bool row_quantizable(const FmtParams& fx, const Operand& w) {
    return fx.int8_units() && w.int8() && fast_quant_ok(fx) && w.Bp <= 128 && fx.kind == kInt;
}

// conv2d_impl quantizes its input with the kernel's row quantizer (channels-last)
static bool uses_row_quantizer(const FmtParams& fx, const Operand& w, const KernelDesc& k, bool nhwc) {
    return row_quantizable(fx, w) && nhwc && k.quantize_rows && !k.rows16;
}

// dst[i] = src[i] as int16 for i in [0, n): a signed operand's units for an int16-row kernel
static void widen_all(const int8_t* src, int16_t* dst, int64_t n) {
    const int64_t chunk = 1 << 16, nch = (n + chunk - 1) / chunk;
    parallel_for(n > chunk ? num_threads() : 1, nch, [&](int64_t c) {
        const int64_t lo = c * chunk;
        avx2::widen_units(src + lo, dst + lo, std::min<int64_t>(chunk, n - lo));
    });
}

// An operand's buffers sized for nunits units in nblocks blocks over npix padded pixels (the
// exponent ranges reset; the rest is written by the quantization, wide units zero-filled)
static void size_acts(ConvActs& A, size_t nunits, size_t nblocks, size_t npix, bool int8, bool rows16, bool simd,
                      bool both = false) {
    A.a8.size_to(int8 && (!rows16 || both) ? nunits : 0);
    A.a16.size_to(int8 && rows16 ? nunits : 0);
    if (!int8) A.a64.assign(nunits, 0);
    A.ae.size_to(nblocks);
    A.as.size_to(simd ? nblocks : 0);
    A.ac.size_to(simd ? nblocks : 0);
    if (simd) {
        A.amin.assign(npix, INT32_MAX);
        A.amax.assign(npix, INT32_MIN);
    }
}

ConvRun conv2d_impl(const float* x, const FmtParams& fx, uint64_t seed, Operand& w, const ConvGeom& g,
                 const float* bias, float* out, bool nhwc, const VecEpilogue* epi, ConvActs* share) {
    const int G = g.groups;
    const int64_t C = g.C, Cg = C / G, O = w.R, Og = O / G;
    const int64_t P = g.OH * g.OW, NG = g.N * G;
    const int nbc = w.nbt, Bp = w.Bp, B = fx.block, taps = w.taps;
    const bool int8 = fx.int8_units() && w.int8();
    const KernelDesc& k = conv_kernel(fx, w);
    if (!int8) w.ensure_u64();
    if (P == 0 || O == 0 || g.N == 0) return kConvGemm;
    if (nhwc && !share && !bias && try_stem_conv(x, fx, w, g, out, epi)) return kConvStem;
    const bool rows16 = k.rows16;  // e.g. the AVX2 kernel broadcasts int16 units
    const bool simd = k.simd();
    // the AVX2 kernel also takes the units as bytes when none is negative (a ReLU's output):
    // the quantization writes bytes and notes whether a unit is negative; only then are the
    // bytes widened to the int16 units (below)
    const bool both = int8 && rows16 && simd && k.rows_u8;
    std::atomic<bool> negative{false};
    const bool fast = int8 && fast_quant_ok(fx);
    const bool fast_nchw = fast && !nhwc;  // the 8-pixel NCHW quantizer (below)
    const bool row_quant = uses_row_quantizer(fx, w, k, nhwc);
    // A strided 1x1 conv without padding (a ResNet's downsampling shortcut and conv1) reads
    // only every sh-th row and sw-th column of its input: those pixels alone are quantized,
    // as the input of a stride-1 conv of OH x OW pixels (the same blocks, a quarter of the work;
    // every quantization path below but the 8-pixel NCHW one, which reads runs of pixels)
    const bool sub = !fast_nchw && taps == 1 && G == 1 && !(g.pt || g.pl || g.pb || g.pr) &&
                     (g.sh > 1 || g.sw > 1);
    const int64_t H = sub ? g.OH : g.H, W = sub ? g.OW : g.W;  // the pixels quantized
    const int64_t sh = sub ? 1 : g.sh, sw = sub ? 1 : g.sw;    // the GEMM's strides over them
    const int64_t Hp = H + g.pt + g.pb, Wp = W + g.pl + g.pr;

    // activations: per (image, group, padded pixel) nbc blocks of Bp units; padding = zero blocks
    const int64_t npix = Hp * Wp, plen = int64_t(nbc) * Bp;
    const size_t nunits = size_t(NG * npix * plen), nblocks = size_t(NG * npix * nbc);
    // The operand is a pure function of this key: another conv's (share) is used when it matches.
    const ConvActs::Key key = acts_key(x, g, sub, w, k, int8, nhwc, fx, seed);
    const bool reuse = share && share->valid && share->key == key;
    // without a shared slot: this thread's own operand buffers, kept across calls (allocated
    // per call, every MB-sized buffer came back from the OS as fresh pages: page faults and
    // zeroing in every run until the allocator's thresholds had grown)
    thread_local ConvActs t_local;
    ConvActs& A = share ? *share : t_local;
    auto& a8 = A.a8;
    auto& a16 = A.a16;
    auto& a64 = A.a64;
    auto& ae = A.ae;
    auto& as = A.as;
    auto& ac = A.ac;
    auto& amin = A.amin;
    auto& amax = A.amax;
    if (!reuse) {
    A.valid = false;  // until the quantization below completes
    // Interior pixels are written in full by the quantization below; only the zero padding
    // ring needs filling (the buffers are not value-initialized: they are MBs per conv).
    size_acts(A, nunits, nblocks, size_t(NG * npix), int8, rows16, simd, both);
    if (!int8) {  // wide units: every block's exponent starts at exp_min (a64 is zero-filled)
        std::fill(ae.data(), ae.data() + nblocks, int16_t(fx.exp_min));
    } else if (g.pt || g.pl || g.pb || g.pr) {
        // the padding ring: zero blocks (the rows above / below the image, the columns left
        // and right of each image row), walked directly -- never a test per interior pixel
        auto clear = [&](int64_t pp, int64_t n) {  // n padded pixels from pp
            for (int64_t q = pp; q < pp + n; ++q)
                for (int b = 0; b < nbc; ++b) {
                    ae[q * nbc + b] = int16_t(fx.exp_min);
                    if (simd) {
                        as[q * nbc + b] = 1.0f;
                        ac[q * nbc + b] = kVnniSumStart;
                    }
                }
            if (rows16 && !both) std::memset(&a16[pp * plen], 0, sizeof(int16_t) * size_t(n * plen));
            if (!rows16 || both) std::memset(&a8[pp * plen], 0, size_t(n * plen));
        };
        const int64_t nrows = NG * Hp, ring = NG * npix - NG * H * W;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (ring * plen > 65536)
        for (int64_t r = 0; r < nrows; ++r) {
            const int64_t py = r % Hp, pp = r * Wp;
            if (py < g.pt || py >= g.pt + H) {
                clear(pp, Wp);
                continue;
            }
            if (g.pl) clear(pp, g.pl);
            if (g.pr) clear(pp + g.pl + W, g.pr);
        }
    }
    // one pixel's blocks: units (int8 scratch) -> buffer, plus the kernels' per-block extras
    auto store_pixel = [&](int64_t ppix, int cb, const int8_t* u8, int16_t e) {
        const int64_t blk = ppix * nbc + cb, dst = ppix * plen + int64_t(cb) * Bp;
        ae[blk] = e;
        if (simd) {  // (every SIMD kernel's CPU has AVX2) the copy, sum and test in vectors
            int32_t sum;
            bool neg = false;
            const bool wide = rows16 && !both;  // (both: bytes now, widened after if need be)
            const bool any = avx2::store_units(u8, Bp, wide, wide ? static_cast<void*>(&a16[dst]) : &a8[dst], &sum, &neg);
            if (neg && !negative.load(std::memory_order_relaxed)) negative.store(true, std::memory_order_relaxed);
            block_extras(sum, any, e, fx.unit_shift, &as[blk], &ac[blk], &amin[ppix], &amax[ppix]);
            return;
        }
        if (rows16) for (int k = 0; k < Bp; ++k) a16[dst + k] = u8[k];
        else for (int k = 0; k < Bp; ++k) a8[dst + k] = u8[k];
    };
    const int64_t HW = H * W;
    if (fast_nchw) {
        // 8 pixels at a time straight from NCHW (SIMD lanes = pixels, contiguous loads); the
        // exact scalar path takes the rare group with NaN/Inf or extreme exponents
        const int64_t nchunk = (HW + 7) / 8;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (NG * HW * Cg > 32768)
        for (int64_t it = 0; it < NG * nchunk; ++it) {
            const int64_t ng = it / nchunk, p0 = (it % nchunk) * 8, n = ng / G, gi = ng % G;
            const int np = int(std::min<int64_t>(8, HW - p0));
            alignas(64) int8_t u8[8 * 128];
            int16_t E[8];
            int64_t units[4096];
            for (int cb = 0; cb < nbc; ++cb) {
                const int len = int(std::min<int64_t>(B, Cg - int64_t(cb) * B));
                const int64_t off0 = ((n * C + gi * Cg + int64_t(cb) * B) * H) * W + p0;
                const bool vec = Bp <= 128;  // lanes hold up to 128 channels
                if (vec && len < Bp) std::memset(u8, 0, sizeof(u8));
                const bool ok = vec && avx2::quantize_pixels8(x + off0, HW, np, len, fx, u8, 128, E);
                for (int j = 0; j < np; ++j) {
                    const int64_t p = p0 + j;
                    const int64_t ppix = ng * npix + (p / W + g.pt) * Wp + (p % W + g.pl);
                    if (ok) {
                        store_pixel(ppix, cb, u8 + j * 128, E[j]);
                        continue;
                    }
                    alignas(64) int8_t one[4096 + 64] = {};
                    const int16_t e = quantize_block(x + off0 + j, HW, len, uint64_t(off0 + j), HW, fx, seed, units);
                    for (int k = 0; k < len; ++k) one[k] = int8_t(units[k]);
                    store_pixel(ppix, cb, one, e);
                }
            }
        }
    } else if (row_quant) {
        // the kernel's row quantizer: count pixels whose Cg channels start at xp, xs floats
        // apart, into the padded pixels from ppix on
        const int nthr = NG * HW * Cg > 16384 ? num_threads() : 1;
        auto quantize_pixels = [&](const float* xp, int64_t count, int64_t xs, int64_t ppix) {
            const QuantRowsArgs qa{xp, count, xs, int(Cg), &fx, Bp, a8.data() + ppix * plen, plen,
                                   ae.data() + ppix * nbc, as.data() + ppix * nbc, ac.data() + ppix * nbc,
                                   amin.data() + ppix, amax.data() + ppix};
            k.quantize_rows(qa);
        };
        // one input row of pixels at a time (contiguous in NHWC, consecutive in the padded
        // layout); without left/right padding an image's pixels are consecutive there too, and
        // one call takes a run of them (a multiple of 16, the quantizer's group of rows, so that
        // short rows such as 7 or 14 pixels fill its groups); count pixels of (image, group) ng
        // from its pixel p0, which sits at padded pixel ppix
        auto quantize_run = [&](int64_t ng, int64_t p0, int64_t count, int64_t ppix) {
            quantize_pixels(x + ((ng / G) * HW + p0) * C + (ng % G) * Cg, count, C, ppix);
        };
        if (sub) {  // output row oy's pixels: input row oy * sh, every sw-th column (G == 1)
            parallel_for(nthr, g.N * H, [&](int64_t row) {
                const int64_t n = row / H, oy = row % H;
                quantize_pixels(x + ((n * g.H + oy * g.sh) * g.W) * C, W, g.sw * C, row * W);
            });
        } else if (g.pl == 0 && g.pr == 0) {
            for_pixel_runs(nthr, NG, HW, [&](int64_t ng, int64_t p0, int64_t p1) {
                quantize_run(ng, p0, p1 - p0, ng * npix + g.pt * Wp + p0);
            });
        } else {
            parallel_for(nthr, NG * H, [&](int64_t row) {
                const int64_t ng = row / H, xh = row % H;
                quantize_run(ng, xh * W, W, ng * npix + (xh + g.pt) * Wp + g.pl);
            });
        }
    } else {
        parallel_ranges(num_threads(), NG * HW, std::max<int64_t>(1, 4096 / std::max<int64_t>(Cg, 1)),
                        [&](int64_t lo, int64_t hi) {
        // (image-group, row, column) of pixel lo, then stepped along: no divisions per pixel
        int64_t xw = lo % W, xh = (lo / W) % H, ng = lo / HW;
        if (fast && simd && (!rows16 || both)) {  // NHWC: runs of pixels along a row, one call each
            bool neg = false;
            for (int64_t pix = lo; pix < hi;) {
                const int64_t cnt = std::min(hi - pix, W - xw);
                const int64_t n = ng / G, gi = ng % G;
                const int64_t ppix = ng * npix + (xh + g.pt) * Wp + (xw + g.pl);
                const int64_t ih = sub ? xh * g.sh : xh, iw = sub ? xw * g.sw : xw;  // its pixel in x
                const QuantRowsArgs qa{x + ((n * g.H + ih) * g.W + iw) * C + gi * Cg, cnt, (sub ? g.sw : 1) * C,
                                       int(Cg), &fx, Bp, &a8[ppix * plen], plen, &ae[ppix * nbc], &as[ppix * nbc],
                                       rows16 ? nullptr : &ac[ppix * nbc], &amin[ppix], &amax[ppix]};
                avx2::quantize_rows_blocks(qa, &neg);  // (the AVX2 kernel reads no corrections)
                pix += cnt;
                xw += cnt;
                if (xw == W) {
                    xw = 0;
                    if (++xh == H) {
                        xh = 0;
                        ++ng;
                    }
                }
            }
            if (neg && !negative.load(std::memory_order_relaxed)) negative.store(true, std::memory_order_relaxed);
            return;
        }
        for (int64_t pix = lo; pix < hi; ++pix, ++xw) {
            if (xw == W) {
                xw = 0;
                if (++xh == H) {
                    xh = 0;
                    ++ng;
                }
            }
            const int64_t n = ng / G, gi = ng % G;
            const int64_t ppix = ng * npix + (xh + g.pt) * Wp + (xw + g.pl);
            const int64_t ih = sub ? xh * g.sh : xh, iw = sub ? xw * g.sw : xw;  // its pixel in x
            int64_t units[4096];
            alignas(64) int8_t u8[4096 + 64];
            for (int cb = 0; cb < nbc; ++cb) {
                const int64_t c0 = gi * Cg + int64_t(cb) * B;
                const int len = int(std::min<int64_t>(B, Cg - int64_t(cb) * B));
                const int64_t off = nhwc ? ((n * g.H + ih) * g.W + iw) * C + c0 : ((n * C + c0) * g.H + ih) * g.W + iw;
                const int64_t xs = nhwc ? 1 : g.H * g.W;
                if (fast) {  // NHWC: the block's channels are contiguous
                    std::memset(u8, 0, size_t(Bp));
                    const int16_t e = avx2::quantize_block_i8(x + off, len, fx, u8);
                    store_pixel(ppix, cb, u8, e);
                    continue;
                }
                const int16_t e = quantize_block(x + off, xs, len, uint64_t(off), xs, fx, seed, units);
                if (int8) {
                    std::memset(u8, 0, size_t(Bp));
                    for (int k = 0; k < len; ++k) u8[k] = int8_t(units[k]);
                    store_pixel(ppix, cb, u8, e);
                } else {
                    ae[ppix * nbc + cb] = e;
                    for (int k = 0; k < len; ++k) a64[ppix * plen + int64_t(cb) * Bp + k] = units[k];
                }
            }
        }
                        });
    }
    A.key = key;
    A.nonneg = both && !negative.load();
    if (both && !A.nonneg) widen_all(a8.data(), a16.data(), int64_t(nunits));  // (padding included)
    A.valid = true;
    }  // !reuse

    // rows: output pixel p's tap t reads padded pixel roff[p] + toff[t]. Channels-last without
    // groups: every image's pixels are rows of one GEMM (the weights stream past once per
    // batch, not once per image); otherwise one GEMM per (image, group).
    const bool one_gemm = nhwc && G == 1;
    const int64_t RB = one_gemm ? g.N * P : P, ngemm = one_gemm ? 1 : NG;
    // per-row offsets and exponent ranges: this thread's buffers, kept across calls (as above)
    thread_local std::vector<int64_t> t_roff;
    thread_local std::vector<int32_t> t_rmin, t_rmax;
    std::vector<int64_t>& roff = t_roff;
    roff.resize(static_cast<size_t>(RB));
    std::vector<int64_t> toff(static_cast<size_t>(taps));
    for (int t = 0; t < taps; ++t) toff[t] = (t / w.kw) * g.dh * Wp + (t % w.kw) * g.dw;
    std::vector<int32_t>& rmin = t_rmin;
    std::vector<int32_t>& rmax = t_rmax;
    rmin.resize(simd ? size_t(RB) : 0);
    rmax.resize(simd ? size_t(RB) : 0);
    std::vector<const void*> cu(static_cast<size_t>(Og));
    std::vector<const int16_t*> ce(static_cast<size_t>(Og));
    const int64_t clen = int64_t(w.nb()) * Bp;
    const int NR = simd ? k.nr : 1;
    const int64_t npg = (Og + NR - 1) / NR;
    const size_t pbytes = simd ? k.panel_bytes(w.nb(), Bp) : 0;
    const bool wide = rows16 && !A.nonneg;  // the int16 units (else bytes)
    const void* ubase = !int8 ? static_cast<const void*>(a64.data())
                        : wide ? static_cast<const void*>(a16.data()) : static_cast<const void*>(a8.data());
    for (int64_t ng = 0; ng < ngemm; ++ng) {
        const int64_t n = ng / G, gi = ng % G;
        // one output row (OW pixels) at a time: offsets by increments; a pixel's exponent range
        // over its window is separable: the extremes over the kernel's rows for each padded
        // column the row's windows cover (contiguous, vectorised), then over the columns
        const int kw_ = w.kw, kh_ = taps / w.kw;
        const int64_t span = (g.OW - 1) * sw + int64_t(kw_ - 1) * g.dw + 1;  // padded columns read
        parallel_for(RB * taps > 65536 ? num_threads() : 1, RB / g.OW, [&](int64_t qr) {
            const int64_t oy = qr % g.OH, img = one_gemm ? qr / g.OH : ng;  // img: the (image, group) slice
            const int64_t base = img * npix + oy * sh * Wp;
            for (int64_t ox = 0; ox < g.OW; ++ox) roff[qr * g.OW + ox] = base + ox * sw;
            if (!simd) return;
            if (taps == 1) {
                for (int64_t ox = 0; ox < g.OW; ++ox) {
                    rmin[qr * g.OW + ox] = amin[base + ox * sw];
                    rmax[qr * g.OW + ox] = amax[base + ox * sw];
                }
                return;
            }
            thread_local std::vector<int32_t> cmn, cmx;
            cmn.assign(size_t(span), INT32_MAX);
            cmx.assign(size_t(span), INT32_MIN);
            for (int ky = 0; ky < kh_; ++ky) {
                const int32_t* mnr = amin.data() + base + int64_t(ky) * g.dh * Wp;
                const int32_t* mxr = amax.data() + base + int64_t(ky) * g.dh * Wp;
                for (int64_t c = 0; c < span; ++c) {
                    cmn[c] = std::min(cmn[c], mnr[c]);
                    cmx[c] = std::max(cmx[c], mxr[c]);
                }
            }
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                int32_t mn = INT32_MAX, mx = INT32_MIN;
                for (int kx = 0; kx < kw_; ++kx) {
                    mn = std::min(mn, cmn[ox * sw + int64_t(kx) * g.dw]);
                    mx = std::max(mx, cmx[ox * sw + int64_t(kx) * g.dw]);
                }
                rmin[qr * g.OW + ox] = mn;
                rmax[qr * g.OW + ox] = mx;
            }
        });
        for (int64_t o = 0; o < Og; ++o) {
            const int64_t oo = gi * Og + o;
            cu[o] = int8 ? static_cast<const void*>(w.u8.data() + oo * clen) : static_cast<const void*>(w.u64.data() + oo * clen);
            ce[o] = w.exp.data() + oo * w.nb();
        }
        const ExactCtx ex{ubase, ae.data(), roff.data(), toff.data(), cu.data(), ce.data(), taps, nbc, Bp,
                          fx.unit_shift, w.f.unit_shift, exact_kind(int8, wide, fx, w.f), !nhwc};
        const RowsView rv{RB,          taps,        nbc,         Bp,          ubase,       as.data(),
                          ac.data(),   roff.data(), toff.data(), rmin.data(), rmax.data(),
                          A.nonneg ? reinterpret_cast<const uint8_t*>(a8.data()) : nullptr};
        const ColsView cv{Og, 1, w.nb(), Bp, reinterpret_cast<const int8_t* const*>(cu.data()), ce.data(), w.f.unit_shift,
                          simd ? w.panels->p + gi * npg * pbytes : nullptr, simd ? w.pmin.data() + gi * npg : nullptr,
                          simd ? w.pmax.data() + gi * npg : nullptr};
        if (nhwc) {  // rows [RB] of O channels: this group's Og columns
            run_gemm(rv, ex, cv, fx, w.f, k, out + n * P * O + gi * Og, O, epi);
            if (bias) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (RB * Og > 65536)
                for (int64_t p = 0; p < RB; ++p) {
                    float* d = out + (n * P + p) * O + gi * Og;
                    for (int64_t o = 0; o < Og; ++o) d[o] = d[o] + bias[gi * Og + o];
                }
            }
            continue;
        }
        float* dst = out + (n * O + gi * Og) * P;  // NCHW slice [Og][P]: the GEMM writes it transposed
        run_gemm(rv, ex, cv, fx, w.f, k, dst, P);
        if (bias) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (P * Og > 65536)
            for (int64_t o = 0; o < Og; ++o) {
                const float bo = bias[gi * Og + o];
                for (int64_t p = 0; p < P; ++p) dst[o * P + p] = dst[o * P + p] + bo;
            }
        }
    }
    return reuse ? kConvReused : kConvGemm;
}

bool begin_pointwise_acts(ConvActs& A, const float* x, int64_t N, int64_t H, int64_t W, const FmtParams& fx,
                          uint64_t seed, const Operand& w, QuantRowsArgs* qa, void (**fn)(const QuantRowsArgs&)) {
    const KernelDesc& k = conv_kernel(fx, w);
    // (a kernel with a row quantizer is a SIMD kernel with int8 units; an int16-row kernel takes
    // the bytes of its per-block quantizer, widened at the end if a unit is negative)
    const bool rows16 = k.rows16 && k.rows_u8 && row_quantizable(fx, w);
    if (!(rows16 || uses_row_quantizer(fx, w, k, true)) || w.taps != 1 || w.groups != 1 || N < 1 || H < 1 || W < 1)
        return false;
    const int64_t C = w.K, npix = N * H * W, nbc = w.nbt, plen = nbc * w.Bp;
    const ConvGeom g{N, C, H, W, 1, 1, 1, 0, 0, 0, 0, 1, 1, H, W};
    A.valid = false;
    A.nonneg = false;
    A.key = acts_key(x, g, false, w, k, true, true, fx, seed);
    // as conv2d_impl (no padding)
    size_acts(A, size_t(npix * plen), size_t(npix * nbc), size_t(npix), true, rows16, true, rows16);
    *qa = QuantRowsArgs{nullptr, 0, C, int(C), &fx, w.Bp, A.a8.data(), plen, A.ae.data(), A.as.data(),
                        rows16 ? nullptr : A.ac.data(), A.amin.data(), A.amax.data()};
    *fn = rows16 ? nullptr : k.quantize_rows;
    return true;
}

void end_pointwise_acts(ConvActs& A, bool negative) {
    if (A.key.k->rows16) {  // the bytes are the operand unless a unit is negative (as conv2d_impl)
        A.nonneg = !negative;
        if (negative) widen_all(A.a8.data(), A.a16.data(), A.key.N * A.key.H * A.key.W * A.key.nbc * A.key.Bp);
    }
    A.valid = true;
}

bool PointwiseRows::make(const float* x, int64_t npix, const FmtParams& fx, uint64_t seed, Operand& w) {
    (void)seed;  // deterministic rounding only (fast_quant_ok)
    const KernelDesc& k = conv_kernel(fx, w);  // (the scalar one, without a row quantizer, for another's weights)
    const int B = fx.block, Bp = w.Bp, nbc = w.nbt;
    // a kernel with int16 rows (AVX2): the units as bytes (its byte path after a ReLU), widened
    // when one is negative -- as conv2d_impl's operand for it
    const bool rows16 = k.rows16 && k.rows_u8 && row_quantizable(fx, w);
    if (!(rows16 || uses_row_quantizer(fx, w, k, true)) || w.taps != 1 || w.groups != 1 || B != w.f.block) return false;
    const int64_t C = w.K, plen = int64_t(nbc) * Bp;
    a8_.size_to(size_t(npix * plen));
    ae_.size_to(size_t(npix * nbc));
    as_.size_to(size_t(npix * nbc));
    ac_.size_to(rows16 ? 0 : size_t(npix * nbc));
    amin_.size_to(size_t(npix));
    amax_.size_to(size_t(npix));
    std::fill(amin_.data(), amin_.data() + npix, INT32_MAX);
    std::fill(amax_.data(), amax_.data() + npix, INT32_MIN);
    const int nthr = npix * C > 16384 ? num_threads() : 1;
    std::atomic<bool> negative{false};
    for_pixel_runs(nthr, 1, npix, [&](int64_t, int64_t p0, int64_t p1) {
        const QuantRowsArgs qa{x + p0 * C, p1 - p0, C, int(C), &fx, Bp, a8_.data() + p0 * plen, plen,
                               ae_.data() + p0 * nbc, as_.data() + p0 * nbc, rows16 ? nullptr : ac_.data() + p0 * nbc,
                               amin_.data() + p0, amax_.data() + p0};
        if (!rows16) return k.quantize_rows(qa);
        bool neg = false;
        avx2::quantize_rows_blocks(qa, &neg);  // (the AVX2 kernel reads no corrections)
        if (neg) negative.store(true, std::memory_order_relaxed);
    });
    wide_ = rows16 && negative.load();
    a16_.size_to(wide_ ? size_t(npix * plen) : 0);
    if (wide_) widen_all(a8_.data(), a16_.data(), npix * plen);
    bytes_ = rows16 && !wide_;
    if (int64_t(roff_.size()) < npix) {
        const size_t old = roff_.size();
        roff_.resize(size_t(npix));
        for (size_t i = old; i < roff_.size(); ++i) roff_[i] = int64_t(i);
    }
    const int64_t O = w.R, clen = int64_t(w.nb()) * Bp;
    cu_.resize(size_t(O));
    ce_.resize(size_t(O));
    for (int64_t o = 0; o < O; ++o) {
        cu_[size_t(o)] = w.u8.data() + o * clen;
        ce_[size_t(o)] = w.exp.data() + o * w.nb();
    }
    fx_ = &fx;
    w_ = &w;
    k_ = &k;
    nbc_ = nbc;
    Bp_ = Bp;
    nr_ = k.nr;
    pbytes_ = k.panel_bytes(w.nb(), Bp);
    return true;
}

void PointwiseRows::run(int64_t p0, int64_t n, int64_t c0, int64_t nc, float* out, int64_t ldo,
                        const VecEpilogue* epi) const {
    static const int64_t toff[1] = {0};
    const Operand& w = *w_;
    const int64_t* roff = roff_.data() + p0;
    const ExactCtx ex{a8_.data(), ae_.data(), roff, toff, cu_.data() + c0, ce_.data() + c0, 1, nbc_, Bp_,
                      fx_->unit_shift, w.f.unit_shift, exact_kind(true, false, *fx_, w.f), false};
    const void* u = wide_ ? static_cast<const void*>(a16_.data()) : static_cast<const void*>(a8_.data());
    const RowsView rv{n, 1, nbc_, Bp_, u, as_.data(), ac_.data(), roff, toff, amin_.data() + p0, amax_.data() + p0,
                      bytes_ ? reinterpret_cast<const uint8_t*>(a8_.data()) : nullptr};
    const int64_t pan = c0 / nr_;
    const ColsView cv{nc, 1, w.nb(), Bp_, reinterpret_cast<const int8_t* const*>(cu_.data() + c0), ce_.data() + c0,
                      w.f.unit_shift, w.panels->p + pan * pbytes_, w.pmin.data() + pan, w.pmax.data() + pan};
    if (!epi) return run_gemm(rv, ex, cv, *fx_, w.f, *k_, out, ldo);
    VecEpilogue e = *epi;
    e.y = out;
    e.ldo = ldo;
    if (e.bias) e.bias += c0;
    run_gemm(rv, ex, cv, *fx_, w.f, *k_, out, ldo, &e);
}

}  // namespace bfp

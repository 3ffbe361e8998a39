// bfpaccel C++ core: plain data structures shared by the generic code and the ISA kernels.
//
// Everything here is POD + function declarations: the ISA translation units (compiled with
// -mavx2 / -mavx512*) include it, and must not instantiate inline STL code that the linker
// could pick for the generic code (it would then run AVX instructions on any CPU).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace bfp {

constexpr int16_t kNanExp = -32768;  // exponent of a block that held NaN/Inf

enum Rounding : int { kNearestEven = 0, kNearestAway = 1, kTowardZero = 2, kStochastic = 3 };
enum ElemKind : int { kInt = 0, kFp = 1 };

// The plain integers of formats.Format.kernel_params().
struct FmtParams {
    int block;        // elements per block
    int kind;         // kInt or kFp
    int mbits;        // p of int(p), m of fp(e, m)
    int ebits;        // e of fp(e, m)
    int bias;         // element exponent bias (fp)
    int specials;     // 0 none, 1 NaN only (E4M3), 2 Inf+NaN (E5M2)
    int unit_shift;   // value = units * 2^(E - unit_shift)
    int64_t max_units;
    int exp_min, exp_max;
    int emax_elem;
    int rounding;
    bool int8_units() const { return max_units <= 127; }
    // One-element blocks of an int(p) format (units of unit_shift + 1 bits, p <= 23, max_units
    // 2^(unit_shift+1) - 1) with deterministic rounding: the SIMD element quantizers' domain.
    bool simd_elements() const {
        return kind == kInt && (rounding == kNearestEven || rounding == kNearestAway || rounding == kTowardZero) &&
               emax_elem == 0 && unit_shift >= 0 && unit_shift <= 22 && max_units == (int64_t(2) << unit_shift) - 1;
    }
};

// ---------------------------------------------------------------- kernels & dispatch
struct KernelDesc;
const KernelDesc& current_kernel();
int num_threads();
// true in a child of fork(): num_threads() is then 1 (see ops.cpp)
bool in_forked_child();

// The rows operand of a GEMM (broadcast by the kernels). Row r's units for tap t are nbt
// blocks of Bp units (block rounded up to a multiple of 4, zero padded) starting at
// u + (roff[r] + toff[t]) * nbt * Bp -- int8 for the AVX-512 kernel, int16 for AVX2; its
// per-block scales and corrections at scale/corr + (roff[r] + toff[t]) * nbt. matmul: taps = 1,
// roff[r] = r; conv: rows are output pixels and (roff + toff) the padded input pixel under
// each kernel tap -- an implicit GEMM, nothing is copied. scale = 2^(E - unit_shift) (NaN for a
// NaN block, 1.0 for an all-zero block), corr = kVnniSumStart - 128 * sum(units); emin/emax:
// per row, the range of (E - unit_shift) over its non-zero, non-NaN blocks.
// The AVX-512 kernels' int32 block sums start from the bits of the float 1.5 * 2^23 (folded
// into each row block's correction), so a finished sum S (|S| < 2^22) read as a float is
// 1.5 * 2^23 + S exactly: the tile turns it into S * (column scale) with one fma (avx512.cpp).
constexpr int32_t kVnniSumStart = 0x4B400000;
constexpr float kVnniSumStartValue = 12582912.0f;  // 1.5 * 2^23

struct RowsView {
    int64_t R;
    int taps, nbt, Bp;
    const void* u;
    const float* scale;
    const int32_t* corr;  // AVX-512 only
    const int64_t* roff;  // [R]
    const int64_t* toff;  // [taps]
    const int32_t* emin;  // [R]
    const int32_t* emax;  // [R]
    // Kernels with rows_u8 (KernelDesc): the same units as unsigned bytes in u's layout, given
    // only when none is negative (after a ReLU); null: use u.
    const uint8_t* u8 = nullptr;
};

// The columns operand (vectorised by the kernels, packed into panels of NR columns): column
// c's units for tap t are nbt*Bp int8 at u[c*taps + t]; exponents alike. matmul: the rows of
// B^T; conv: the output channels of the weights (taps = 1, nbt = kernel taps x channel blocks).
struct ColsView {
    int64_t N;
    int taps, nbt, Bp;
    const int8_t* const* u;
    const int16_t* const* e;   // raw shared exponents (kNanExp marks NaN)
    int unit_shift;
    const uint8_t* prepacked;  // ISA panels made once (weights), or null: pack on the fly
    const int32_t* pmin;       // [panels] exponent range of prepacked panels
    const int32_t* pmax;
};

// Computes the tile rows [r0, r0+nr) x cols [c0, c0+nc) exactly (docs/numerics.md#matrix-datapath)
// into `out` (tile origin; element (i, j) at out[i*ldo + j], or out[j*ldo + i] when the GEMM is
// transposed): used by every kernel for tiles whose exponents leave the fast path's range.
struct ExactTile {
    const void* ctx;
    void (*fn)(const void* ctx, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo);
};

// One-element blocks of a format with simd_elements(), as the SIMD element quantizers apply
// them to a float's bits: a normal x whose block exponent lies in [exp_min, exp_max] is its
// bits rounded to unit_shift fraction bits (add-and-mask: nearest-even adds half - 1 plus the
// kept LSB, nearest-away adds half, toward-zero adds nothing), a carry into the next binade
// clamped to the binade's largest pattern; +-0 gives +0. Every other x (exponent out of range,
// subnormal, NaN/Inf) takes the exact scalar path, quantize_element.
enum ElemQuantPath : int { kElemEven, kElemAway, kElemZero };
struct ElemQuant {
    // x's bits doubled (sign out) minus lo2 below span2 <=> exponent in range
    uint32_t lo2 = 0, span2 = 0, half = 0, lsbbit = 0, keep = 0;
    int path = kElemEven;
};
inline ElemQuant elem_quant(const FmtParams& f) {  // f.simd_elements() (the callers check)
    ElemQuant q;
    q.path = f.rounding == kNearestEven ? kElemEven : f.rounding == kNearestAway ? kElemAway : kElemZero;
    // normal and E in [exp_min, exp_max]: exponent field in [lo, hi] (empty when lo > hi)
    const int lo = f.exp_min + 127 > 1 ? f.exp_min + 127 : 1, hi = f.exp_max + 127 < 254 ? f.exp_max + 127 : 254;
    const auto field2 = [](int e) { return uint32_t(e) << 24; };  // exponent field e of bits << 1
    q.lo2 = field2(lo);
    q.span2 = lo <= hi ? field2(hi + 1) - field2(lo) : 0u;
    const int d = 23 - f.unit_shift;  // mantissa bits dropped, 1..23
    q.half = q.path == kElemEven ? (1u << (d - 1)) - 1 : q.path == kElemAway ? 1u << (d - 1) : 0u;
    q.lsbbit = 1u << d;
    q.keep = ~((1u << d) - 1);
    return q;
}
// v as a one-element block of f (deterministic rounding: f.simd_elements()), by the exact
// scalar quantizer (ops.cpp)
float quantize_element(float v, const FmtParams& f);

// The range of element-quantized values (VecEpilogue::range): the unsigned min of the non-zero
// values' bits doubled (the sign out; the exponent field in the top byte) and the max of all,
// unless `untracked` (no range is claimed). Epilogues set untracked with an atomic store (a
// kernel may run one GEMM's tiles on several threads); merge() is the owner's, after them.
struct ElemRange {
    uint32_t a2min = UINT32_MAX, a2max = 0;
    bool untracked = false;
    void merge(const ElemRange& o) {
        a2min = o.a2min < a2min ? o.a2min : a2min;
        a2max = o.a2max > a2max ? o.a2max : a2max;
        untracked = untracked || o.untracked;
    }
    void set_untracked() { __atomic_store_n(&untracked, true, __ATOMIC_RELAXED); }
};

// A conv's epilogue, applied by the GEMM kernels to each output tile while it is still in
// registers: + bias (per column), rounded to the vector precision vp (0 fp32, 1 fp16, 2 bf16);
// + residual (laid out as the output), rounded; activation (1 ReLU, 2 clip to [lo, hi]),
// rounded -- the separate vector ops' results, bit for bit. An element p of the output sits
// in column (p - y) % ldo. `row` does the same for a row in memory (tiles of the exact path).
// fq (null: none; a format with simd_elements()): last, every output is quantized as a
// one-element block of fq (fqc: its constants), as the depthwise conv reading this output
// quantizes its input (an expansion fused into it, ConvParams::expand_channels).
// cbs (0: none) splits each output row into blocks of 16 columns cbs floats apart: column c of
// a row at (c / 16) * cbs + c % 16 from the row's column 0 (a depthwise tile's channel-block
// planes, 16 floats a pixel, written by the GEMM directly); element p then sits in column
// ((p - y) / cbs) * 16 + (p - y) % 16 (rows a multiple of 16 floats apart, each row's offset
// (p - y) % cbs below cbs). Only with kernels that apply the epilogue
// (KernelDesc::fused_epilogue), never with a residual, a transposed output or the rows() pass;
// out_col() places a tile's columns.
struct VecEpilogue {
    const float* y;
    int64_t ldo;
    const float* bias;
    const float* res;
    int vp, act;
    float lo, hi;
    void (*row)(float* d, const float* b, const float* r, int64_t n, int vp, int act, float lo, float hi);
    const FmtParams* fq = nullptr;
    ElemQuant fqc{};
    // with fq (set_elem_quant): every output that reaches the element quantizer is +-0, NaN or
    // a normal fp32 whose exponent is in fqc's range -- fp16 rounding (vp 1) then a finite clip
    // [lo, hi] after a bias, no residual, nearest-even elements whose range holds 2^-24 (fp16's
    // least magnitude) up to max(|lo|, |hi|) rounded: a kernel may skip the range test, doing
    // a tile with a NaN again on the tested path
    bool fq_fast = false;
    int64_t cbs = 0;
    // non-null (with fq): set untracked where an output took the element quantizer's scalar path
    // (NaN, Inf, an exponent out of its range) -- the AVX-512 epilogues check that in registers;
    // every other path sets it always (see fp16_bounds)
    ElemRange* range = nullptr;
    bool any() const { return bias || res || act || fq; }  // anything to apply
    // Every output is rounded to fp16 (a bias, residual or activation with fp16 vector
    // precision: each op rounds, see epi_t in ops/conv.cpp): then each is +-0 or has a
    // magnitude in [2^-24, 65504] unless it is NaN or +-Inf, and one-element quantization keeps
    // a finite value's exponent (a carry into the next binade is clamped). So, where no output
    // took the quantizer's scalar path (range->untracked unset), the outputs' range lies within
    // fp16_bounds(), without a look at a value.
    bool fp16_rounded() const { return vp == 1 && (bias || res || act == 1 || act == 2); }
    static ElemRange fp16_bounds() {
        ElemRange r;
        r.a2min = 0x33800000u << 1;  // 2^-24, bits doubled
        r.a2max = 0x477fe000u << 1;  // 65504
        return r;
    }
    // the offset of column c (a multiple of 16) from a row's column 0
    int64_t col(int64_t c) const { return cbs ? (c >> 4) * cbs : c; }
    // the bias of the output row segment starting at d (its first column's entry)
    const float* bias_at(const float* d) const {
        return cbs ? bias + ((d - y) / cbs) * 16 + (d - y) % 16 : bias + (d - y) % ldo;
    }
    void rows(float* o, int nr, int nc, int64_t ld) const {  // nr rows of nc at o, ld apart
        if (fq && range) range->set_untracked();
        for (int i = 0; i < nr; ++i) {
            float* d = o + i * ld;
            row(d, bias ? bias + (d - y) % ldo : nullptr, res ? res + (d - y) : nullptr, nc, vp, act, lo, hi);
            if (fq)
                for (int j = 0; j < nc; ++j) d[j] = quantize_element(d[j], *fq);
        }
    }
    // The same for a raw tile at src (nr rows of nc, lds apart; overwritten) written to o: a
    // row's residual is read before that row of o is written, so the residual may be the
    // output buffer itself (a residual add in place).
    void rows_from(float* src, int64_t lds, float* o, int nr, int nc, int64_t ld) const {
        if (fq && range) range->set_untracked();
        for (int i = 0; i < nr; ++i) {
            float* s = src + i * lds;
            float* d = o + i * ld;
            row(s, bias ? bias_at(d) : nullptr, res ? res + (d - y) : nullptr, nc, vp, act, lo, hi);
            if (fq)
                for (int j = 0; j < nc; ++j) s[j] = quantize_element(s[j], *fq);
            if (!cbs) {
                std::memcpy(d, s, sizeof(float) * size_t(nc));
                continue;
            }
            for (int j = 0; j < nc; j += 16)  // (a tile's columns start at a multiple of 16)
                std::memcpy(d + col(j), s + j, sizeof(float) * size_t(nc - j < 16 ? nc - j : 16));
        }
    }
};
// Sets e.fq, e.fqc and e.fq_fast for one-element blocks of f (f.simd_elements()), after the
// rest of e (bias, residual, activation, bounds, vector precision) is set (ops/conv.cpp)
void set_elem_quant(VecEpilogue& e, const FmtParams& f);

// The offset of output column c (a tile's first, a multiple of 16) from its row's column 0,
// through epi's column blocks (VecEpilogue::cbs) where it has them
inline int64_t out_col(const VecEpilogue* epi, int64_t c) { return epi ? epi->col(c) : c; }

// Tile (r0, c0) of nr x nc by the exact path, written to o (ldo apart), then the epilogue if
// there is one: the raw values wait in tmp (room for nr x nc floats) and rows_from writes o,
// so the residual may be the output buffer (an add in place).
inline void exact_tile_epi(const ExactTile& ex, const VecEpilogue* epi, int64_t r0, int nr, int64_t c0, int nc,
                           float* o, int64_t ldo, float* tmp) {
    if (!epi) return ex.fn(ex.ctx, r0, nr, c0, nc, o, ldo);
    ex.fn(ex.ctx, r0, nr, c0, nc, tmp, nc);
    epi->rows_from(tmp, nc, o, nr, nc, ldo);
}

struct GemmArgs {
    RowsView rows;
    ColsView cols;
    int bits_s;  // |S_b| < 2^bits_s for every block sum
    float* out;   // out[r*ldo + c], or out[c*ldo + r] when trans (conv: NCHW from pixel rows)
    int64_t ldo;
    bool trans;
    ExactTile exact;
    int nthreads;
    const VecEpilogue* epi;  // null: none (never with trans)
};

// Rows of int8-unit activations quantized straight into a rows operand (formats with int
// elements and deterministic rounding; the same bits as quantize_block): row i's C floats at
// x + i*xs, blocks of f.block channels; units at u + i*us + b*Bp (zero padded to Bp), and
// the kernels' per-block extras (see RowsView) at E/scale/corr + i*nbc + b, the row's
// exponent range at emin/emax[i] (updated, not reset).
struct QuantRowsArgs {
    const float* x;
    int64_t n, xs;
    int C;
    const FmtParams* f;
    int Bp;
    int8_t* u;
    int64_t us;
    int16_t* E;
    float* scale;
    int32_t* corr;
    int32_t* emin;
    int32_t* emax;
    // 1: a row's C floats are contiguous. Otherwise (rows of at most 4 channels with xs == 1, an
    // NCHW image's pixels) channel c of row i is x[c * cs + i].
    int64_t cs = 1;
    // These arguments' rows [i0, i0 + count), their floats at rows (stride floats apart)
    QuantRowsArgs rows_at(const float* rows, int64_t i0, int64_t count, int64_t stride) const {
        const int64_t nbc = (C + f->block - 1) / f->block;
        QuantRowsArgs b = *this;
        b.x = rows;
        b.n = count;
        b.xs = stride;
        b.u += i0 * us;
        b.E += i0 * nbc;
        b.scale += i0 * nbc;
        if (b.corr) b.corr += i0 * nbc;
        b.emin += i0;
        b.emax += i0;
        return b;
    }
};

// A depthwise convolution (C groups of one channel, multiplier 1) on fake-quantized operands
// (one-element blocks): x [N][H][W][C], w [kh*kw][C], out [N][OH][OW][C]; each output is the
// sum over the taps in order of fp32 products (mul, then add: two roundings), a padded tap
// adding 0 * w. epi (null: none) is applied to each output before it is stored.
struct DwArgs {
    const float* x;
    const float* w;
    float* out;
    int64_t N, C, H, W, OH, OW;
    int kh, kw, sh, sw, pt, pl, dh, dw;
    const VecEpilogue* epi;
    // non-null: x is the raw input, quantized by the kernel as one-element blocks of *fq (a
    // format fake_quantize_elems takes); element i of x that needs the scalar path is fq_fix(fq_ctx, i)
    const FmtParams* fq;
    float (*fq_fix)(const void* ctx, int64_t i);
    const void* fq_ctx;
    // with fq (kernels with KernelDesc::dw_quantized_input): x already holds its one-element
    // blocks of *fq (the producer's epilogue made them), read as they are
    bool x_quantized = false;
    // non-null (with fq): x is not read; the kernel's tile of input rows [lo, hi] of image n,
    // channel blocks [cb0, cb1) (block cb's rows at tile + (cb - cb0) * plane, 16 floats a
    // pixel, W pixels a row, lanes past C +0) is made by produce(produce_ctx, ...) instead,
    // already quantized: the depthwise conv of a fused expansion (ConvParams::expand_channels)
    // range (may be null): the producer merges a range that bounds the values it wrote into
    // *range (ElemRange), or sets range->untracked where it cannot bound them
    void (*produce)(const void* ctx, int64_t n, int64_t lo, int64_t hi, int64_t cb0, int64_t cb1, int64_t plane,
                    float* tile, ElemRange* range) = nullptr;
    const void* produce_ctx = nullptr;
    // non-null (with fq): out is not written; each work item keeps its output rows (every channel,
    // epilogue applied) in a buffer of its own and quantizes them with oq_fn into the operand that
    // *oq describes for output pixel 0 (QuantRowsArgs::rows_at; oq->C == C): the input of the 1x1
    // conv reading this output (ConvParams::quantize_output). epi must not have a residual.
    const QuantRowsArgs* oq = nullptr;
    void (*oq_fn)(const QuantRowsArgs& a) = nullptr;
    // with oq, for an int16-row kernel (KernelDesc::rows16, which quantizes with its per-block
    // quantizer into bytes instead of oq_fn): set when a unit is negative (the runtime then
    // widens the bytes to the int16 units, end_pointwise_acts)
    std::atomic<bool>* oq_neg = nullptr;
    // the image row (n * OH + oy) that out's first row is (an item's own buffer); 0 otherwise
    int64_t orow0 = 0;
};

// A convolution of an input with at most 4 channels (an image network's stem: every tap is one
// block of the input, C <= block) on fake-quantized operands. The input comes quantized: 4 units
// a pixel (u, [N][H][W][4], the channels past C zero) and each pixel's block scale (scale,
// 2^(E - unit_shift), 1.0 for an all-zero block); the kernel first writes their values into xq
// [N][Hp][Wp][cp] with a zero ring (cp = 3 for C = 3, else 4), then convolves them with w
// [kh*kw][cp][Op] (each weight block's values; Op = O rounded up to 16, zero padded) into out
// [N][OH][OW][O]. The caller guarantees that every product and every block sum is exact in fp32
// (no NaN block; the exponents' range, see try_stem_conv in ops.cpp), so t = x_0 w_0 + ... +
// x_{C-1} w_{C-1} computed in fp32 is the datapath's block sum fp32(S) * 2^(Ea + Eb - shifts),
// and acc = fp32(acc + t) over the taps in order is its accumulation, bit for bit. epi (null:
// none) is applied to each output row.
struct StemArgs {
    const int8_t* u;
    const float* scale;
    float* xq;
    const float* w;
    float* out;
    int64_t N, H, W, Hp, Wp, OH, OW, O, Op;
    int C, cp, pt, pl, kh, kw, sh, sw, dh, dw;
    const VecEpilogue* epi;
};

// One entry of the kernel table (csrc/kernels/table.cpp): everything generic code needs to
// know about a kernel. Generic code never names an ISA; it reads these fields.
struct KernelDesc {
    const char* name;
    bool emulated;        // test-only build on an emulation: selectable, never the default
    bool (*available)();  // this CPU (and OS) can run it
    int nr;               // panel width; 0: no SIMD GEMM (the exact scalar datapath)
    bool rows16;          // the rows operand holds int16 units (else int8 + VNNI corrections)
    size_t (*panel_bytes)(int nb, int Bp);
    void (*pack_panel)(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
    void (*gemm)(const GemmArgs& a);
    // the row quantizer (null: the per-block quantizer); a rows16 kernel's serves its stem path
    // only (its GEMM operands come from the per-block quantizer, avx2::quantize_rows_blocks)
    void (*quantize_rows)(const QuantRowsArgs& a);
    bool fused_epilogue;  // gemm applies GemmArgs::epi (else the runtime makes a pass of its own)
    void (*dwconv)(const DwArgs& a);  // null: the runtime's portable depthwise loop + epilogue pass
    // One-element blocks (fake_quantize_elements) of an int(p) format with emax_elem == 0 and
    // deterministic rounding: out[i] = x[i] quantized alone, i in [0, n); each element that
    // needs the exact scalar path (exponent out of range, subnormal, NaN/Inf) is fix(ctx, i).
    // null: the portable quantizer.
    void (*fake_quantize_elems)(const float* x, int64_t n, const FmtParams& f, float* out,
                                float (*fix)(const void* ctx, int64_t i), const void* ctx);
    // The vector unit's exp/erf/tanh loops (ops/vmath.h) compiled for this kernel's ISA, the same
    // bits as the portable build; null: the portable build. y[i] = R(f(x[i])), f a vm::VecFn.
    void (*fn_row)(int fn, int vp, const float* x, float* y, int64_t n);
    // softmax of one contiguous row (vm::softmax_row); null: the portable build
    void (*softmax_row)(int vp, const float* s, float* d, int64_t L);
    // StemArgs' convolution; null: stems run as any other conv (quantized rows, integer GEMM)
    void (*stem_conv)(const StemArgs& a);
    // A max pool's output pixel: d[c] = the NaN-propagating max over src[0..nt)[c] in tap order,
    // c in [0, C) (unrounded); null: the portable per-tap loop (ops/pooling.cpp)
    void (*max_window)(float* d, const float* const* src, int nt, int64_t C);
    // rows16 kernels: the GEMM also takes RowsView::u8 (conv2d_impl then writes both copies)
    bool rows_u8 = false;
    // dwconv takes an input its producer's epilogue has quantized (DwArgs::x_quantized): the
    // runtime then moves a depthwise conv's element quantization into the epilogue of the conv
    // that makes its input (ConvParams::quantize_output_elements)
    bool dw_quantized_input = false;
    bool simd() const { return gemm != nullptr; }   // every SIMD kernel's CPU has AVX2 + FMA + F16C
};
int kernel_count();
const KernelDesc& kernel_at(int i);  // in order of preference (the table)

namespace avx512 {
constexpr int NR = 32;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
void quantize_rows(const QuantRowsArgs& a);
void dwconv(const DwArgs& a);  // dw_avx512.cpp
void stem_conv(const StemArgs& a);  // stem_avx512.cpp
void max_window(float* d, const float* const* src, int nt, int64_t C);  // pool_avx512.cpp
void fake_quantize_elems(const float* x, int64_t n, const FmtParams& f, float* out,
                         float (*fix)(const void* ctx, int64_t i), const void* ctx);
// How the GEMM tiles scale block sums by the row scales (avx512.cpp, TileScaling): 0 FMA,
// 1 the FP add pipes (scalef); the same bits either way. set_tile_scaling(-1): this CPU's choice.
int tile_scaling();
void set_tile_scaling(int mode);
}  // namespace avx512

namespace avx512 {  // ops/vmath.h's row loops compiled for AVX-512 (kernels/vec_avx512.cpp)
void fn_row(int fn, int vp, const float* x, float* y, int64_t n);
void softmax_row(int vp, const float* s, float* d, int64_t L);
}  // namespace avx512

namespace avx512emu {  // the same kernel on SIMDe, built only with BFPACCEL_AVX512_EMULATION
constexpr int NR = 32;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
void quantize_rows(const QuantRowsArgs& a);
void dwconv(const DwArgs& a);
void stem_conv(const StemArgs& a);
void max_window(float* d, const float* const* src, int nt, int64_t C);
void fake_quantize_elems(const float* x, int64_t n, const FmtParams& f, float* out,
                         float (*fix)(const void* ctx, int64_t i), const void* ctx);
int tile_scaling();
void set_tile_scaling(int mode);
}  // namespace avx512emu

// AMX (tile) kernel: bf16 block sums for blocks of 16/32 units, the VNNI kernel otherwise.
// Its panels embed the VNNI panel (see amx.cpp). os_ready(): the OS granted the tile state.
namespace amx {
constexpr int NR = 32;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
bool os_ready();
bool load_foreign_config_for_tests();
bool tiles_in_use_for_tests(int nt);
}  // namespace amx

namespace amxemu {  // the same kernel on SIMDe + emulated tiles, built only with BFPACCEL_AVX512_EMULATION
constexpr int NR = 32;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
bool os_ready();
bool load_foreign_config_for_tests();
bool tiles_in_use_for_tests(int nt);
}  // namespace amxemu

namespace avx2 {
constexpr int NR = 16;
size_t panel_bytes(int nb, int Bp);
void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax);
void gemm(const GemmArgs& a);
// Quantizes n contiguous floats into int8 units (formats with max_units <= 127, rounding
// other than stochastic); returns the block exponent. Same results as quantize_block.
int16_t quantize_block_i8(const float* x, int n, const FmtParams& f, int8_t* units);
// One block's n int8 units copied to dst, as int16 (wide) or int8; *sum: their sum; returns
// whether any is nonzero; *neg = true when one is negative (neg not null).
bool store_units(const int8_t* u, int n, bool wide, void* dst, int32_t* sum, bool* neg = nullptr);
// The per-block quantizer over a run of rows (pixels), straight into a rows operand: a's rows of
// C floats (xs apart; blocks of f->block channels, int(p) with int8 units or E2M1/E2M3,
// deterministic rounding) into int8 units (Bp per block, zero padded), E, scale and, when corr
// is not null, the VNNI corrections; emin/emax narrowed (they hold the rows' ranges so far).
// *neg = true when a unit is negative. Same results as quantize_block_i8 + store_units.
void quantize_rows_blocks(const QuantRowsArgs& a, bool* neg);
// dst[i] = src[i] as int16, i in [0, n)
void widen_units(const int8_t* src, int16_t* dst, int64_t n);
// QuantRowsArgs' row quantizer (deterministic rounding; planar rows: cs): rows of at most 4
// channels (a stem's pixels) 8 at a time, others by quantize_rows_blocks
void quantize_rows(const QuantRowsArgs& a);
void stem_conv(const StemArgs& a);  // stem_avx2.cpp
void dwconv(const DwArgs& a);  // dw_avx2.cpp (DwArgs::oq through quantize_rows_blocks, with oq_neg)
// KernelDesc::fake_quantize_elems: 8 elements at a time (Quant8, epi_avx2.inc)
void fake_quantize_elems(const float* x, int64_t n, const FmtParams& f, float* out,
                         float (*fix)(const void* ctx, int64_t i), const void* ctx);
// One row of a conv's output in the runtime: + bias, rounded; + residual, rounded;
// activation (1 ReLU, 2 clip to [lo, hi]), rounded -- vp: 0 fp32, 1 fp16, 2 bf16 (F16C).
void epilogue_row(float* d, const float* b, const float* r, int64_t n, int vp, int act, float lo, float hi);
// the unary Relu (act 1) / Clip (act 2: min(max(x, lo), hi), a NaN passes) of x[0, n) into y,
// rounded to the vector precision vp (vec_avx2.cpp)
void activation_row(const float* x, float* y, int64_t n, int vp, int act, float lo, float hi);
// ops/vmath.h's row loops compiled for AVX2 (kernels/vec_avx2.cpp)
void fn_row(int fn, int vp, const float* x, float* y, int64_t n);
void softmax_row(int vp, const float* s, float* d, int64_t L);
// Eight one-element blocks of an int(p) format (deterministic rounding) -> their values;
// returns the mask of lanes written (others need the scalar path).
int fake_quantize8_i(const float* x, const FmtParams& f, float* out);
// One block (len <= 128 channels) of np <= 8 consecutive pixels of a channels-first plane
// (channel c of pixel j at x[c*HW + j]): units[j*ustride + c] and E[j].
// False (nothing written) when a pixel needs the exact scalar path.
bool quantize_pixels8(const float* x, int64_t HW, int np, int len, const FmtParams& f, int8_t* units,
                      int ustride, int16_t* E);
}  // namespace avx2

// The shared exponent of a block whose largest |x| has the bit pattern amax_bits (finite):
// floor(log2(amax)) - emax_elem clamped to the format's range, exp_min for an all-zero block.
// Exact for subnormals too (the bits of a subnormal m * 2^-149 convert to float exactly).
// static: each ISA file gets its own copy, never one compiled with another file's flags.
static inline int block_exponent(int32_t amax_bits, const FmtParams& f) {
    if (amax_bits == 0) return f.exp_min;
    int fl;
    if (amax_bits >= 0x00800000) {
        fl = (amax_bits >> 23) - 127;
    } else {
        const float m = float(amax_bits);  // < 2^23: exact
        uint32_t mb;
        __builtin_memcpy(&mb, &m, 4);
        fl = int(mb >> 23) - 127 - 149;
    }
    const int E = fl - f.emax_elem;
    return E < f.exp_min ? f.exp_min : E > f.exp_max ? f.exp_max : E;
}

// Scale of a block for the fast kernels (see RowsView).
inline float block_scale(int16_t e, int unit_shift, bool all_zero) {
    if (e == kNanExp) return __builtin_nanf("");
    if (all_zero) return 1.0f;
    const int k = int(e) - unit_shift;  // in [-143, 127]: exact either way
    if (k >= -126) {                    // normal: build the power of two from its exponent bits
        const uint32_t bits = uint32_t(k + 127) << 23;
        float f;
        __builtin_memcpy(&f, &bits, 4);
        return f;
    }
    return __builtin_ldexpf(1.0f, k);
}

}  // namespace bfp

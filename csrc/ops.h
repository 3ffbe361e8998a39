// Operators over the kernels: quantize, pre-packed operands, GEMM and convolution drivers.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <mutex>
#include <string>
#include <vector>

#include "bfp.h"

namespace bfp {

void set_num_threads(int n);  // process default; throws outside [1, max_threads()]
int max_threads();
// The kernel table (bfp.h): lookup by name (throws for unknown names and kernels this CPU
// cannot run), the available names (in order of preference), the process default (null: the last).
const KernelDesc& find_kernel(const std::string& name);
std::vector<std::string> available_kernels();
void set_kernel(const KernelDesc* k);

// Session options: while alive, this thread's calls use kernel k and `threads` threads
// (null / 0: the process defaults) instead of the process-wide settings.
class ExecScope {
  public:
    ExecScope(const KernelDesc* k, int threads);
    ~ExecScope();
    ExecScope(const ExecScope&) = delete;
    ExecScope& operator=(const ExecScope&) = delete;

  private:
    const KernelDesc* prev_k_;
    int prev_t_;
};

// An allocator of 64-byte aligned memory (a cache line, one AVX-512 vector): std::vector's own
// comes from malloc, 16-byte aligned for large blocks, so every vector load and store of a
// kernel would span two cache lines and threads writing neighbouring channel groups would share
// a line.
template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U>&) noexcept {}
    T* allocate(size_t n) {
        if (n > (SIZE_MAX - 63) / sizeof(T)) throw std::bad_alloc();
        void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
        if (!p) throw std::bad_alloc();
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t) noexcept { std::free(p); }
    template <class U>
    bool operator==(const Aligned64<U>&) const noexcept { return true; }
    template <class U>
    bool operator!=(const Aligned64<U>&) const noexcept { return false; }
};
using FloatVec = std::vector<float, Aligned64<float>>;

// 64-byte aligned buffer
struct AlignedBuf {
    uint8_t* p = nullptr;
    size_t n = 0;
    AlignedBuf() = default;
    explicit AlignedBuf(size_t bytes);
    ~AlignedBuf();
    AlignedBuf(const AlignedBuf&) = delete;
    AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Tensor views (outer, K, inner), contiguous.
void quantize_tensor(const float* x, int64_t outer, int64_t K, int64_t inner, const FmtParams& f, uint64_t seed,
                     int8_t* codes, int16_t* exps);
void fake_quantize_tensor(const float* x, int64_t outer, int64_t K, int64_t inner, const FmtParams& f,
                          uint64_t seed, float* out);
// Every element its own block (depthwise convs): values, SIMD where the format allows.
void fake_quantize_elements(const float* x, int64_t n, const FmtParams& f, uint64_t seed, float* out);
// The current kernel's fake_quantize_elems takes format f; ElemFix (with fix_element) gives
// it the scalar path for single elements: the value of x[base + i].
bool kernel_quantizes_elements(const FmtParams& f);
struct ElemFix {
    const float* x;
    const FmtParams* f;
    uint64_t seed;
    int64_t base;
};
float fix_element(const void* ctx, int64_t i);
void dequantize_tensor(const int8_t* codes, const int16_t* exps, int64_t outer, int64_t K, int64_t inner,
                       const FmtParams& f, float* out);

// Profiling: while alive, this thread's GEMMs (the integer kernel, with its fused epilogue)
// add their wall time to *sink.
class GemmTimer {
  public:
    explicit GemmTimer(double* sink);
    ~GemmTimer();
    GemmTimer(const GemmTimer&) = delete;
    GemmTimer& operator=(const GemmTimer&) = delete;

  private:
    double* prev_;
};

// A quantized GEMM operand in canonical block-row form [R][taps*nbt*Bp] units, built once from
// codes and exponents; "rows" and "convw" roles also carry per-row scales for the kernels,
// "cols" carries panels packed for the ISA that was current when it was made.
class Operand {
  public:
    FmtParams f{};
    std::string role;
    const KernelDesc* kern = nullptr;  // the kernel its panels / rows were prepared for
    int64_t R = 0, K = 0;
    int taps = 1, nbt = 0, Bp = 4, kh = 1, kw = 1;
    std::vector<int8_t> u8;     // int8 units (formats whose units fit a byte)
    std::vector<int16_t> u16;   // int16 copy of rows for the AVX2 kernel
    std::vector<int64_t> u64;   // wide units (FP8 / E3M2, or mixed with them), made on demand
    std::once_flag u64_once;
    std::vector<int16_t> exp;   // [R][nb] raw shared exponents
    std::vector<float> scale;   // [R][nb]
    std::vector<int32_t> corr, emin, emax;
    bool extras_ready = false;               // rows: scale/corr/emin/emax made with the units
    std::vector<int64_t> roff, toff;          // rows: offsets for RowsView
    int groups = 1;                          // cols/convw: panels are packed per group
    std::unique_ptr<AlignedBuf> panels;
    std::vector<int32_t> pmin, pmax;
    std::vector<const int8_t*> cu8;
    std::vector<const int16_t*> ce;
    // convw with one block per tap (an input of <= 4 channels): the weights' values for the
    // kernel's stem path (StemArgs::w), made on first use; stem_ok false: the path cannot take them
    std::once_flag stem_once;
    FloatVec stem_w;
    bool stem_ok = false;
    int32_t stem_kmin = INT32_MAX, stem_kmax = INT32_MIN;  // E - unit_shift over non-zero blocks

    int nb() const { return taps * nbt; }
    bool int8() const { return f.int8_units(); }
    void build(const int8_t* codes, const int16_t* exps, int64_t outer, int64_t Kdim, int64_t inner, bool transpose);
    void build_rows_from_float(const float* x, int64_t rows, int64_t Kdim, uint64_t seed);
    void ensure_u64();
    RowsView rows_view() const;
    ColsView cols_view() const;
};

// role: "rows" (A [M, K] blocked on axis 1), "cols" (B [K, N] blocked on axis 0), "cols_t" (B^T [N, K]
// blocked on axis 1: a "cols" operand built from its columns stored as rows), "convw" (OIHW weights)
std::shared_ptr<Operand> make_operand(const int8_t* codes, const int16_t* exps, const std::vector<int64_t>& shape,
                                      const FmtParams& f, const std::string& role, int taps, int groups);

// A [rows, K] float quantized straight into a "rows" operand (blocks along K).
std::shared_ptr<Operand> quantize_rows(const float* x, int64_t rows, int64_t K, const FmtParams& f, uint64_t seed);
// The columns of B given as the rows of B^T [n, K] (float), quantized along K (deterministic
// rounding: the bits of quantize_tensor + make_operand(..., "cols_t")), packed for the kernel.
std::shared_ptr<Operand> quantize_cols_t(const float* x, int64_t n, int64_t K, const FmtParams& f, uint64_t seed);

// out[M][N] = rows (A[M,K]) x cols (B[K,N]) on the BFP datapath.
void gemm(Operand& a, Operand& b, float* out);

struct ConvGeom {
    int64_t N, C, H, W;
    int groups, sh, sw, pt, pl, pb, pr, dh, dw;
    int64_t OH, OW;
};
// An array kept across calls: grown (uninitialized) only when a larger one is asked for.
template <class T>
struct GrowBuf {
    std::unique_ptr<T[]> p;
    size_t cap = 0;
    void size_to(size_t n) {
        if (n > cap) {
            p.reset(new T[n]);
            cap = n;
        }
    }
    T& operator[](size_t i) { return p[i]; }
    const T& operator[](size_t i) const { return p[i]; }
    T* data() { return p.get(); }
    const T* data() const { return p.get(); }
};

// A BFP convolution's activation operand as conv2d_impl lays it out: every (image, group,
// padded pixel)'s blocks of units, their exponents and the kernels' per-block extras. It is a
// pure function of its key -- the input buffer and its geometry, the format and seed, the
// weights' blocking and the kernels -- so convs (dense layers) that read the same buffer with
// the same key can share one: the program keeps it for the run (ConvParams::share_input).
struct ConvActs {
    struct Key {
        const float* x = nullptr;
        int64_t N = 0, C = 0, H = 0, W = 0;
        int G = 0, pt = 0, pl = 0, pb = 0, pr = 0, nbc = 0, Bp = 0;
        int64_t sh = 1, sw = 1;  // > 1: only every sh-th row / sw-th column was quantized (strided 1x1)
        const KernelDesc* k = nullptr;    // the GEMM's kernel (the operand's layout and extras)
        const KernelDesc* cur = nullptr;  // the calling thread's kernel (picks the quantizer)
        bool int8 = false, nhwc = false;
        uint64_t seed = 0;
        FmtParams f{};
        bool operator==(const Key& o) const;
    };
    Key key;
    bool valid = false;  // the buffers hold key's operand
    bool nonneg = false;  // a8 also holds the units (kernels with rows_u8) and none is negative
    GrowBuf<int8_t> a8;
    GrowBuf<int16_t> a16, ae;
    std::vector<int64_t> a64;
    GrowBuf<float> as;
    GrowBuf<int32_t> ac;
    std::vector<int32_t> amin, amax;
};

// out[N][O][OH][OW] = conv(x, weights) (+ bias if not null).
void conv2d(const float* x, const FmtParams& fx, uint64_t seed, Operand& w, const ConvGeom& g, const float* bias,
            float* out);
// The same with nhwc = true: x [N][H][W][C] -> out [N][OH][OW][O].
// epi (nhwc only): applied to each output tile as the GEMM finishes it.
// share: null, or the activation operand to use when its key matches this call's (it is made
// there otherwise). Returns how it ran: kConvReused when the activation came from share
// unchanged, kConvStem on the kernel's stem path (StemArgs; nhwc, no share, no bias).
enum ConvRun : int { kConvGemm = 0, kConvReused = 1, kConvStem = 2 };
// The conv of an NCHW input x (N x C x H x W, C <= 4: an image network's stem) into NHWC out on
// the kernel's stem path (nhwc conv2d_impl's, without the transposed copy of x); false: that
// path does not take it (nothing written) -- the caller runs conv2d_impl on x in NHWC.
bool conv2d_stem_nchw(const float* x, const FmtParams& fx, Operand& w, const ConvGeom& g, float* out,
                      const VecEpilogue* epi);
ConvRun conv2d_impl(const float* x, const FmtParams& fx, uint64_t seed, Operand& w, const ConvGeom& g,
                 const float* bias, float* out, bool nhwc, const VecEpilogue* epi = nullptr,
                 ConvActs* share = nullptr);
// The activation operand of a 1x1 conv (stride 1, no padding, one group; weights w) over
// x [N][H][W][C], made by the op that produces x instead of by that conv (a depthwise conv's
// ConvParams::quantize_output): A gets the key conv2d_impl computes for that conv, its buffers
// sized and every pixel's exponent range reset; *qa becomes the row quantizer's arguments for
// pixel 0 (x and n left for the caller: each run of pixels p0.. is quantized with x, n set and
// u, E, scale, corr, emin, emax advanced by p0 pixels, see rows_at) and *fn the kernel's row
// quantizer -- null for an int16-row kernel (KernelDesc::rows16): the producer quantizes with
// that kernel's per-block quantizer into bytes (u = A.a8, no corrections) and notes whether a
// unit is negative (DwArgs::oq_neg). Once every pixel is quantized, the caller completes A with
// end_pointwise_acts. False (A untouched): that conv would not quantize its input this way (its
// format, weights or kernel), so the producer writes x as usual.
bool begin_pointwise_acts(ConvActs& A, const float* x, int64_t N, int64_t H, int64_t W, const FmtParams& fx,
                          uint64_t seed, const Operand& w, QuantRowsArgs* qa, void (**fn)(const QuantRowsArgs&));
// A made by begin_pointwise_acts, every pixel quantized (negative: a unit of an int16-row
// kernel's bytes is negative -- they are widened): valid for its conv
void end_pointwise_acts(ConvActs& A, bool negative);

// A 1x1 convolution (stride 1, no padding, no groups) over NHWC pixels, computed in pieces on
// the calling thread: an expansion conv fused into the depthwise conv that reads it (its output
// rows are made where the depthwise conv needs them, never stored whole). make() quantizes the
// input of all npix pixels once, as conv2d_impl's row quantizer does (the same operand, so the
// same bits); false (nothing made) where that path does not apply: the weights were packed for
// another kernel, a format without int8 units or deterministic rounding, a kernel without a
// row quantizer -- the caller then runs the conv whole. run() is the GEMM of pixels
// [p0, p0 + n) and output channels [c0, c0 + nc) (c0 a multiple of the kernel's NR) written to
// out (ldo apart) through epi (its y, ldo and bias re-based to out; null: none; its cbs, the
// columns split into blocks of 16, kept: with a kernel that applies the epilogue only, see
// applies_epilogue()).
class PointwiseRows {
  public:
    bool make(const float* x, int64_t npix, const FmtParams& fx, uint64_t seed, Operand& w);
    void run(int64_t p0, int64_t n, int64_t c0, int64_t nc, float* out, int64_t ldo, const VecEpilogue* epi) const;
    int nr() const { return nr_; }
    bool applies_epilogue() const { return k_ && k_->fused_epilogue; }  // (KernelDesc::fused_epilogue)

  private:
    const FmtParams* fx_ = nullptr;
    Operand* w_ = nullptr;
    const KernelDesc* k_ = nullptr;
    int nbc_ = 0, Bp_ = 0, nr_ = 1;
    size_t pbytes_ = 0;
    bool wide_ = false, bytes_ = false;  // a rows16 kernel's rows: int16 units (a16_), or bytes (a8_ unsigned)
    GrowBuf<int8_t> a8_;
    GrowBuf<int16_t> a16_;
    GrowBuf<int16_t> ae_;
    GrowBuf<float> as_;
    GrowBuf<int32_t> ac_, amin_, amax_;
    std::vector<int64_t> roff_;
    std::vector<const void*> cu_;
    std::vector<const int16_t*> ce_;
};

}  // namespace bfp

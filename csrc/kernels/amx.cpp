// AMX kernel: "pre-scaled bf16" block sums on the tile unit (TDPBF16PS), for the blocks of 16
// and 32 units (msfp16, mxint8, ...). Compiled with -mamx-tile/-mamx-int8/-mamx-bf16 plus the
// AVX-512 flags of the VNNI kernel.
//
// Numerics. Both operands are stored as bf16 VALUES u * 2^(E - unit_shift): exact, since
// |u| <= 127 has at most 7 significant bits. One TDPBF16PS over ONE block into a zeroed C tile
// sums products that all lie on the grid 2^(ea+eb) and stay below 2^(bits_s + ea + eb), so when
// every operand value and every non-zero partial sum is a normal fp32 (the tile unit reads
// denormals as zero and flushes denormal results) the tile holds the exact S * 2^(ea+eb), and
// acc = acc + C (one vaddps) is the datapath's one rounding per block. tile_is_exact_bf16()
// checks that per (16-row tile, panel) from the exponent ranges; other tiles go to the exact
// fallback a.exact.fn. NaN blocks become NaN values (propagated by the tile unit).
//
// Work. The rows are gathered once per call into [row tile][block][16 rows][Bp] bf16 (A tiles,
// implicit-GEMM rows of a conv included). Per 16x16 output tile the K loop keeps the 16
// accumulators in zmm registers and rotates four C tiles: compute block s, store block s-2,
// add block s-3 (TILESTORED's latency hidden behind the next blocks' tile work).
//
// Panels (NR = 32 columns): the VNNI kernel's panel, then (Bp 16 or 32) the AMX part: per block
// two halves of 16 columns, each a B tile of Bp/2 rows x 64 bytes (the bf16 pairs k, k+1 of the
// 16 columns). The VNNI part serves row counts below one tile (a batch-1 dense layer: half the
// bytes of bf16 weights) and narrow problems (<= 4 panels, where gathering the A tiles costs
// more than the tiles save): those run the VNNI kernel panel by panel. Other block sizes
// (4, 8, 12, ...) have the plain VNNI panel and run the VNNI kernel as a whole.
#ifdef BFP_AMX_EMULATED
// Test-only build of this same file on SIMDe (AVX-512) and amx_tile_emu.h (tiles): the
// "amx-emu" kernel, which checks the kernel's logic bit for bit on CPUs without AMX.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include "amx_tile_emu.h"
#define BFP_AMX_NS amxemu
#define BFP_NO_512_CVTPS_PH 1
#define BFP_VNNI_NS avx512emu
#else
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define BFP_AMX_NS amx
#define BFP_VNNI_NS avx512
#endif

#include <climits>
#include <cstdlib>
#include <atomic>
#include <cstring>
#include <utility>

#include "../bfp.h"

// Orders memory accesses around the tile intrinsics, whose asm does not declare them (g++ 12
// models ldtilecfg as reading 8 bytes, tileloadd/tilestored as touching no memory at all).
#define BFP_MEM_BARRIER() __asm__ __volatile__("" ::: "memory")

namespace bfp {
namespace BFP_AMX_NS {

namespace vnni = ::bfp::BFP_VNNI_NS;
#include "epi512.inc"
static_assert(NR == vnni::NR, "the AMX panel embeds the VNNI panel");

static constexpr int MT = 16;  // rows per A tile
static constexpr int HT = 16;  // columns per C tile (a panel has two halves)

static inline bool served(int Bp) { return Bp == 16 || Bp == 32; }

// AMX part of a panel: per block, 2 halves x (Bp/2 rows x 64 bytes)
static inline size_t amx_bytes(int nb, int Bp) { return size_t(nb) * size_t(Bp) * 64; }

size_t panel_bytes(int nb, int Bp) {
    const size_t v = vnni::panel_bytes(nb, Bp);
    return served(Bp) ? v + amx_bytes(nb, Bp) : v;
}

static inline uint16_t bf16_bits(float f) {  // exact by construction (<= 8 significant bits)
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return uint16_t(b >> 16);
}

// The AMX part of panel [col0, col0+ncols) at dst; the exponent range like the VNNI packer's.
static void pack_amx(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    const int Bp = c.Bp;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int t = 0; t < c.taps; ++t) {
        for (int bt = 0; bt < c.nbt; ++bt) {
            const int b = t * c.nbt + bt;
            uint16_t* q = reinterpret_cast<uint16_t*>(dst + size_t(b) * Bp * 64);
            for (int j = 0; j < NR; ++j) {
                uint16_t* qj = q + (j / HT) * (Bp / 2) * 32 + (j % HT) * 2;  // row k/2, pair slot k&1
                if (j >= ncols) {
                    for (int k = 0; k < Bp; ++k) qj[(k >> 1) * 32 + (k & 1)] = 0;
                    continue;
                }
                const int8_t* src = c.u[(col0 + j) * c.taps + t] + bt * Bp;
                bool any = false;
                for (int k = 0; k < Bp; ++k) any |= src[k] != 0;
                const int16_t e = c.e[(col0 + j) * c.taps + t][bt];
                const float sc = block_scale(e, c.unit_shift, !any);
                for (int k = 0; k < Bp; ++k) qj[(k >> 1) * 32 + (k & 1)] = bf16_bits(float(src[k]) * sc);
                if (e != kNanExp && any) {
                    const int32_t ee = int32_t(e) - c.unit_shift;
                    if (ee < mn) mn = ee;
                    if (ee > mx) mx = ee;
                }
            }
        }
    }
    *emin = mn;
    *emax = mx;
}

void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    vnni::pack_panel(c, col0, ncols, dst, emin, emax);
    if (served(c.Bp)) {
        int32_t mn, mx;
        pack_amx(c, col0, ncols, dst + vnni::panel_bytes(c.taps * c.nbt, c.Bp), &mn, &mx);
    }
}

// ---------------------------------------------------------------- the OS and the tile state
bool os_ready() {
#ifdef BFP_AMX_EMULATED
    return true;
#else
    // Linux >= 5.16 gives a process the AMX tile data state on request (ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA); it refuses when a thread already has a sigaltstack too small for
    // the larger signal frame. Any refusal means: no AMX kernel.
    static const bool ok = [] {
        if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return false;
        unsigned long bits = 0;
        if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &bits) != 0) return false;
        return ((bits >> 18) & 1) != 0;
    }();
    return ok;
#endif
}

struct alignas(64) TileConfig {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// Tiles: 0-3 C (16 x 16 fp32), 4-5 A (16 rows x Bp bf16), 6-7 B (Bp/2 rows x 16 pairs).
// The configuration is per thread: each worker loads it before its first tile instruction of
// each GEMM call and releases the tiles (TILERELEASE) when its share of the call is done, as
// oneDNN does after each primitive. Not cached across calls: other code on the same thread
// (oneDNN inside PyTorch or onnxruntime, a user's own tiles) may load its own configuration or
// release the tiles in between, and a stale configuration computes garbage without any fault.
// Released: a thread whose tile state is in use carries its 8 KB in every context switch and
// every signal frame (a signal handler on a small alternate stack cannot even be entered), so
// no thread -- the caller's included -- keeps it once the GEMM has returned.
static std::atomic<uint64_t> g_gemm_calls{0};
static thread_local uint64_t tl_config_call = 0;

static inline void ensure_config(int Bp, uint64_t call) {
    if (tl_config_call == call) return;
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; ++t) {
        cfg.rows[t] = MT;
        cfg.colsb[t] = HT * 4;
    }
    for (int t = 4; t < 6; ++t) {
        cfg.rows[t] = MT;
        cfg.colsb[t] = uint16_t(Bp * 2);
    }
    for (int t = 6; t < 8; ++t) {
        cfg.rows[t] = uint8_t(Bp / 2);
        cfg.colsb[t] = HT * 4;
    }
    BFP_MEM_BARRIER();
    _tile_loadconfig(&cfg);
    BFP_MEM_BARRIER();
    tl_config_call = call;
}

// The tiles back to their init state on this thread (the next call configures them again)
static inline void release_tiles() {
    BFP_MEM_BARRIER();
    _tile_release();
    BFP_MEM_BARRIER();
    tl_config_call = 0;
}

// Tests: whether this thread's tile state is in use, on each of up to nt OpenMP threads (the
// team the GEMM uses); XINUSE (XGETBV 1) bits 17-18 on the hardware, the emulation's state here.
bool tiles_in_use_for_tests(int nt) {
    if (!os_ready()) return false;
    bool any = false;
#pragma omp parallel num_threads(nt < 1 ? 1 : nt) reduction(|| : any)
    {
#ifdef BFP_AMX_EMULATED
        any = ::bfp_amx_emu::state().configured;
#else
        uint32_t lo, hi;
        __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(1));
        any = (lo >> 17 & 3) != 0;
#endif
    }
    return any;
}

// Tests: load another tile configuration on the calling thread, as other AMX code sharing the
// thread would (1 row x 4 bytes per tile); false when the tiles are not usable here.
bool load_foreign_config_for_tests() {
    if (!os_ready()) return false;
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 1;
        cfg.colsb[t] = 4;
    }
    BFP_MEM_BARRIER();
    _tile_loadconfig(&cfg);
    BFP_MEM_BARRIER();
    return true;
}

// ---------------------------------------------------------------- rows -> A tiles
// Row tile [r0, r0+mr) of the rows operand as bf16 values, [block][16 rows][Bp]; rows past mr
// are zero. Its exponent range into *rmin/*rmax.
static void gather_rows(const RowsView& R, int64_t r0, int mr, uint8_t* dst, int32_t* rmin, int32_t* rmax) {
    const int Bp = R.Bp, nbt = R.nbt;
    const size_t blk = size_t(MT) * Bp * 2;
    const int8_t* u = static_cast<const int8_t*>(R.u);
    for (int t = 0; t < R.taps; ++t) {
        for (int i = 0; i < MT; ++i) {
            if (i >= mr) {
                for (int bt = 0; bt < nbt; ++bt) std::memset(dst + (t * nbt + bt) * blk + i * Bp * 2, 0, size_t(Bp) * 2);
                continue;
            }
            const int64_t pix = R.roff[r0 + i] + R.toff[t];
            const int8_t* src = u + pix * nbt * Bp;
            const float* sc = R.scale + pix * nbt;
            for (int bt = 0; bt < nbt; ++bt) {
                uint8_t* d = dst + (t * nbt + bt) * blk + i * Bp * 2;
                const __m512 s = _mm512_set1_ps(sc[bt]);
                for (int k = 0; k < Bp; k += 16) {
                    // (intrinsics SIMDe also has) units -> fp32 values -> their high halves, the
                    // signed-saturating pack being exact on the arithmetic shift's range
                    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + bt * Bp + k));
                    const __m512i w = _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(x));
                    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(w), s);
                    const __m256i h = _mm512_cvtsepi32_epi16(_mm512_srai_epi32(_mm512_castps_si512(f), 16));
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + k * 2), h);
                }
            }
        }
    }
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int i = 0; i < mr; ++i) {
        if (R.emin[r0 + i] < mn) mn = R.emin[r0 + i];
        if (R.emax[r0 + i] > mx) mx = R.emax[r0 + i];
    }
    *rmin = mn;
    *rmax = mx;
}

// The bf16 tile path is exact when every operand value, product and partial sum is a normal
// fp32 (or zero) and no sum overflows (see the file comment).
static inline bool tile_is_exact_bf16(int32_t rmin, int32_t rmax, int32_t cmin, int32_t cmax, int bits) {
    if (rmin > rmax || cmin > cmax) return true;  // a side with only zero/NaN blocks
    return rmin >= -126 && cmin >= -126 && rmin + cmin >= -126 && rmax + cmax + bits <= 127;
}

// ---------------------------------------------------------------- the tile loop
// acc[i] (row i of a 16x16 output tile) += the block sums of A x B over nb blocks. A: row
// tile base (block stride 16*Bp*2, row stride 2*Bp); B: panel half base (block stride Bp*64,
// row stride 64); cbuf: 4 x 16 x 16 floats (64-byte aligned).
#define BFP_AMX_COMPUTE(CT, AT, BT, s)                                         \
    if ((s) < nb) {                                                            \
        _tile_loadd(AT, A + size_t(s) * astep, arow);                          \
        _tile_loadd(BT, B + size_t(s) * bstep, 64);                            \
        _tile_zero(CT);                                                        \
        _tile_dpbf16ps(CT, AT, BT);                                            \
    }
#define BFP_AMX_STORE(CT, s)                                                   \
    if ((s) >= 0 && (s) < nb) {                                                \
        BFP_MEM_BARRIER();                                                     \
        _tile_stored(CT, cbuf + ((s) & 3) * 256, 64);                          \
        BFP_MEM_BARRIER();                                                     \
    }
#define BFP_AMX_ADD(s)                                                         \
    if ((s) >= 0 && (s) < nb) {                                                \
        const float* cb = cbuf + ((s) & 3) * 256;                              \
        _Pragma("GCC unroll 16") for (int i = 0; i < MT; ++i)                  \
            acc[i] = _mm512_add_ps(acc[i], _mm512_load_ps(cb + 16 * i));       \
        BFP_MEM_BARRIER();                                                     \
    }

template <int Bp>
static inline void tile_k(const uint8_t* A, const uint8_t* B, int nb, float* cbuf, __m512 (&acc)[MT]) {
    const size_t astep = size_t(MT) * Bp * 2, bstep = size_t(Bp) * 64;
    const int arow = Bp * 2;
    BFP_MEM_BARRIER();  // A and B were written by ordinary stores
    for (int s0 = 0; s0 < nb + 3; s0 += 4) {
        BFP_AMX_COMPUTE(0, 4, 6, s0)
        BFP_AMX_STORE(2, s0 - 2)
        BFP_AMX_ADD(s0 - 3)
        BFP_AMX_COMPUTE(1, 5, 7, s0 + 1)
        BFP_AMX_STORE(3, s0 - 1)
        BFP_AMX_ADD(s0 - 2)
        BFP_AMX_COMPUTE(2, 4, 6, s0 + 2)
        BFP_AMX_STORE(0, s0)
        BFP_AMX_ADD(s0 - 1)
        BFP_AMX_COMPUTE(3, 5, 7, s0 + 3)
        BFP_AMX_STORE(1, s0 + 1)
        BFP_AMX_ADD(s0)
    }
}

// One 16 x 16 output tile (mr rows, nc columns valid) over all blocks, written to out.
template <int Bp>
static void out_tile(const uint8_t* A, const uint8_t* B, int nb, float* cbuf, float* out, int64_t ldo, int mr,
                     int nc, bool trans, const VecEpilogue* ve) {
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    tile_k<Bp>(A, B, nb, cbuf, acc);
    if (ve) {  // the epilogue from the raw tile on the stack: the residual may be the output (epi_tile_t)
        alignas(64) float tmp[MT][HT];
        for (int i = 0; i < MT; ++i) _mm512_store_ps(tmp[i], acc[i]);
        epi_tile(*ve, &tmp[0][0], HT, out, mr, nc, ldo);  // never with trans
        return;
    }
    if (trans) transpose16(acc);  // acc[j]: column j
    if (mr == MT && nc == HT) {
        for (int i = 0; i < MT; ++i) _mm512_storeu_ps(out + i * ldo, acc[i]);
    } else {
        alignas(64) float tmp[MT][HT];
        for (int i = 0; i < MT; ++i) _mm512_store_ps(tmp[i], acc[i]);
        if (trans) {
            for (int j = 0; j < nc; ++j)
                for (int i = 0; i < mr; ++i) out[j * ldo + i] = tmp[j][i];
        } else {
            for (int i = 0; i < mr; ++i)
                for (int j = 0; j < nc; ++j) out[i * ldo + j] = tmp[i][j];
        }
    }
}

// ---------------------------------------------------------------- the VNNI kernel, panel by panel
struct ShiftedExact {
    ExactTile inner;
    int64_t r0, c0;
};

static void exact_shifted(const void* ctx, int64_t r0, int nr, int64_t c0, int nc, float* out, int64_t ldo) {
    const ShiftedExact& s = *static_cast<const ShiftedExact*>(ctx);
    s.inner.fn(s.inner.ctx, r0 + s.r0, nr, c0 + s.c0, nc, out, ldo);
}

// The VNNI kernel on prepacked AMX panels (the VNNI panel first in each): one call per
// (row chunk, panel), so that it walks its own panel layout; single-threaded calls, the
// items spread over the threads here.
static void vnni_by_panel(const GemmArgs& a, int nt) {
    const RowsView& R = a.rows;
    const ColsView& C = a.cols;
    const int64_t npanels = (C.N + NR - 1) / NR;
    const size_t pstride = panel_bytes(C.taps * C.nbt, C.Bp);
    int64_t rchunk = 384;  // rows per call (a multiple of the VNNI kernel's 6-row tiles)
    if (R.R * npanels < 4 * nt * rchunk) {
        rchunk = (R.R * npanels / (4 * nt) + 5) / 6 * 6;
        if (rchunk < 6) rchunk = 6;
    }
    const int64_t nrc = (R.R + rchunk - 1) / rchunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t it = 0; it < nrc * npanels; ++it) {
        const int64_t p = it % npanels, r0 = (it / npanels) * rchunk;
        const int64_t c0 = p * NR;
        const int nc = int((C.N - c0) < NR ? (C.N - c0) : NR);
        const ShiftedExact xs{a.exact, r0, c0};
        GemmArgs g = a;
        g.rows.R = (R.R - r0) < rchunk ? R.R - r0 : rchunk;
        g.rows.roff = R.roff + r0;
        g.rows.emin = R.emin + r0;
        g.rows.emax = R.emax + r0;
        g.cols.N = nc;
        g.cols.u = C.u + c0 * C.taps;
        g.cols.e = C.e + c0 * C.taps;
        g.cols.prepacked = C.prepacked + p * pstride;
        g.cols.pmin = C.pmin + p;
        g.cols.pmax = C.pmax + p;
        g.out = a.trans ? a.out + c0 * a.ldo + r0 : a.out + r0 * a.ldo + out_col(a.epi, c0);
        g.exact = ExactTile{&xs, exact_shifted};
        g.nthreads = 1;
        vnni::gemm(g);
    }
}

// ---------------------------------------------------------------- the driver
void gemm(const GemmArgs& a) {
    const RowsView& R = a.rows;
    const ColsView& C = a.cols;
    if (R.R == 0 || C.N == 0) return;
    const int nt = a.nthreads < 1 ? 1 : a.nthreads;
    const int Bp = R.Bp;
    if (!served(Bp)) return vnni::gemm(a);  // plain VNNI panels
    // The VNNI kernel where the tiles do not pay: fewer rows than one A tile (batch-1 dense
    // layers), or too few columns to amortize gathering the A tiles (measured break-even: ~4
    // panels); and sums beyond fp32's significand (not with int8 units and these blocks).
    if (R.R < MT || C.N <= 4 * NR || a.bits_s > 24) {
        if (C.prepacked) return vnni_by_panel(a, nt);
        return vnni::gemm(a);
    }
    const int nb = R.taps * R.nbt;
    const int64_t npanels = (C.N + NR - 1) / NR;

    // B: the AMX part of the prepacked panels, or packed here
    const uint8_t* bbase = C.prepacked;
    size_t pstride = panel_bytes(nb, Bp);
    const int32_t* pmin = C.pmin;
    const int32_t* pmax = C.pmax;
    uint8_t* own = nullptr;
    int32_t* own_range = nullptr;
    if (bbase) {
        bbase += vnni::panel_bytes(nb, Bp);
    } else {
        pstride = amx_bytes(nb, Bp);
        own = static_cast<uint8_t*>(std::aligned_alloc(64, npanels * pstride + 64));
        own_range = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * 2 * npanels + 8));
        int32_t* mn = own_range;
        int32_t* mx = own_range + npanels;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t p = 0; p < npanels; ++p) {
            const int64_t c0 = p * NR;
            const int nc = int((C.N - c0) < NR ? (C.N - c0) : NR);
            pack_amx(C, c0, nc, own + p * pstride, &mn[p], &mx[p]);
        }
        bbase = own;
        pmin = mn;
        pmax = mx;
    }

    // A: every row tile once
    const int64_t nrt = (R.R + MT - 1) / MT;
    const size_t astride = size_t(nb) * MT * Bp * 2;
    uint8_t* abuf = static_cast<uint8_t*>(std::aligned_alloc(64, nrt * astride + 64));
    int32_t* rrange = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * 2 * nrt + 8));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 2)  // a descheduled thread (shared machine) does not stall the rest
    for (int64_t rt = 0; rt < nrt; ++rt) {
        const int64_t r0 = rt * MT;
        const int mr = int((R.R - r0) < MT ? (R.R - r0) : MT);
        gather_rows(R, r0, mr, abuf + rt * astride, &rrange[rt], &rrange[nrt + rt]);
    }

    // Items: (group of row tiles) x (group of panels). Within one, each B half is reused by the
    // group's row tiles (from L1 while it fits), the group's A tiles by its panels (from L2).
    int64_t mg = 4, pg = 8;
    if (mg > nrt) mg = nrt;
    if (pg > npanels) pg = npanels;
    while (((nrt + mg - 1) / mg) * ((npanels + pg - 1) / pg) < 4 * nt && (pg > 1 || mg > 1)) {
        if (pg > 1) pg = (pg + 1) / 2;
        else mg = (mg + 1) / 2;
        if (pg == 1 && mg == 1) break;
    }
    const int64_t nrg = (nrt + mg - 1) / mg, npg = (npanels + pg - 1) / pg;
    const int64_t items = nrg * npg;
    const uint64_t call = g_gemm_calls.fetch_add(1, std::memory_order_relaxed) + 1;  // never 0

#pragma omp parallel num_threads(nt)
    {
    bool used = false;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; ++it) {
        alignas(64) float cbuf[4 * 256];
        ensure_config(Bp, call);
        used = true;
        const int64_t g = it / npg, q = it % npg;
        const int64_t rt0 = g * mg, rt1 = (rt0 + mg) < nrt ? rt0 + mg : nrt;
        const int64_t p0 = q * pg, p1 = (p0 + pg) < npanels ? p0 + pg : npanels;
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t c0 = p * NR;
            const int nc = int((C.N - c0) < NR ? (C.N - c0) : NR);
            const uint8_t* panel = bbase + p * pstride;
            for (int h = 0; h * HT < nc; ++h) {
                const int nch = (nc - h * HT) < HT ? nc - h * HT : HT;
                const uint8_t* B = panel + size_t(h) * (Bp / 2) * 64;
                for (int64_t rt = rt0; rt < rt1; ++rt) {
                    const int64_t r0 = rt * MT;
                    const int mr = int((R.R - r0) < MT ? (R.R - r0) : MT);
                    const int64_t cc = c0 + h * HT;
                    float* o = a.trans ? a.out + cc * a.ldo + r0 : a.out + r0 * a.ldo + out_col(a.epi, cc);
                    if (!tile_is_exact_bf16(rrange[rt], rrange[nrt + rt], pmin[p], pmax[p], a.bits_s)) {
                        float tmp[MT * HT];
                        exact_tile_epi(a.exact, a.epi, r0, mr, cc, nch, o, a.ldo, tmp);
                        continue;
                    }
                    const uint8_t* At = abuf + rt * astride;
                    if (Bp == 16) out_tile<16>(At, B, nb, cbuf, o, a.ldo, mr, nch, a.trans, a.epi);
                    else out_tile<32>(At, B, nb, cbuf, o, a.ldo, mr, nch, a.trans, a.epi);
                }
            }
        }
    }
    if (used) release_tiles();  // this thread's share is done (nowait: no barrier before it)
    }
    std::free(abuf);
    std::free(rrange);
    std::free(own);
    std::free(own_range);
}

}  // namespace BFP_AMX_NS
}  // namespace bfp

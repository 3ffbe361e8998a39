// AVX2 depthwise convolution (see DwArgs in bfp.h): NHWC, weights [taps][C], the input's
// element quantization (DwArgs::fq) and the epilogue fused.
//
// Numerics (the same as dwconv_nhwc in ops/conv.cpp, bit for bit): every output is the sum
// (((0 + x_t0*w_t0) + x_t1*w_t1) + ...) over the taps in order, each product rounded to fp32
// and then added (vmulps + vaddps); a padded tap adds 0 * w (a NaN/Inf weight still makes NaN).
//
// Blocking: a work item is (image, band of output rows, group of up to 64 channels). It first
// writes the input rows under its band, for its channels, into a tile of its own (quantized as
// one-element blocks with fq, else -- or with DwArgs::x_quantized -- copied), with zeros for the
// padding rows and columns and the lanes past its channels, so that the strips read every window
// without tests; with DwArgs::produce the rows come from the producer (a fused expansion conv
// computes them into planes of 16 channels, copied into the tile): the expanded input never goes
// through memory whole. A strip is 8 output pixels x 8 channels: 8 accumulators, the tap's
// weights loaded once for the 8 pixels.
// The epilogue (bias, residual, activation at the vector precision) is applied in registers
// before each store (epi_avx2.inc); a partial vector's channels get it over the row, in L1.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace avx2 {
namespace {

#include "epi_avx2.inc"

constexpr int kGroup = 64;  // channels an item takes (8 vectors)

struct Tile {
    const float* t;  // tile row r, pixel p, channel lane c at t[(r * wp + p) * cg + c]
    int64_t wp;
    int cg;  // channels a pixel (a multiple of 8)
};

// Fix up the elements of a quantized run that need the scalar path: element i of the run is
// element base + i of the input
struct RunFix {
    const DwArgs* a;
    int64_t base;
};
static float run_fix(const void* ctx, int64_t i) {
    const RunFix* r = static_cast<const RunFix*>(ctx);
    return r->a->fq_fix(r->a->fq_ctx, r->base + i);
}

// Output pixels [ox0, ox0 + NP) of output row oy (the band's row ry), channels [c, c + 8) of
// the group (tile lanes), the first nl stored to d (pixel ox0's channel c0 + c). VP >= 0 (nl == 8):
// the epilogue a.epi applied in registers at vector precision VP before the store, with b the
// bias of these channels (null: none).
template <int NP, int VP>
static inline void strip(const DwArgs& a, const Tile& T, int64_t ry, int64_t ox0, const float* w, int c, int nl,
                         float* d, const float* b) {
    __m256 acc[NP];
#pragma GCC unroll 8
    for (int j = 0; j < NP; ++j) acc[j] = _mm256_setzero_ps();
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nl), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int ky = 0; ky < a.kh; ++ky) {
        const float* xr = T.t + ((ry * a.sh + int64_t(ky) * a.dh) * T.wp + ox0 * a.sw) * T.cg + c;
        for (int kx = 0; kx < a.kw; ++kx) {
            const float* wt = w + int64_t(ky * a.kw + kx) * a.C;
            const __m256 wv = nl == 8 ? _mm256_loadu_ps(wt) : _mm256_maskload_ps(wt, m);
            const float* xp = xr + int64_t(kx) * a.dw * T.cg;
#pragma GCC unroll 8
            for (int j = 0; j < NP; ++j)
                acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(_mm256_loadu_ps(xp + j * a.sw * T.cg), wv));
        }
    }
    if constexpr (VP >= 0) {
        const VecEpilogue& e = *a.epi;  // (no element quantization or channel planes: see dwconv)
        const float* r = e.res ? e.res + (d - e.y) : nullptr;
        const __m256 vlo = _mm256_set1_ps(e.lo), vhi = _mm256_set1_ps(e.hi);
        if (b && !r && e.act == 2 && e.lo <= e.hi) {  // bias + clip: the GEMM epilogue's fast clip
            const __m256 bv = _mm256_loadu_ps(b), lo = rnd<VP>(vlo), hi = rnd<VP>(vhi);
#pragma GCC unroll 8
            for (int j = 0; j < NP; ++j) acc[j] = clip8(rnd<VP>(_mm256_add_ps(acc[j], bv)), lo, hi);
        } else {
#pragma GCC unroll 8
            for (int j = 0; j < NP; ++j) acc[j] = epi8<VP>(acc[j], b, r ? r + j * a.C : nullptr, e.act, vlo, vhi);
        }
    }
    if (nl == 8) {
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j) _mm256_storeu_ps(d + j * a.C, acc[j]);
    } else {
#pragma GCC unroll 8
        for (int j = 0; j < NP; ++j) _mm256_maskstore_ps(d + j * a.C, m, acc[j]);  // (unrolled: acc in registers)
    }
}

// Output row ry of the band (its floats at orow, channel c0 at orow[0]), channels [c, c + nl) of
// the group: strips of 8 pixels, the last one ending at the row's end (recomputing a few); a row
// shorter than 8 is one strip of its OW pixels (independent sums, not one chain a pixel)
template <int VP>
static void row_strips(const DwArgs& a, const Tile& T, int64_t ry, int64_t c0, int c, int nl, float* orow) {
    const float* w = a.w + c0 + c;
    const float* b = VP >= 0 && a.epi->bias ? a.epi->bias + (orow + c - a.epi->y) % a.epi->ldo : nullptr;
    float* d = orow + c;
    switch (a.OW < 8 ? a.OW : 8) {
        case 1: return strip<1, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 2: return strip<2, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 3: return strip<3, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 4: return strip<4, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 5: return strip<5, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 6: return strip<6, VP>(a, T, ry, 0, w, c, nl, d, b);
        case 7: return strip<7, VP>(a, T, ry, 0, w, c, nl, d, b);
        default: break;
    }
    for (int64_t ox = 0;; ox += 8) {
        if (ox + 8 > a.OW) ox = a.OW - 8;
        strip<8, VP>(a, T, ry, ox, w, c, nl, d + ox * a.C, b);
        if (ox + 8 == a.OW) break;
    }
}

// Walks a tile of `rows` input rows from row iy0, wp pixels of cg floats a row, at t: rows and
// columns outside the image become zeros; row(tr, iy) may fill a whole row itself (true), else
// px(tp, iy, ix) fills each pixel of it in the image
template <class Row, class Px>
static void walk_tile(const DwArgs& a, int64_t iy0, int64_t rows, int64_t wp, int cg, float* t, Row&& row, Px&& px) {
    for (int64_t r = 0; r < rows; ++r) {
        float* tr = t + r * wp * cg;
        const int64_t iy = iy0 + r;
        if (iy < 0 || iy >= a.H) {
            std::memset(tr, 0, sizeof(float) * size_t(wp * cg));
            continue;
        }
        if (row(tr, iy)) continue;
        for (int64_t p = 0; p < wp; ++p) {
            float* tp = tr + p * cg;
            const int64_t ix = p - a.pl;
            if (ix < 0 || ix >= a.W) {
                std::memset(tp, 0, sizeof(float) * size_t(cg));
                continue;
            }
            px(tp, iy, ix);
        }
    }
}

// The tile of a produced input (DwArgs::produce): the producer writes rows [lo, hi] of channel
// blocks [c0 / 16, ...) as planes of 16 floats a pixel, W pixels a row (lanes past C +0); they
// are copied into the tile's rows under the padding columns
static void fill_produced(const DwArgs& a, int64_t n, int64_t iy0, int64_t rows, int64_t wp, int64_t c0, int nc, int cg,
                          float* t) {
    const int64_t lo = std::max<int64_t>(iy0, 0), hi = std::min<int64_t>(iy0 + rows, a.H) - 1;
    const int64_t cb0 = c0 / 16, cb1 = (c0 + nc + 15) / 16, plane = (hi + 1 - lo) * a.W * 16;
    thread_local std::vector<float> planes;
    if (hi >= lo) {
        planes.resize(size_t(plane * (cb1 - cb0)));
        a.produce(a.produce_ctx, n, lo, hi, cb0, cb1, plane, planes.data(), nullptr);
    }
    walk_tile(a, iy0, rows, wp, cg, t, [](float*, int64_t) { return false; }, [&](float* tp, int64_t iy, int64_t ix) {
        const float* src = planes.data() + ((iy - lo) * a.W + ix) * 16;
        for (int64_t cb = cb0; cb < cb1; ++cb) {  // (a block's lanes past C are +0 as produced)
            const int off = int(cb - cb0) * 16, len = cg - off < 16 ? cg - off : 16;
            const float* sc = src + (cb - cb0) * plane;
            _mm256_storeu_ps(tp + off, _mm256_loadu_ps(sc));
            if (len == 16) _mm256_storeu_ps(tp + off + 8, _mm256_loadu_ps(sc + 8));
        }
    });
}

// The tile of image n's input rows under output rows [oy0, oy1), channels [c0, c0 + nc), in buf
// (this worker's), which holds the previous band's tile when kept > 0: its last `kept` rows, from
// row `from` on, are this tile's first ones -- moved up, not made again
static void fill_tile(const DwArgs& a, int64_t n, int64_t oy0, int64_t oy1, int64_t c0, int nc, int64_t kept,
                      int64_t from, std::vector<float>& buf, Tile* T) {
    const int cg = (nc + 7) / 8 * 8;
    const int64_t rows = (oy1 - oy0 - 1) * a.sh + int64_t(a.kh - 1) * a.dh + 1;
    const int64_t wp = (a.OW - 1) * a.sw + int64_t(a.kw - 1) * a.dw + 1;
    if (buf.size() < size_t(rows * wp * cg)) buf.resize(size_t(rows * wp * cg));  // (keeps the kept rows)
    if (kept) std::memmove(buf.data(), buf.data() + from * wp * cg, sizeof(float) * size_t(kept * wp * cg));
    *T = Tile{buf.data(), wp, cg};
    float* t = buf.data() + kept * wp * cg;
    const int64_t iy0 = oy0 * a.sh - a.pt + kept, nrows = rows - kept;
    if (a.produce) return fill_produced(a, n, iy0, nrows, wp, c0, nc, cg, t);
    // n elements of x from off into d: quantized with fq, else (or already quantized) copied
    auto put = [&](const int64_t off, int64_t len, float* d) {
        if (a.fq && !a.x_quantized) {
            const RunFix rf{&a, off};
            fake_quantize_elems(a.x + off, len, *a.fq, d, run_fix, &rf);
        } else {
            std::memcpy(d, a.x + off, sizeof(float) * size_t(len));
        }
    };
    // the group is every channel: the row's W pixels are one run in x and in the tile
    auto whole_row = [&](float* tr, int64_t iy) {
        if (cg != a.C) return false;
        const int64_t lo = std::min<int64_t>(a.pl, wp), hi = std::min<int64_t>(a.pl + a.W, wp);
        std::memset(tr, 0, sizeof(float) * size_t(lo * cg));
        std::memset(tr + hi * cg, 0, sizeof(float) * size_t((wp - hi) * cg));
        if (hi > lo) put(((n * a.H + iy) * a.W + (lo - a.pl)) * a.C, (hi - lo) * a.C, tr + lo * cg);
        return true;
    };
    walk_tile(a, iy0, nrows, wp, cg, t, whole_row, [&](float* tp, int64_t iy, int64_t ix) {
        put(((n * a.H + iy) * a.W + ix) * a.C + c0, nc, tp);
        if (cg > nc) std::memset(tp + nc, 0, sizeof(float) * size_t(cg - nc));
    });
}

}  // namespace

void dwconv(const DwArgs& a) {
    if ((a.produce || a.x_quantized) && !a.fq)
        throw std::invalid_argument("dwconv: a produced or already quantized input needs its format");
    if (a.oq && (!a.fq || !a.oq_neg || a.oq->C != a.C || (a.epi && a.epi->res)))
        throw std::invalid_argument("dwconv: a quantized output needs fq, oq_neg, C channels and no residual");
    if (a.N == 0 || a.OH == 0 || a.OW == 0 || a.C == 0) return;
    // a quantized output (DwArgs::oq): an item takes every channel (one group), as the quantizer
    // takes whole pixels (a pixel's exponent range spans its blocks)
    const int group = a.oq ? int((a.C + 7) / 8 * 8) : kGroup;
    const int64_t groups = (a.C + group - 1) / group;
    const int nt = num_threads() > 1 && a.N * a.OH * a.OW * a.C * a.kh * a.kw > 32768 ? num_threads() : 1;
    // Bands of output rows whose tile stays in L2 (<= 256 KiB): rows of (OW - 1) * sw + kw
    // pixels x the group's channels. An item is a run of consecutive bands of one (image,
    // group), which moves the rows two bands share ((kh - 1) * dh + 1 - sh) from the bottom of
    // its tile to the top instead of making them again; (image, group) pairs split into runs
    // only as far as the threads need items (each run makes its first band's shared rows anew).
    const int64_t row_floats = ((a.OW - 1) * a.sw + int64_t(a.kw - 1) * a.dw + 1) * group * a.sh;
    const int64_t band = std::max<int64_t>(1, std::min<int64_t>(a.OH, (int64_t(1) << 16) / std::max<int64_t>(1, row_floats)));
    const int64_t nband = (a.OH + band - 1) / band, have = a.N * groups;
    const int64_t runs = nt == 1 || have >= 2 * nt ? 1 : std::min(nband, (2 * nt + have - 1) / have);
    const int64_t per_run = (nband + runs - 1) / runs;
    // the epilogue in registers (whole vectors): its vector precision; -1: none, or the generic rows
    const int epi_vp = a.epi && a.epi->any() && !a.epi->fq && !a.epi->cbs ? a.epi->vp : -1;
    const int64_t shared_rows = int64_t(a.kh - 1) * a.dh + 1 - a.sh;  // (< 0: rows between bands skipped)
    parallel_for(nt, have * runs, [&](int64_t it) {
        const int64_t run = it % runs, gi = (it / runs) % groups, n = it / (runs * groups);
        const int64_t c0 = gi * group;
        const int nc = int(std::min<int64_t>(group, a.C - c0));
        thread_local std::vector<float> buf;  // this worker's tile
        // a quantized output: each row to this worker's row buffer (the epilogue re-based there:
        // the bias by channel), then through the quantizer into the operand while it is in L1
        thread_local std::vector<float> obuf;
        DwArgs ab;
        VecEpilogue eb;
        if (a.oq) {
            obuf.resize(size_t(a.OW * a.C));
            ab = a;
            ab.out = obuf.data();
            if (a.epi) {
                eb = *a.epi;
                eb.y = ab.out;
                ab.epi = &eb;
            }
        }
        const DwArgs& d = a.oq ? ab : a;
        bool neg = false;
        const int64_t b0 = run * per_run, b1 = std::min(nband, b0 + per_run);
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t oy0 = b * band, oy1 = std::min(a.OH, oy0 + band);
            // the previous band's tile (band * sh + shared_rows rows) ends with this one's first rows
            const int64_t kept = b > b0 && shared_rows > 0 ? shared_rows : 0;
            Tile T;
            fill_tile(a, n, oy0, oy1, c0, nc, kept, band * a.sh, buf, &T);
            for (int64_t oy = oy0; oy < oy1; ++oy) {
                float* orow = a.oq ? obuf.data() : a.out + ((n * a.OH + oy) * a.OW) * a.C + c0;
                for (int c = 0; c < nc; c += 8) {
                    const int nl = nc - c < 8 ? nc - c : 8;
                    const int vp = nl == 8 ? epi_vp : -1;
                    if (vp == 1) row_strips<1>(d, T, oy - oy0, c0, c, nl, orow);
                    else if (vp == 2) row_strips<2>(d, T, oy - oy0, c0, c, nl, orow);
                    else if (vp == 0) row_strips<0>(d, T, oy - oy0, c0, c, nl, orow);
                    else row_strips<-1>(d, T, oy - oy0, c0, c, nl, orow);
                    // the epilogue not applied in registers: over these channels of the row, in L1
                    if (d.epi && vp < 0) d.epi->rows(orow + c, int(a.OW), nl, a.C);
                }
                if (a.oq) quantize_rows_blocks(a.oq->rows_at(orow, (n * a.OH + oy) * a.OW, a.OW, a.C), &neg);
            }
        }
        if (neg) a.oq_neg->store(true, std::memory_order_relaxed);
    });
}

}  // namespace avx2
}  // namespace bfp

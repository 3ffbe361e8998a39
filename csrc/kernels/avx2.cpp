// AVX2 kernel: int16 units, vpmaddwd (exact: |units| <= 127 so pair sums never saturate).
// Compiled with -mavx2 -mfma. Rows are broadcast 2 units (int16) at a time; columns are
// packed into panels of NR=16. Per block: t = float(S) * col_scale, acc = fma(t, row_scale, acc)
// -- exact under the driver's per-tile range check, as in the AVX-512 kernel.
#include <immintrin.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "../bfp.h"
#include "../pool.h"

namespace bfp {
namespace avx2 {

#include "tile.inc"

#define MR_MAX 4
static constexpr int MR = 3;
static constexpr int KSTEP = 2;  // k values per int32 lane of a panel

// Panel layout, per block b: [Bp/2][NR][2] int8 (2 units of one column; sign-extended to int16
// on load, which halves the bytes a memory-bound batch-1 layer streams), then [NR] float scales.
size_t panel_bytes(int nb, int Bp) { return size_t(nb) * (size_t(Bp) * NR + NR * 4); }

void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    const int Bp = c.Bp, B2 = Bp / 2;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int t = 0; t < c.taps; ++t) {
        for (int bt = 0; bt < c.nbt; ++bt) {
            const int b = t * c.nbt + bt;
            int8_t* q = reinterpret_cast<int8_t*>(dst + b * bstride);
            float* sc = reinterpret_cast<float*>(dst + b * bstride + size_t(Bp) * NR);
            for (int j = 0; j < NR; ++j) {
                if (j >= ncols) {
                    for (int k2 = 0; k2 < B2; ++k2) q[(k2 * NR + j) * 2] = q[(k2 * NR + j) * 2 + 1] = 0;
                    sc[j] = 1.0f;
                    continue;
                }
                const int8_t* src = c.u[(col0 + j) * c.taps + t] + bt * Bp;
                int any = 0;
    #pragma GCC unroll 16
            for (int k2 = 0; k2 < B2; ++k2) {
                    q[(k2 * NR + j) * 2] = src[2 * k2];
                    q[(k2 * NR + j) * 2 + 1] = src[2 * k2 + 1];
                    any |= src[2 * k2] | src[2 * k2 + 1];
                }
                const int16_t e = c.e[(col0 + j) * c.taps + t][bt];
                sc[j] = block_scale(e, c.unit_shift, any == 0);
                if (e != kNanExp && any != 0) {
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

// KS > 0: the block's k-steps known at compile time (fully unrolled); 0: any block.
template <int mr, int KS>
static inline void run_tile_k(const RowsView& R, int64_t r0, const uint8_t* panel, float* out, int64_t ldo,
                            int nc, bool trans, const VecEpilogue*) {  // no fused epilogue (KernelDesc)
    const int Bp = R.Bp, B2 = KS > 0 ? KS : Bp / 2, nbt = R.nbt;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    __m256 acc0[mr], acc1[mr];
    for (int i = 0; i < mr; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int t = 0; t < R.taps; ++t) {
        const int16_t* ap[mr];
        const float* sp[mr];
        for (int i = 0; i < mr; ++i) {
            const int64_t pix = R.roff[r0 + i] + R.toff[t];
            ap[i] = static_cast<const int16_t*>(R.u) + pix * nbt * Bp;
            sp[i] = R.scale + pix * nbt;
        }
        for (int bt = 0; bt < nbt; ++bt) {
            const uint8_t* pb = panel + size_t(t * nbt + bt) * bstride;
            __m256i s0[mr], s1[mr];
            for (int i = 0; i < mr; ++i) s0[i] = s1[i] = _mm256_setzero_si256();
#pragma GCC unroll 16
            for (int k2 = 0; k2 < B2; ++k2) {
                const __m256i b0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32)));
                const __m256i b1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(pb + k2 * 32 + 16)));
                for (int i = 0; i < mr; ++i) {
                    int32_t w;
                    std::memcpy(&w, ap[i] + bt * Bp + 2 * k2, 4);
                    const __m256i av = _mm256_set1_epi32(w);
                    s0[i] = _mm256_add_epi32(s0[i], _mm256_madd_epi16(b0, av));
                    s1[i] = _mm256_add_epi32(s1[i], _mm256_madd_epi16(b1, av));
                    // keep each accumulator a running sum in one register: without this GCC
                    // reassociates the unrolled adds into a tree and spills every product
                    __asm__("" : "+x"(s0[i]), "+x"(s1[i]));
                }
            }
            const float* cs = reinterpret_cast<const float*>(pb + size_t(Bp) * NR);
            const __m256 c0 = _mm256_load_ps(cs), c1 = _mm256_load_ps(cs + 8);
            for (int i = 0; i < mr; ++i) {
                const __m256 ra = _mm256_set1_ps(sp[i][bt]);
                acc0[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s0[i]), c0), ra, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s1[i]), c1), ra, acc1[i]);
            }
        }
    }
    if (nc == NR && !trans) {
        for (int i = 0; i < mr; ++i) {
            _mm256_storeu_ps(out + i * ldo, acc0[i]);
            _mm256_storeu_ps(out + i * ldo + 8, acc1[i]);
        }
        return;
    }
    alignas(32) float tmp[mr][NR];
    for (int i = 0; i < mr; ++i) {
        _mm256_store_ps(tmp[i], acc0[i]);
        _mm256_store_ps(tmp[i] + 8, acc1[i]);
    }
    store_tile(tmp, nc, out, ldo, trans);
}


#include "driver.inc"

}  // namespace avx2
}  // namespace bfp

// AVX-512 VNNI kernel: int8 units, vpdpbusd. Compiled with -mavx512f/bw/vl/vnni + -mfma.
//
// Rows (activations of a matmul, weights of a conv) are broadcast 4 units at a time as the
// signed operand; columns are packed into panels of NR=32 as unsigned bytes (units + 128),
// so each block's integer sum is S = corr + sum(u8 * s8) with corr = -128 * sum(row units).
// Per block and output: t = float(S) * col_scale, acc = fma(t, row_scale, acc): the same bits
// as fp32(acc + fp32(S) * 2^(Ea+Eb-shifts)) whenever that product is exact, which the driver
// checks per tile (else it calls the exact fallback).
#ifdef BFP_AVX512_EMULATED
// Test-only build of this same file on SIMDe's portable AVX-512 (see CMake option
// BFPACCEL_AVX512_EMULATION): checks the kernel's logic bit for bit on CPUs without AVX-512.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define BFP_AVX512_NS avx512emu
#define BFP_PIN(a, b) ((void)0)
#else
// keep each accumulator a running sum in one register (no reassociation into a spilled tree)
#define BFP_PIN(a, b) __asm__("" : "+v"(a), "+v"(b))
#include <immintrin.h>
#define BFP_AVX512_NS avx512
#endif

#include <climits>
#include <cstdlib>
#include <cstring>

#include "../bfp.h"

namespace bfp {
namespace BFP_AVX512_NS {

#include "tile.inc"

#define MR_MAX 6
static constexpr int MR = 6;
static constexpr int KSTEP = 4;  // k values per int32 lane of a panel

// Panel layout, per block b: [Bp/4][NR] uint32 (4 biased bytes of one column), then [NR] float scales.
size_t panel_bytes(int nb, int Bp) { return size_t(nb) * (size_t(Bp) * NR + NR * 4); }

void pack_panel(const ColsView& c, int64_t col0, int ncols, uint8_t* dst, int32_t* emin, int32_t* emax) {
    const int Bp = c.Bp, B4 = Bp / 4;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    int32_t mn = INT32_MAX, mx = INT32_MIN;
    for (int t = 0; t < c.taps; ++t) {
        for (int bt = 0; bt < c.nbt; ++bt) {
            const int b = t * c.nbt + bt;
            uint32_t* q = reinterpret_cast<uint32_t*>(dst + b * bstride);
            float* sc = reinterpret_cast<float*>(dst + b * bstride + size_t(Bp) * NR);
            for (int j = 0; j < NR; ++j) {
                if (j >= ncols) {
                    for (int k4 = 0; k4 < B4; ++k4) q[k4 * NR + j] = 0x80808080u;
                    sc[j] = 1.0f;
                    continue;
                }
                const int8_t* src = c.u[(col0 + j) * c.taps + t] + bt * Bp;
                uint32_t any = 0;
    #pragma GCC unroll 16
            for (int k4 = 0; k4 < B4; ++k4) {
                    uint32_t w;
                    std::memcpy(&w, src + 4 * k4, 4);
                    any |= w;
                    q[k4 * NR + j] = w ^ 0x80808080u;  // s8 -> u8 + 128
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
                            int nc, bool trans) {
    const int Bp = R.Bp, B4 = KS > 0 ? KS : Bp / 4, nbt = R.nbt;
    const size_t bstride = size_t(Bp) * NR + NR * 4;
    __m512 acc0[mr], acc1[mr];
    for (int i = 0; i < mr; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    for (int t = 0; t < R.taps; ++t) {
        const int8_t* ap[mr];
        const float* sp[mr];
        const int32_t* cp[mr];
        for (int i = 0; i < mr; ++i) {
            const int64_t pix = R.roff[r0 + i] + R.toff[t];
            ap[i] = static_cast<const int8_t*>(R.u) + pix * nbt * Bp;
            sp[i] = R.scale + pix * nbt;
            cp[i] = R.corr + pix * nbt;
        }
        for (int bt = 0; bt < nbt; ++bt) {
            const uint8_t* pb = panel + size_t(t * nbt + bt) * bstride;
            __m512i s0[mr], s1[mr];
            for (int i = 0; i < mr; ++i) s0[i] = s1[i] = _mm512_set1_epi32(cp[i][bt]);
#pragma GCC unroll 16
            for (int k4 = 0; k4 < B4; ++k4) {
                const __m512i b0 = _mm512_load_si512(pb + k4 * 128);
                const __m512i b1 = _mm512_load_si512(pb + k4 * 128 + 64);
                for (int i = 0; i < mr; ++i) {
                    int32_t w;
                    std::memcpy(&w, ap[i] + bt * Bp + 4 * k4, 4);
                    const __m512i av = _mm512_set1_epi32(w);
                    s0[i] = _mm512_dpbusd_epi32(s0[i], b0, av);
                    s1[i] = _mm512_dpbusd_epi32(s1[i], b1, av);
                    BFP_PIN(s0[i], s1[i]);
                }
            }
            const __m512 c0 = _mm512_load_ps(reinterpret_cast<const float*>(pb + size_t(Bp) * NR));
            const __m512 c1 = _mm512_load_ps(reinterpret_cast<const float*>(pb + size_t(Bp) * NR + 64));
            for (int i = 0; i < mr; ++i) {
                const __m512 ra = _mm512_set1_ps(sp[i][bt]);
                acc0[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s0[i]), c0), ra, acc0[i]);
                acc1[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s1[i]), c1), ra, acc1[i]);
            }
        }
    }
    if (nc == NR && !trans) {
        for (int i = 0; i < mr; ++i) {
            _mm512_storeu_ps(out + i * ldo, acc0[i]);
            _mm512_storeu_ps(out + i * ldo + 16, acc1[i]);
        }
        return;
    }
    // edge and transposed tiles go through the stack (plain stores: no masked store, whose
    // emulation on other ISAs reads and rewrites the masked-off lanes)
    alignas(64) float tmp[mr][NR];
    for (int i = 0; i < mr; ++i) {
        _mm512_store_ps(tmp[i], acc0[i]);
        _mm512_store_ps(tmp[i] + 16, acc1[i]);
    }
    store_tile(tmp, nc, out, ldo, trans);
}


#include "driver.inc"

}  // namespace BFP_AVX512_NS
}  // namespace bfp

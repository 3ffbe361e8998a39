// Max pooling's per-pixel reduction for the AVX-512 kernels (KernelDesc::max_window): the
// NaN-propagating max of an output pixel's taps in tap order, the same bits as the portable
// per-tap loop (ops/pooling.cpp), 64 channels at a time in registers.
#include "isa512.h"  // native or emulated (avx512-emu) build

#include <cstring>
#include <limits>
#include <utility>

#include "../bfp.h"

namespace bfp {
namespace BFP_AVX512_NS {

#include "epi512.inc"

// acc = v > acc or v is NaN ? v : acc, lane by lane (max_into in ops/pooling.cpp)
static inline __m512 max_nan(__m512 acc, __m512 v) {
    return _mm512_mask_mov_ps(acc, _mm512_cmp_ps_mask(v, acc, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

void max_window(float* d, const float* const* src, int nt, int64_t C) {
    const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t c0 = 0;
    for (; c0 + 64 <= C; c0 += 64) {
        __m512 acc[4] = {lowest, lowest, lowest, lowest};
        for (int t = 0; t < nt; ++t)
            for (int j = 0; j < 4; ++j) acc[j] = max_nan(acc[j], _mm512_loadu_ps(src[t] + c0 + 16 * j));
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(d + c0 + 16 * j, acc[j]);
    }
    for (; c0 < C; c0 += 16) {  // the rest, a vector (or part of one) at a time
        const int n = int(C - c0 < 16 ? C - c0 : 16);
        __m512 acc = lowest;
        for (int t = 0; t < nt; ++t) acc = max_nan(acc, load_lanes(src[t] + c0, n));
        store_lanes(d + c0, acc, n);
    }
}

}  // namespace BFP_AVX512_NS
}  // namespace bfp

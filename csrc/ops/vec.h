// Helpers of the ops' executors: the vector precision's rounding (docs/numerics.md#vector-unit) as inline
// code the loops vectorise, dispatch on the precision, and the OpenMP work threshold.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

namespace bfp {

static inline uint32_t f2u(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
static inline float u2f(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

// fp32 -> nearest fp16 (ties to even, overflow to Inf, subnormals kept) -> fp32; branch-free
// so the loops that call it vectorise
__attribute__((always_inline)) static inline float rnd16(float x) {
    const uint32_t b = f2u(x), s = b & 0x80000000u, a = b & 0x7fffffffu;
    uint32_t r = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;  // normal: keep 10 fraction bits
    const uint32_t sub = f2u((u2f(a) + 0.5f) - 0.5f);          // below 2^-14: multiples of 2^-24
    r = a < 0x38800000u ? sub : r;
    r = a >= 0x477ff000u ? 0x7f800000u : r;                     // >= 65520 rounds to Inf
    r = a >= 0x7f800000u ? a : r;                               // Inf / NaN stay
    return u2f(s | r);
}

__attribute__((always_inline)) static inline float rnd_bf(float x) {
    const uint32_t b = f2u(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return u2f(b | 0x00400000u);  // NaN stays (quiet) NaN
    return u2f((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u);
}

// x rounded to vector precision VP
template <int VP>
__attribute__((always_inline)) static inline float R(float x) {
    if constexpr (VP == kVecFp16) return rnd16(x);
    else if constexpr (VP == kVecBf16) return rnd_bf(x);
    else return x;
}

// Calls f(std::integral_constant<int, vp>{}): a loop templated on the vector precision.
template <class F>
static void with_vp(int vp, F&& f) {
    if (vp == kVecFp16) f(std::integral_constant<int, kVecFp16>{});
    else if (vp == kVecBf16) f(std::integral_constant<int, kVecBf16>{});
    else f(std::integral_constant<int, kVecFp32>{});
}

// enough work to share among threads: a parallel region is a fork and a join, and on a machine
// shared with other processes the join waits for a descheduled thread (milliseconds), so loops
// of under ~a megabyte of memory traffic run on the calling thread
static inline bool par(int64_t work) { return work > (int64_t(1) << 18); }
// loops run by parallel_for (pool.h), whose caller never waits for a helper that has not
// started: worth sharing from far less work
static inline bool par_pool(int64_t work) { return work > 32768; }

}  // namespace bfp

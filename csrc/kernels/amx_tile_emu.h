// Scalar emulation of the AMX tile intrinsics the AMX kernel uses, so that amx.cpp's exact
// source runs (as the test-only kernel "amx-emu") on CPUs without AMX. Included by amx.cpp
// when BFP_AMX_EMULATED is defined, after the SIMD headers: it replaces the compiler's
// _tile_* intrinsics with calls into a per-thread tile state, like the hardware's.
//
// Semantics follow the ISA reference: palette 1, 8 tiles of up to 16 rows x 64 bytes, rows
// and bytes per row from the last _tile_loadconfig OF THIS THREAD (using a tile first aborts,
// so a kernel that forgets to configure a worker thread fails its tests here); loads zero the
// rest of a tile; TDPBF16PS treats denormal inputs as zero, flushes denormal results to zero
// and rounds to nearest even; TDPBSSD sums in wrapping int32. Shape mismatches abort.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace bfp_amx_emu {

struct TileState {
    bool configured;
    uint8_t rows[8];
    uint16_t colsb[8];
    alignas(64) uint8_t t[8][16 * 64];
};

inline TileState& state() {
    static thread_local TileState s;  // zero-initialised: not configured
    return s;
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "amx-emu: %s\n", what);
    std::abort();
}

inline TileState& need(int tile) {
    TileState& s = state();
    if (!s.configured) fail("tile used before _tile_loadconfig on this thread");
    if (tile < 0 || tile > 7) fail("tile register out of range");
    return s;
}

inline void loadconfig(const void* cfg) {
    const uint8_t* c = static_cast<const uint8_t*>(cfg);
    TileState& s = state();
    if (c[0] == 0) {  // palette 0: the init state
        std::memset(&s, 0, sizeof s);
        return;
    }
    if (c[0] != 1) fail("unsupported palette");
    for (int t = 0; t < 8; ++t) {
        s.colsb[t] = uint16_t(c[16 + 2 * t] | (c[17 + 2 * t] << 8));
        s.rows[t] = c[48 + t];
        if (s.rows[t] > 16 || s.colsb[t] > 64) fail("tile shape out of range");
    }
    std::memset(s.t, 0, sizeof s.t);
    s.configured = true;
}

inline void release() { std::memset(&state(), 0, sizeof(TileState)); }

inline void zero(int tile) { std::memset(need(tile).t[tile], 0, 16 * 64); }

inline void loadd(int tile, const void* base, long stride) {
    TileState& s = need(tile);
    std::memset(s.t[tile], 0, 16 * 64);
    for (int r = 0; r < s.rows[tile]; ++r)
        std::memcpy(s.t[tile] + r * 64, static_cast<const uint8_t*>(base) + r * stride, s.colsb[tile]);
}

inline void stored(int tile, void* base, long stride) {
    TileState& s = need(tile);
    for (int r = 0; r < s.rows[tile]; ++r)
        std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.t[tile] + r * 64, s.colsb[tile]);
}

inline float ftz(float x) { return std::fabs(x) < FLT_MIN ? std::copysign(0.0f, x) : x; }  // NaN passes

inline float bf16_in(const uint8_t* p) {  // a bf16 operand, denormals read as zero
    const uint32_t b = uint32_t(p[0] | (p[1] << 8)) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return ftz(f);
}

inline void check_dp(const TileState& s, int c, int a, int b) {
    if (s.rows[a] != s.rows[c] || s.colsb[b] != s.colsb[c] || s.rows[b] * 4 != s.colsb[a] || (s.colsb[a] & 3))
        fail("tile shapes do not match for a dot product");
}

// C[m][n] += sum over k of A[m][2k..2k+1] . B[k][2n..2n+1] (bf16 pairs, fp32 accumulate)
inline void dpbf16ps(int c, int a, int b) {
    TileState& s = need(c);
    need(a);
    need(b);
    check_dp(s, c, a, b);
    const int M = s.rows[c], N = s.colsb[c] / 4, K = s.colsb[a] / 4;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float acc;
            std::memcpy(&acc, s.t[c] + m * 64 + n * 4, 4);
            acc = ftz(acc);
            for (int k = 0; k < K; ++k)
                for (int h = 0; h < 2; ++h) {
                    // bf16 x bf16 fits fp32's significand; product and sum round once (RNE)
                    const float x = bf16_in(s.t[a] + m * 64 + k * 4 + 2 * h);
                    const float y = bf16_in(s.t[b] + k * 64 + n * 4 + 2 * h);
                    acc = ftz(std::fma(x, y, acc));
                }
            std::memcpy(s.t[c] + m * 64 + n * 4, &acc, 4);
        }
}

// C[m][n] += sum over k of A[m][4k..4k+3] . B[k][4n..4n+3] (int8 x int8, wrapping int32)
inline void dpbssd(int c, int a, int b) {
    TileState& s = need(c);
    need(a);
    need(b);
    check_dp(s, c, a, b);
    const int M = s.rows[c], N = s.colsb[c] / 4, K = s.colsb[a] / 4;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            uint32_t acc;
            std::memcpy(&acc, s.t[c] + m * 64 + n * 4, 4);
            for (int k = 0; k < K; ++k)
                for (int q = 0; q < 4; ++q)
                    acc += uint32_t(int32_t(int8_t(s.t[a][m * 64 + k * 4 + q])) * int32_t(int8_t(s.t[b][k * 64 + n * 4 + q])));
            std::memcpy(s.t[c] + m * 64 + n * 4, &acc, 4);
        }
}

}  // namespace bfp_amx_emu

// The compiler's intrinsics (macros, and inline functions that these macros now shadow).
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_dpbssd
#undef _tile_loadconfig
#undef _tile_release
#define _tile_loadconfig(cfg) ::bfp_amx_emu::loadconfig(cfg)
#define _tile_release() ::bfp_amx_emu::release()
#define _tile_zero(t) ::bfp_amx_emu::zero(t)
#define _tile_loadd(t, base, stride) ::bfp_amx_emu::loadd((t), (base), long(stride))
#define _tile_stored(t, base, stride) ::bfp_amx_emu::stored((t), (base), long(stride))
#define _tile_dpbf16ps(c, a, b) ::bfp_amx_emu::dpbf16ps((c), (a), (b))
#define _tile_dpbssd(c, a, b) ::bfp_amx_emu::dpbssd((c), (a), (b))

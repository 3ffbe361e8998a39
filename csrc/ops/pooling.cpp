// 2-D pooling: NHWC max / average windows, the result rounded to the vector precision.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "ops/vec.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

static void validate_pool(const Program& p, const Op& op, OpCheck& c) {
    const PoolParams& q = op.get<PoolParams>();
    const ConvGeometry& g = q.window;
    if (q.op < 0 || q.op >= kPoolCount) c.fail("unknown pool kind " + std::to_string(q.op));
    if (q.pad_with_value && q.op != kPoolMax) c.fail("pad_with_value is for max pools");
    c.ins(1);
    check_window(g, c);
    c.fits(op.in[0], c.mul(c.mul(g.batch, g.height), c.mul(g.width, g.channels)), "input");
    c.fits(op.out[0], c.mul(c.mul(g.batch, g.out_h), c.mul(g.out_w, g.channels)), "output");
    (void)p;
}

// d[c] = the NaN-propagating max / the sum of d[c] and s[c] (restrict: the loops vectorise; a
// clone per vector width, picked once from the CPU: both are exact, so every clone gives the
// same bits)
#define BFP_POOL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
BFP_POOL_CLONES static void max_into(float* __restrict d, const float* __restrict s, int64_t C) {
    for (int64_t c = 0; c < C; ++c) d[c] = (s[c] > d[c] || s[c] != s[c]) ? s[c] : d[c];
}
BFP_POOL_CLONES static void add_into(float* __restrict d, const float* __restrict s, int64_t C) {
    for (int64_t c = 0; c < C; ++c) d[c] = d[c] + s[c];
}

// The end of an output pixel: divided by div (average; div = 0: max), rounded to the vector
// precision, in one clone (at the CPU's vector width; the pool's own loop runs at the baseline)
BFP_POOL_CLONES static void pool_finish(float* __restrict d, int64_t C, float div, int vp) {
    if (div != 0.0f)
        for (int64_t c = 0; c < C; ++c) d[c] = d[c] / div;
    if (vp == kVecFp16) {
        for (int64_t c = 0; c < C; ++c) d[c] = rnd16(d[c]);
    } else if (vp == kVecBf16) {
        for (int64_t c = 0; c < C; ++c) d[c] = rnd_bf(d[c]);
    }
}

static void exec_pool(Program& p, const Op& op) {
    const PoolParams& q = op.get<PoolParams>();
    const ConvGeometry& g = q.window;
    const int64_t N = g.batch, H = g.height, W = g.width, C = g.channels, kh = g.kernel_h, kw = g.kernel_w;
    const int64_t sh = g.stride_h, sw = g.stride_w, pt = g.pad_top, pl = g.pad_left, pb = g.pad_bottom;
    const int64_t pr = g.pad_right, OH = g.out_h, OW = g.out_w, dh = g.dilation_h, dw = g.dilation_w;
    const bool cip = q.count_include_pad;
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const bool mx = q.op == kPoolMax;
    // a fused constant Pad: its positions are taps holding pad_value (one row of C of them)
    const bool pv = mx && q.pad_with_value;
    std::vector<float> padrow(pv ? size_t(C) : 0, q.pad_value);
    auto in_ring = [&](int64_t iy, int64_t ix) { return iy >= -pt && iy < H + pb && ix >= -pl && ix < W + pr; };
    if (kh * kw <= 64) {  // windows of up to 8x8 (ResNet's 3x3 max pool, global pools of 7x7)
        const int vp = p.vec_prec();
        // the kernel's max over a pixel's taps (registers, one call a pixel), else a pass per tap;
        // read here: the pool's threads below do not see this thread's session options
        const auto max_window = current_kernel().max_window;
        // an item is an output row, on the runtime's thread pool (its helper is the thread that
        // spins between a run's layers; an OpenMP team here would wait for a core while it does)
        const int nthr = par(N * OH * OW * C * kh * kw) ? num_threads() : 1;
        parallel_for(nthr, N * OH, [&](int64_t row) {
        for (int64_t p = row * OW; p < (row + 1) * OW; ++p) {
            const int64_t n = p / (OH * OW), oy = (p / OW) % OH, ox = p % OW;
            const float* src[64];
            int nt = 0;
            int64_t cnt = 0;
            for (int64_t ky = 0; ky < kh; ++ky) {
                const int64_t iy = oy * sh - pt + ky * dh;
                for (int64_t kx = 0; kx < kw; ++kx) {
                    const int64_t ix = ox * sw - pl + kx * dw;
                    if (iy >= 0 && iy < H && ix >= 0 && ix < W) {
                        src[nt++] = x + ((n * H + iy) * W + ix) * C;
                        ++cnt;
                    } else if (pv && in_ring(iy, ix)) {
                        src[nt++] = padrow.data();
                    } else if (cip && in_ring(iy, ix)) {
                        ++cnt;
                    }
                }
            }
            float* d = y + p * C;
            if (mx && max_window) {
                max_window(d, src, nt, C);
                pool_finish(d, C, 0.0f, vp);
                continue;
            }
            std::fill(d, d + C, mx ? -std::numeric_limits<float>::infinity() : 0.0f);
            for (int t = 0; t < nt; ++t) {
                if (mx) max_into(d, src[t], C);
                else add_into(d, src[t], C);
            }
            pool_finish(d, C, mx ? 0.0f : float(cnt ? cnt : 1), vp);
        }
        });
        return;
    }
    with_vp(p.vec_prec(), [&](auto V) {
        constexpr int vp = decltype(V)::value;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(N * OH * OW * C * kh * kw))
        for (int64_t p = 0; p < N * OH * OW; ++p) {
            const int64_t n = p / (OH * OW), oy = (p / OW) % OH, ox = p % OW;
            float* d = y + p * C;
            for (int64_t c = 0; c < C; ++c) d[c] = mx ? -std::numeric_limits<float>::infinity() : 0.0f;
            int64_t cnt = 0;
            for (int64_t ky = 0; ky < kh; ++ky) {
                const int64_t iy = oy * sh - pt + ky * dh;
                for (int64_t kx = 0; kx < kw; ++kx) {
                    const int64_t ix = ox * sw - pl + kx * dw;
                    const bool in = iy >= 0 && iy < H && ix >= 0 && ix < W;
                    if (!in) {
                        if (pv && in_ring(iy, ix)) max_into(d, padrow.data(), C);
                        else if (cip && in_ring(iy, ix)) ++cnt;
                        continue;
                    }
                    ++cnt;
                    const float* s = x + ((n * H + iy) * W + ix) * C;
                    if (mx) max_into(d, s, C);
                    else add_into(d, s, C);
                }
            }
            if (mx) {
                for (int64_t c = 0; c < C; ++c) d[c] = R<vp>(d[c]);
            } else {
                const float inv = float(cnt ? cnt : 1);
                for (int64_t c = 0; c < C; ++c) d[c] = R<vp>(d[c] / inv);
            }
        }
    });
}

BFP_REGISTER_OP(kOpPool, validate_pool, exec_pool);

}  // namespace bfp

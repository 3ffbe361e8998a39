// 2-D pooling: NHWC max / average windows, the result rounded to the vector precision.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "ops/vec.h"
#include "runtime.h"

namespace bfp {

// ip: N H W C kh kw sh sw pt pl pb pr OH OW count_include_pad dh dw
static void validate_pool(const Program& p, const Op& op, OpCheck& c) {
    const auto& q = op.ip;
    c.need_ip(17);
    if (op.sub < 0 || op.sub >= kPoolCount) c.fail("unknown pool kind " + std::to_string(op.sub));
    c.ins(1);
    for (int i : {4, 5, 6, 7, 15, 16}) c.pos(q[size_t(i)], "pool window, stride and dilation");
    for (int i = 8; i <= 11; ++i)
        if (q[size_t(i)] < 0) c.fail("negative padding");
    c.fits(op.in[0], c.mul(c.mul(q[0], q[1]), c.mul(q[2], q[3])), "input");
    c.fits(op.out[0], c.mul(c.mul(q[0], q[12]), c.mul(q[13], q[3])), "output");
    (void)p;
}

static void exec_pool(Program& p, const Op& op) {
    const auto& q = op.ip;
    // N H W C kh kw sh sw pt pl pb pr OH OW count_include_pad dh dw
    const int64_t N = q[0], H = q[1], W = q[2], C = q[3], kh = q[4], kw = q[5], sh = q[6], sw = q[7];
    const int64_t pt = q[8], pl = q[9], pb = q[10], pr = q[11], OH = q[12], OW = q[13], cip = q[14];
    const int64_t dh = q[15], dw = q[16];
    const float* x = p.buf(op.in[0]);
    float* y = p.buf(op.out[0]);
    const bool mx = op.sub == kPoolMax;
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
                        if (cip && iy >= -pt && iy < H + pb && ix >= -pl && ix < W + pr) ++cnt;
                        continue;
                    }
                    ++cnt;
                    const float* s = x + ((n * H + iy) * W + ix) * C;
                    if (mx) {
                        for (int64_t c = 0; c < C; ++c) d[c] = (s[c] > d[c] || s[c] != s[c]) ? s[c] : d[c];
                    } else {
                        for (int64_t c = 0; c < C; ++c) d[c] = d[c] + s[c];
                    }
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

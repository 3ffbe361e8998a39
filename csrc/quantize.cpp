// Block quantizer: the same arithmetic as reference.quantize_blocks, in C++
// (docs/numerics.md#shared-exponent, #element-rounding-and-saturation).
#include "quantize.h"

#include <cmath>
#include <cstring>

namespace bfp {

uint32_t stochastic_bits(uint64_t seed, uint64_t index) {
    uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    return uint32_t(z >> 32);
}

static inline int floor_log2(double v) {  // v > 0, exact
    int e;
    std::frexp(v, &e);
    return e - 1;
}

// Round the exact non-negative a to an integer (returned as double) by the format's mode.
static inline double round_mag(double a, int mode, uint32_t rnd) {
    const double ip = std::floor(a);
    const double f = a - ip;  // exact
    bool up;
    switch (mode) {
        case kNearestEven: up = f > 0.5 || (f == 0.5 && std::fmod(ip, 2.0) == 1.0); break;
        case kNearestAway: up = f >= 0.5; break;
        case kTowardZero: up = false; break;
        default: {
            const uint64_t frac32 = uint64_t(std::floor(f * 4294967296.0));
            up = frac32 + rnd >= (uint64_t(1) << 32);
        }
    }
    return up ? ip + 1.0 : ip;
}

int16_t quantize_block(const float* x, int64_t xs, int n, uint64_t idx0, int64_t idxs, const FmtParams& f,
                       uint64_t seed, int64_t* units) {
    float amax = 0.0f;
    bool finite = true;
    for (int k = 0; k < n; ++k) {
        const float v = x[k * xs];
        if (!std::isfinite(v)) {
            finite = false;
            break;
        }
        const float a = std::fabs(v);
        if (a > amax) amax = a;
    }
    if (!finite) {
        for (int k = 0; k < n; ++k) units[k] = 0;
        return kNanExp;
    }
    int E = f.exp_min;
    if (amax > 0.0f) {
        E = floor_log2(double(amax)) - f.emax_elem;
        if (E < f.exp_min) E = f.exp_min;
        if (E > f.exp_max) E = f.exp_max;
    }
    const bool stoch = f.rounding == kStochastic;
    const double maxu = double(f.max_units);
    if (f.kind == kInt) {
        const double scale = std::ldexp(1.0, f.unit_shift - E);
        for (int k = 0; k < n; ++k) {
            const double xv = double(x[k * xs]);
            const uint32_t r = stoch ? stochastic_bits(seed, idx0 + uint64_t(k * idxs)) : 0u;
            double q = round_mag(std::fabs(xv) * scale, f.rounding, r);
            if (q > maxu) q = maxu;
            const int64_t u = int64_t(q);
            units[k] = xv < 0 ? -u : u;
        }
    } else {
        const int m = f.mbits, emin_el = 1 - f.bias, unit_exp = 1 - f.bias - m;
        for (int k = 0; k < n; ++k) {
            const double xv = double(x[k * xs]);
            const double v = std::ldexp(std::fabs(xv), -E);
            const uint32_t r = stoch ? stochastic_bits(seed, idx0 + uint64_t(k * idxs)) : 0u;
            int binade = v > 0 ? floor_log2(v) : 0;
            if (binade < emin_el) binade = emin_el;
            const int qexp = binade - m;
            double q = round_mag(std::ldexp(v, -qexp), f.rounding, r);
            q = std::ldexp(q, qexp - unit_exp);
            if (q > maxu) q = maxu;
            const int64_t u = int64_t(q);
            units[k] = xv < 0 ? -u : u;
        }
    }
    return int16_t(E);
}

uint8_t encode_fp(int64_t units, const FmtParams& f) {
    const int m = f.mbits, e = f.ebits;
    const bool neg = units < 0;
    uint64_t n = uint64_t(neg ? -units : units);
    uint32_t code;
    if (n < (uint64_t(1) << m)) {
        code = uint32_t(n);
    } else {
        int k = 63 - __builtin_clzll(n) - m;  // n in [2^(m+k), 2^(m+k+1))
        code = uint32_t((k + 1) << m) | uint32_t((n >> k) - (uint64_t(1) << m));
    }
    if (neg && n != 0) code |= 1u << (e + m);
    return uint8_t(code);
}

int64_t decode_fp(uint8_t code, const FmtParams& f) {
    const int m = f.mbits, e = f.ebits;
    const int sign = (code >> (e + m)) & 1;
    const int expf = (code >> m) & ((1 << e) - 1);
    const int64_t mant = code & ((1 << m) - 1);
    const int64_t mag = expf == 0 ? mant : (((int64_t(1) << m) + mant) << (expf - 1));
    return sign ? -mag : mag;
}

UnitsLut::UnitsLut(const FmtParams& f) {
    for (int c = 0; c < 256; ++c)
        v[c] = f.kind == kInt ? int64_t(int8_t(uint8_t(c))) : decode_fp(uint8_t(c), f);
}

}  // namespace bfp

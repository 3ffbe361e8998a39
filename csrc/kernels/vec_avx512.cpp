// The vector unit's exp / erf / tanh loops and softmax rows (ops/vmath.h) compiled for AVX-512:
// the compiler vectorises the same IEEE float32 operations sixteen lanes wide (no contraction:
// -ffp-contract=off), so every result has the portable build's bits.
#include "../bfp.h"
#include "../ops/vmath.h"

namespace bfp {
namespace avx512 {

void fn_row(int fn, int vp, const float* x, float* y, int64_t n) { vm::fn_row(fn, vp, x, y, n); }
void softmax_row(int vp, const float* s, float* d, int64_t L) { vm::softmax_row(vp, s, d, L); }

}  // namespace avx512
}  // namespace bfp

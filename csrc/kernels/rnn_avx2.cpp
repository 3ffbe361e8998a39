// The recurrent cells' gate arithmetic (ops/rnn_cell.h) compiled for AVX2 + F16C: eight lanes
// of the same IEEE arithmetic as the portable build, bit for bit.
#include "../ops/rnn_cell.h"

namespace bfp {
namespace avx2 {

void rnn_row(int vp, int part, const RowCtx& r) {
    if (vp == kVecFp16) row_t<kVecFp16>(part, r);
    else if (vp == kVecBf16) row_t<kVecBf16>(part, r);
    else row_t<kVecFp32>(part, r);
}

}  // namespace avx2
}  // namespace bfp

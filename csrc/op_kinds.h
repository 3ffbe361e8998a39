// The program's op kinds and sub-op kinds, declared once. Each list gives the C++ enumerator
// and its Python name; the enums below are made from the lists, and bindings.cpp exposes the
// same lists to Python (_core.OpKind, _core.UnaryKind, ...), so no number is written twice.
// New entries go at the end of a list (numbers stay stable within a build; nothing stores them).
#pragma once

// op kinds: each has its parameter struct (op_params.h) and a validator and an executor in
// csrc/ops/ (BFP_REGISTER_OP)
#define BFP_OP_KINDS(X)                                                                                      \
    X(kOpConv, CONV, ConvParams)       /* NHWC conv / dense on the BFP core (or fp32), fused epilogue */     \
    X(kOpMatMul, MATMUL, MatMulParams) /* batched A x B, both run-time operands quantized along K */          \
    X(kOpGather, GATHER, GatherParams) /* entries of an axis picked by run-time indices (checked) */         \
    X(kOpWhere, WHERE, WhereParams)    /* broadcasting select: cond ? a : b (exact) */                        \
    X(kOpCompare, COMPARE, CompareParams) /* broadcasting comparisons and logic -> 0 / 1 (exact) */           \
    X(kOpExactUnary, EXACT_UNARY, ExactUnaryParams) /* Not, IsNaN, IsInf, casts to bool / int (exact) */     \
    X(kOpBinary, BINARY, BinaryParams) /* broadcasting elementwise */                                        \
    X(kOpUnary, UNARY, UnaryParams)    /* elementwise functions */                                           \
    X(kOpAffine, AFFINE, AffineParams) /* per-channel x * s + t (batch-norm not folded) */                   \
    X(kOpPool, POOL, PoolParams)       /* NHWC max / average pooling */                                      \
    X(kOpReduce, REDUCE, ReduceParams) /* (outer, R, inner) -> (outer, inner) */                             \
    X(kOpSoftmax, SOFTMAX, SoftmaxParams) /* (outer, L, inner) along L */                                    \
    X(kOpConcat, CONCAT, ConcatParams) /* (outer, L_i, inner) -> (outer, sum L_i, inner) */                  \
    X(kOpStrided, STRIDED, StridedParams) /* out[idx] = in[off + sum idx_a * stride_a] (transpose, slice) */ \
    X(kOpPad, PAD, PadParams)          /* constant padding */                                                \
    X(kOpCopy, COPY, CopyParams)                                                                              \
    X(kOpLayerNorm, LAYER_NORM, LayerNormParams) /* rows normalised by their mean and variance */           \
    X(kOpRecurrent, RECURRENT, RecurrentParams) /* one direction of an LSTM / GRU, its time loop inside */

#define BFP_BINARY_KINDS(X) X(kAdd, ADD) X(kSub, SUB) X(kMul, MUL) X(kDiv, DIV) X(kMax, MAX) X(kMin, MIN) X(kPow, POW)

#define BFP_UNARY_KINDS(X)                                                                                      \
    X(kRelu, RELU) X(kClip, CLIP) X(kSqrt, SQRT) X(kRecip, RECIPROCAL) X(kExp, EXP) X(kSigmoid, SIGMOID)        \
    X(kTanh, TANH) X(kNeg, NEG) X(kAbs, ABS) X(kLeakyRelu, LEAKY_RELU) X(kIdentity, IDENTITY) X(kLog, LOG)      \
    X(kErf, ERF) X(kHardSigmoid, HARD_SIGMOID) X(kHardSwish, HARD_SWISH) X(kSwish, SWISH) X(kRsqrt, RSQRT)     \
    X(kFloor, FLOOR) X(kCeil, CEIL) X(kGelu, GELU) X(kGeluTanh, GELU_TANH)

#define BFP_POOL_KINDS(X) X(kPoolMax, MAX) X(kPoolAvg, AVERAGE)

#define BFP_REDUCE_KINDS(X) \
    X(kRedSum, SUM) X(kRedMean, MEAN) X(kRedMax, MAX) X(kRedMin, MIN) X(kRedSumSquare, SUM_SQUARE) X(kRedL2, L2)

// kOpCompare: y = a op b as 0 / 1 (AND, OR, XOR: of a != 0 and b != 0)
#define BFP_COMPARE_KINDS(X)                                                                        \
    X(kCmpEqual, EQUAL) X(kCmpLess, LESS) X(kCmpLessEqual, LESS_EQUAL) X(kCmpGreater, GREATER)      \
    X(kCmpGreaterEqual, GREATER_EQUAL) X(kCmpAnd, AND) X(kCmpOr, OR) X(kCmpXor, XOR)
// kOpExactUnary: results that are exact (0 / 1 or an integer), never rounded
#define BFP_EXACT_KINDS(X)                                                                          \
    X(kExNot, NOT) X(kExIsNan, IS_NAN) X(kExIsInf, IS_INF) X(kExIsPosInf, IS_POS_INF)               \
    X(kExIsNegInf, IS_NEG_INF) X(kExNonzero, NONZERO) X(kExTrunc, TRUNC)

// vector precision (docs/numerics.md#vector-unit): every vector op rounds its result (RNE, IEEE overflow)
#define BFP_VEC_PRECS(X) X(kVecFp32, FP32) X(kVecFp16, FP16) X(kVecBf16, BF16)

// a recurrent op's cell (RecurrentParams::cell) and its activation functions (ONNX names)
#define BFP_RNN_CELLS(X) X(kCellLstm, LSTM) X(kCellGru, GRU)
#define BFP_RNN_ACTIVATIONS(X)                                                                                 \
    X(kRnnSigmoid, SIGMOID) X(kRnnTanh, TANH) X(kRnnRelu, RELU) X(kRnnHardSigmoid, HARD_SIGMOID)               \
    X(kRnnLeakyRelu, LEAKY_RELU) X(kRnnAffine, AFFINE) X(kRnnThresholdedRelu, THRESHOLDED_RELU)                \
    X(kRnnScaledTanh, SCALED_TANH) X(kRnnElu, ELU) X(kRnnSoftsign, SOFTSIGN) X(kRnnSoftplus, SOFTPLUS)

// a conv's fused activation (VecEpilogue::act)
#define BFP_ACTIVATIONS(X) X(kActNone, NONE) X(kActRelu, RELU) X(kActClip, CLIP)

namespace bfp {

#define BFP_ENUMERATOR(k, py) k,
#define BFP_OP_ENUMERATOR(k, py, params) k,
enum OpKind : int { BFP_OP_KINDS(BFP_OP_ENUMERATOR) kOpCount };
#undef BFP_OP_ENUMERATOR
enum BinaryKind : int { BFP_BINARY_KINDS(BFP_ENUMERATOR) kBinaryCount };
enum UnaryKind : int { BFP_UNARY_KINDS(BFP_ENUMERATOR) kUnaryCount };
enum PoolKind : int { BFP_POOL_KINDS(BFP_ENUMERATOR) kPoolCount };
enum ReduceKind : int { BFP_REDUCE_KINDS(BFP_ENUMERATOR) kReduceCount };
enum CompareKind : int { BFP_COMPARE_KINDS(BFP_ENUMERATOR) kCompareCount };
enum ExactKind : int { BFP_EXACT_KINDS(BFP_ENUMERATOR) kExactCount };
enum VecPrec : int { BFP_VEC_PRECS(BFP_ENUMERATOR) kVecCount };
enum Activation : int { BFP_ACTIVATIONS(BFP_ENUMERATOR) kActCount };
enum RnnCell : int { BFP_RNN_CELLS(BFP_ENUMERATOR) kCellCount };
enum RnnActivation : int { BFP_RNN_ACTIVATIONS(BFP_ENUMERATOR) kRnnActCount };
#undef BFP_ENUMERATOR

}  // namespace bfp

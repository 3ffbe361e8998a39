// The typed parameters of a program's ops: the boundary between the Python lowering and the
// C++ executors. Each struct is made from a field list F(type, name, doc); bindings.cpp gives
// every field a Python attribute and keyword argument of the same name (_core.UnaryParams(op=
// UnaryKind.RELU, count=16)), so nothing crosses the boundary by position. An op's parameter
// type names its kind (op_kinds.h); the op's validator (csrc/ops/) checks every value against
// the op's buffers before the op can run.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

#include "op_kinds.h"
#include "ops.h"

namespace bfp {

#define BFP_DECLARE_FIELD(type, name, doc) type name{};

// A 2-D window over NHWC data: a convolution's geometry, or a pooling window (out_channels ==
// channels, groups == 1).
#define BFP_FIELDS_ConvGeometry(F)                                                                  \
    F(int64_t, batch, "N") F(int64_t, channels, "input channels C") F(int64_t, height, "input H")   \
    F(int64_t, width, "input W") F(int64_t, out_channels, "output channels O")                      \
    F(int64_t, kernel_h, "kernel height") F(int64_t, kernel_w, "kernel width")                      \
    F(int64_t, stride_h, "vertical stride") F(int64_t, stride_w, "horizontal stride")               \
    F(int64_t, pad_top, "rows of padding above") F(int64_t, pad_left, "columns of padding left")    \
    F(int64_t, pad_bottom, "rows of padding below") F(int64_t, pad_right, "columns of padding right") \
    F(int64_t, dilation_h, "vertical dilation") F(int64_t, dilation_w, "horizontal dilation")       \
    F(int64_t, groups, "channel groups") F(int64_t, out_h, "output height") F(int64_t, out_w, "output width")
struct ConvGeometry {
    BFP_FIELDS_ConvGeometry(BFP_DECLARE_FIELD)
    // the kernels' geometry (call after validation: the narrow fields are in range)
    ConvGeom geom() const {
        return ConvGeom{batch, channels, height, width, int(groups), int(stride_h), int(stride_w), int(pad_top),
                        int(pad_left), int(pad_bottom), int(pad_right), int(dilation_h), int(dilation_w), out_h,
                        out_w};
    }
};

// kOpConv: x [N][H][W][C] -> y [N][OH][OW][O], weights in Op::w (BFP) or the buffer Op::wf (fp32
// [G][taps][Cg][Og]; depthwise: [taps][C]), bias Op::bias, residual Op::res
#define BFP_FIELDS_ConvParams(F)                                                                        \
    F(ConvGeometry, geometry, "the convolution's shapes, kernel, strides, padding, dilation, groups")  \
    F(bool, depthwise, "one channel per group, multiplier 1: one-element blocks in fp32")              \
    F(bool, quantize_input, "depthwise: fake-quantize the input to the format's one-element blocks")  \
    F(Activation, activation, "fused after bias and residual: NONE, RELU or CLIP")                    \
    F(float, clip_lo, "CLIP: lower bound") F(float, clip_hi, "CLIP: upper bound")                     \
    F(int64_t, share_input, "BFP convs: 0, or a slot in [1, 256] where the convs reading one input with " \
      "the same quantization keep its quantized operand for the run (made once, reused by the others)") \
    F(int64_t, expand_channels, "depthwise with quantize_input: 0, or the input channels of a fused 1x1 " \
      "expansion conv (stride 1, no padding or groups) whose output is this conv's input: the op's input " \
      "is the expansion's [N][H][W][expand_channels], Op::w its BFP weights, a second input its bias")  \
    F(Activation, expand_activation, "the fused expansion's activation: NONE, RELU or CLIP")            \
    F(float, expand_clip_lo, "the expansion's CLIP: lower bound")                                       \
    F(float, expand_clip_hi, "the expansion's CLIP: upper bound")                                        \
    F(bool, input_nchw, "BFP convs of at most 4 input channels without groups (a stem): the input is "   \
      "[N][C][H][W] as the network gives it, read on the kernel's stem path without a channels-last copy") \
    F(int64_t, quantize_output, "depthwise with quantize_input: 0, or the share_input slot of the BFP 1x1 " \
      "conv (stride 1, no padding or groups) that is this conv's only reader: where the kernel can, the " \
      "conv writes that conv's quantized input into the slot instead of writing its own output")        \
    F(bool, quantize_output_elements, "BFP convs without residual whose output's only reader is the "    \
      "depthwise conv with quantize_input that runs on it next: where the kernel takes that path "      \
      "(KernelDesc::dw_quantized_input), the epilogue quantizes every output last, as one-element "     \
      "blocks of the format, and that conv reads them as they are (the same bits)")
// kOpMatMul: Y[j] = A[a(j)] x B[b(j)] for every index j of batch_shape (row-major Y [batch][m][n]);
// a(j) = sum j_d * a_strides[d] picks one of A's a_count matrices [m][k] (0 strides: broadcast), b(j)
// one of B's b_count matrices, stored [k][n] or, b_transposed, [n][k]. Both operands are quantized
// at run time along k (A per row, B per column) and multiplied on the datapath of a dense layer.
#define BFP_FIELDS_MatMulParams(F)                                                                      \
    F(int64_t, m, "rows of A and Y") F(int64_t, k, "the reduced length") F(int64_t, n, "columns of B and Y") \
    F(std::vector<int64_t>, batch_shape, "Y's batch dimensions")                                       \
    F(std::vector<int64_t>, a_strides, "A's matrices per step of each batch dimension (0: broadcast)") \
    F(std::vector<int64_t>, b_strides, "B's matrices per step of each batch dimension (0: broadcast)") \
    F(int64_t, a_count, "matrices A holds") F(int64_t, b_count, "matrices B holds")                   \
    F(bool, b_transposed, "B's matrices are stored [n][k] (a transposed operand read in place)")
// kOpGather: y[o][i][r] = x[o][index_i][r] for o < outer, i < count, r < inner; an index is an integer
// in [-length, length) (negative: from the end), any other is an error naming `indices`
#define BFP_FIELDS_GatherParams(F)                                                                      \
    F(int64_t, outer, "") F(int64_t, length, "entries along the gathered axis") F(int64_t, inner, "")  \
    F(int64_t, count, "indices") F(std::string, indices, "what the indices are, for errors")
// kOpWhere: y[i] = c[i . c_strides] != 0 ? a[i . a_strides] : b[i . b_strides] over i in shape
#define BFP_FIELDS_WhereParams(F)                                                                       \
    F(std::vector<int64_t>, shape, "the output's shape") F(std::vector<int64_t>, c_strides, "")        \
    F(std::vector<int64_t>, a_strides, "") F(std::vector<int64_t>, b_strides, "")
// kOpCompare: y[i] = a[i . a_strides] op b[i . b_strides] over i in shape, 1 or 0
#define BFP_FIELDS_CompareParams(F)                                                                     \
    F(CompareKind, op, "the comparison") F(std::vector<int64_t>, shape, "the output's shape")          \
    F(std::vector<int64_t>, a_strides, "") F(std::vector<int64_t>, b_strides, "")
// kOpExactUnary: y[i] = f(x[i]), i < count, not rounded
#define BFP_FIELDS_ExactUnaryParams(F) F(ExactKind, op, "the function") F(int64_t, count, "elements")
// kOpBinary: y[i] = a[i . a_strides] op b[i . b_strides] over i in shape (row-major y)
#define BFP_FIELDS_BinaryParams(F)                                                                     \
    F(BinaryKind, op, "the operation") F(std::vector<int64_t>, shape, "the output's shape")            \
    F(std::vector<int64_t>, a_strides, "strides of a per output axis (0: broadcast)")                 \
    F(std::vector<int64_t>, b_strides, "strides of b per output axis (0: broadcast)")
// kOpUnary: y[i] = f(x[i]), i < count
#define BFP_FIELDS_UnaryParams(F)                                                                      \
    F(UnaryKind, op, "the function") F(int64_t, count, "elements")                                     \
    F(float, lo, "CLIP: lower bound") F(float, hi, "CLIP: upper bound")                                \
    F(float, alpha, "LEAKY_RELU: slope; HARD_SIGMOID: alpha") F(float, beta, "HARD_SIGMOID: beta")
// kOpAffine: x (outer, channels, inner) -> x * scale[c] + shift[c]
#define BFP_FIELDS_AffineParams(F)                                                                     \
    F(int64_t, outer, "") F(int64_t, channels, "") F(int64_t, inner, "")                               \
    F(std::vector<float>, scale, "one per channel") F(std::vector<float>, shift, "one per channel")
// kOpPool: NHWC windows
#define BFP_FIELDS_PoolParams(F)                                                                       \
    F(PoolKind, op, "MAX or AVERAGE") F(ConvGeometry, window, "shapes, window, strides, padding, dilation") \
    F(bool, count_include_pad, "AVERAGE: padded positions count in the divisor")                     \
    F(bool, pad_with_value, "MAX: padded positions hold pad_value (a constant Pad fused in), not skipped") \
    F(float, pad_value, "MAX with pad_with_value: the padding's value")
// kOpReduce: (outer, length, inner) -> (outer, inner)
#define BFP_FIELDS_ReduceParams(F) \
    F(ReduceKind, op, "the reduction") F(int64_t, outer, "") F(int64_t, length, "reduced") F(int64_t, inner, "")
// kOpSoftmax: (outer, length, inner) along length
#define BFP_FIELDS_SoftmaxParams(F) \
    F(bool, log, "LogSoftmax") F(int64_t, outer, "") F(int64_t, length, "normalised") F(int64_t, inner, "")
// kOpConcat: inputs (outer, lengths[i], inner) -> (outer, sum lengths, inner)
#define BFP_FIELDS_ConcatParams(F) \
    F(int64_t, outer, "") F(int64_t, inner, "") F(std::vector<int64_t>, lengths, "one per input")
// kOpStrided: y[i] = x[offset + i . strides] over i in shape (row-major y)
#define BFP_FIELDS_StridedParams(F)                                                                    \
    F(int64_t, offset, "of the first element read") F(std::vector<int64_t>, shape, "the output's shape") \
    F(std::vector<int64_t>, strides, "input strides per output axis (may be negative)")
// kOpPad: y (out_shape, filled with value) gets x (in_shape) at begin
#define BFP_FIELDS_PadParams(F)                                                                        \
    F(std::vector<int64_t>, in_shape, "") F(std::vector<int64_t>, out_shape, "")                      \
    F(std::vector<int64_t>, begin, "x's position in y per axis (negative: cropped)") F(float, value, "the fill")
// kOpCopy: y[i] = x[i], i < count
#define BFP_FIELDS_CopyParams(F) F(int64_t, count, "elements")
// kOpLayerNorm: each of `outer` rows of `length` -> (x - mean) / sqrt(var + epsilon) * scale + bias
#define BFP_FIELDS_LayerNormParams(F)                                                                  \
    F(int64_t, outer, "rows") F(int64_t, length, "elements per row (the normalised axes)")           \
    F(float, epsilon, "added to the variance") F(std::vector<float>, scale, "one per element of a row") \
    F(std::vector<float>, bias, "one per element of a row, or none")

// kOpRecurrent: one direction of an ONNX LSTM (gates i, o, f, c) or GRU (z, r, h) over the whole
// sequence. in: the input projection x_t W^T (+ Wb) of every step (gates of (t, b) at
// xg_offset + t * xg_step + b * xg_batch, contiguous), then initial_h and initial_c if given; out:
// Y, Y_h, Y_c as flagged (h of (t, b) at y_offset + t * y_step + b * y_batch; states of b at
// state_offset + b * state_batch, also for initial_h / initial_c). Recurrence weights [rows][H]:
// `recurrence` (BFP; GRU without linear_before_reset: the z and r rows, `recurrence_h` the h
// rows) or `recurrence_f32` ([H][gates * H], format fp32).
#define BFP_FIELDS_RecurrentParams(F)                                                                  \
    F(RnnCell, cell, "LSTM or GRU") F(int64_t, seq_len, "T") F(int64_t, batch, "B")                    \
    F(int64_t, hidden, "H") F(bool, reverse, "the direction runs from the last step")                  \
    F(bool, linear_before_reset, "GRU") F(bool, input_forget, "LSTM: f = 1 - i")                        \
    F(bool, has_clip, "clip the activations' inputs") F(float, clip, "to [-clip, clip]")                \
    F(std::vector<RnnActivation>, activations, "f, g (, h)")                                             \
    F(std::vector<float>, alpha, "one per activation") F(std::vector<float>, beta, "one per activation") \
    F(std::vector<float>, recurrence_bias, "Rb: gates * H, or none")                                   \
    F(std::vector<float>, peephole, "LSTM: P (i, o, f): 3 * H, or none")                               \
    F(std::vector<int64_t>, lengths, "per batch entry, in [0, T], or none (all T)")                    \
    F(int64_t, xg_offset, "") F(int64_t, xg_step, "") F(int64_t, xg_batch, "")                        \
    F(bool, has_initial_h, "") F(bool, has_initial_c, "") F(bool, has_y, "") F(bool, has_y_h, "")      \
    F(bool, has_y_c, "") F(int64_t, y_offset, "") F(int64_t, y_step, "") F(int64_t, y_batch, "")       \
    F(int64_t, state_offset, "") F(int64_t, state_batch, "")                                           \
    F(std::shared_ptr<Operand>, recurrence, "BFP: packed [rows][H] (convw)")                          \
    F(std::shared_ptr<Operand>, recurrence_h, "BFP GRU, linear_before_reset 0: the h rows")            \
    F(std::vector<float>, recurrence_f32, "fp32: [H][gates * H]")

#define BFP_DECLARE_PARAMS(k, py, P) \
    struct P {                       \
        BFP_FIELDS_##P(BFP_DECLARE_FIELD) static constexpr OpKind kind = k; \
    };
BFP_OP_KINDS(BFP_DECLARE_PARAMS)
#undef BFP_DECLARE_PARAMS

// One op's parameters: the alternative names the kind (index kind + 1; monostate: none).
#define BFP_PARAMS_ALTERNATIVE(k, py, P) , P
using OpParams = std::variant<std::monostate BFP_OP_KINDS(BFP_PARAMS_ALTERNATIVE)>;
#undef BFP_PARAMS_ALTERNATIVE
#define BFP_PARAMS_INDEX(k, py, P) \
    static_assert(std::is_same_v<std::variant_alternative_t<size_t(k) + 1, OpParams>, P>, "params order");
BFP_OP_KINDS(BFP_PARAMS_INDEX)
#undef BFP_PARAMS_INDEX

}  // namespace bfp

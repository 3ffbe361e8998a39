// The plan executor: a whole network as a flat list of ops over planned float buffers, run in
// C++ (no per-node Python). The Python side (bfpaccel.runtime) lowers a compiled plan for one
// set of input shapes into this list: layouts, shapes and buffers are all decided there, so
// every op here is a plain loop nest over physical (contiguous) memory.
//
// Each op kind is implemented in one file per family under csrc/ops/ (a validator that checks
// every size the op will touch, and an executor), registered in the op table with
// BFP_REGISTER_OP; Program dispatches through that table.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "op_kinds.h"
#include "op_params.h"
#include "ops.h"

namespace bfp {

float round_fp16(float x);
float round_bf16(float x);
void round_vec(float* x, int64_t n, int vp);

struct Op {
    OpParams params;             // the kind's parameters (op_params.h): their type names the kind
    std::vector<int> in, out;    // buffer ids
    std::shared_ptr<Operand> w;  // conv: BFP weights (packed once)
    int wf = -1;                 // conv: constant buffer of fp32 weights [G][taps][Cg][Og] (depthwise [taps][C])
    int bias = -1, res = -1;     // conv: bias constant, residual input buffer
    std::string name;            // the ONNX node, for errors and profiles
    // ConvParams::quantize_output, linked by Program::add_op when the reading conv is added: the
    // producer holds that conv's weights (the operand's layout), the reader knows its input may
    // exist only as the operand in its share_input slot
    std::shared_ptr<Operand> reader_w;
    bool input_from_producer = false;
    // ConvParams::quantize_output_elements, linked by Program::add_op when the depthwise conv
    // reading the output is added: the producer quantizes its output's elements for that conv
    // (elems_to_reader), which reads them as they are (elems_from_producer) -- both only where
    // the kernel takes the path (elems_in_producer, ops/conv.cpp)
    bool elems_to_reader = false;
    bool elems_from_producer = false;

    int kind() const { return int(params.index()) - 1; }  // an OpKind; -1: no parameters
    template <class P>
    const P& get() const { return std::get<P>(params); }  // the parameters of an op of kind P::kind
};

class Program;

// What a validator checks an op with: every failure is std::invalid_argument naming the op.
class OpCheck {
  public:
    OpCheck(const Program& p, const Op& op) : p_(p), op_(op), where_("op " + op.name + ": ") {}
    [[noreturn]] void fail(const std::string& m) const;
    void entries(size_t got, size_t want, const char* what) const;  // a list of `want` entries
    void ins(size_t n) const;                              // at least n inputs and one output
    int64_t mul(int64_t a, int64_t b) const;               // a * b, both >= 0, no overflow
    int64_t prod(const int64_t* d, int n) const;           // product of n sizes
    void fits(int id, int64_t n, const char* what) const;  // buffer id exists and holds n floats
    void pos(int64_t v, const char* what) const;           // v >= 1
    int rank(size_t r) const;                              // r <= 64
    void range(int64_t v, int64_t lo, int64_t hi, const char* what) const;  // lo <= v <= hi

  private:
    const Program& p_;
    const Op& op_;
    std::string where_;
};

// A conv's or pool's window (ops/conv.cpp): sizes, kernel, strides, dilations and padding in range.
void check_window(const ConvGeometry& g, OpCheck& c);

// One op kind's implementation (csrc/ops/*.cpp): validate throws for any op whose parameters
// or buffers do not fit (run once, when the op is added); exec runs it. Both get ops whose
// parameters are the kind's struct (Op::get<...Params>()).
struct OpImpl {
    void (*validate)(const Program& p, const Op& op, OpCheck& c);
    void (*exec)(Program& p, const Op& op);
};
bool register_op(int kind, OpImpl impl);  // at static initialisation; throws if registered twice
const OpImpl* find_op(int kind);          // null: unknown kind

#define BFP_REGISTER_OP(kind, validate, exec) \
    static const bool bfp_registered_##kind = ::bfp::register_op(kind, ::bfp::OpImpl{validate, exec})

class Program {
  public:
    Program(int vec_prec, bool has_fmt, const FmtParams& fx, uint64_t seed)
        : vp_(vec_prec), has_fmt_(has_fmt), fx_(fx), seed_(seed) {}

    int add_buffer(int64_t n);                              // zero-filled scratch / output
    int add_const(const float* data, int64_t n);            // copied
    int alias(int id);                                      // the same memory under another id
    void add_op(Op op);

    // inputs are copied into their buffers; returns copies of the output buffers
    void run(const std::vector<std::pair<int, const float*>>& inputs);
    const float* data(int id) const { return bufs_[size_t(slot_[size_t(id)])].data(); }
    int64_t size(int id) const { return int64_t(bufs_[size_t(slot_[size_t(id)])].size()); }
    size_t num_ops() const { return ops_.size(); }
    std::vector<double> last_times() const { return times_; }
    std::vector<double> last_gemm_times() const { return gemm_times_; }  // the integer kernel's share of each op
    std::vector<int> op_kinds() const {
        std::vector<int> v;
        for (const Op& o : ops_)  // -1: depthwise conv
            v.push_back(o.kind() == kOpConv && o.get<ConvParams>().depthwise ? -1 : o.kind());
        return v;
    }
    std::vector<std::string> op_names() const;
    void set_profile(bool on) { profile_ = on; }
    std::mutex mu;  // one run at a time per program

    // for the ops' executors
    float* buf(int id) { return bufs_[size_t(slot_[size_t(id)])].data(); }
    int vec_prec() const { return vp_; }
    bool has_format() const { return has_fmt_; }
    const FmtParams& format() const { return fx_; }
    uint64_t seed() const { return seed_; }
    FloatVec& scratch() { return scratch_; }  // reused across ops and runs
    // ConvParams::share_input's slots: a conv's quantized activation, kept until its input buffer
    // is written or the run ends (the buffers themselves are kept across runs)
    ConvActs* shared_acts(int64_t slot) { return shared_[size_t(slot - 1)].get(); }  // slot in [1, 256]
    void note_reused() { ++reused_; }
    int last_reused() const { return reused_; }  // convs of the last run that reused a shared activation
    void note_stem() { ++stems_; }
    int last_stems() const { return stems_; }  // convs of the last run on the kernel's stem path

  private:
    int vp_;
    bool has_fmt_;
    FmtParams fx_;
    uint64_t seed_;
    bool profile_ = false;
    std::vector<FloatVec> bufs_;  // 64-byte aligned
    std::vector<int> slot_;
    std::vector<Op> ops_;
    std::vector<const OpImpl*> impls_;  // ops_[i]'s implementation
    std::vector<double> times_, gemm_times_;
    FloatVec scratch_;
    std::vector<std::unique_ptr<ConvActs>> shared_;
    int reused_ = 0;
    int stems_ = 0;
};

// fp32 reference conv (format "fp32"): NHWC, weights [G][taps][Cg][Og], sequential sums over
// (tap, channel) per output.
void conv2d_fp32_nhwc(const float* x, const float* w, const ConvGeom& g, int64_t O, int kh, int kw, float* out);
// depthwise conv (C groups of one channel, multiplier 1), NHWC, weights [taps][C]
void dwconv_nhwc(const float* x, const float* w, const ConvGeom& g, int kh, int kw, float* out);

}  // namespace bfp

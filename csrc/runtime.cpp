// The plan executor (see runtime.h): buffers, the op table and the generic run loop. The ops
// themselves live in csrc/ops/, one file per family.
#include "runtime.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "ops/vec.h"

namespace bfp {

// ---------------------------------------------------------------- vector precision
float round_fp16(float x) { return rnd16(x); }
float round_bf16(float x) { return rnd_bf(x); }

void round_vec(float* x, int64_t n, int vp) {
    if (vp == kVecFp16) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (n > 65536)
        for (int64_t i = 0; i < n; ++i) x[i] = rnd16(x[i]);
    } else if (vp == kVecBf16) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (n > 65536)
        for (int64_t i = 0; i < n; ++i) x[i] = rnd_bf(x[i]);
    }
}

// ---------------------------------------------------------------- the op table
namespace {
struct Table {
    std::array<OpImpl, kOpCount> impl{};
    std::array<bool, kOpCount> set{};
};
Table& table() {
    static Table t;  // built on first use: safe from any file's static initialisation
    return t;
}
}  // namespace

bool register_op(int kind, OpImpl impl) {
    if (kind < 0 || kind >= kOpCount) throw std::logic_error("register_op: op kind out of range");
    Table& t = table();
    if (t.set[size_t(kind)])
        throw std::logic_error("register_op: op kind " + std::to_string(kind) + " registered twice");
    if (!impl.validate || !impl.exec) throw std::logic_error("register_op: an op needs a validator and an executor");
    t.impl[size_t(kind)] = impl;
    t.set[size_t(kind)] = true;
    return true;
}

const OpImpl* find_op(int kind) {
    if (kind < 0 || kind >= kOpCount) return nullptr;
    const Table& t = table();
    return t.set[size_t(kind)] ? &t.impl[size_t(kind)] : nullptr;
}

// ---------------------------------------------------------------- checks
void OpCheck::fail(const std::string& m) const { throw std::invalid_argument(where_ + m); }

void OpCheck::entries(size_t got, size_t want, const char* what) const {
    if (got != want)
        fail(std::string(what) + " has " + std::to_string(got) + " entries, needs " + std::to_string(want));
}

void OpCheck::ins(size_t n) const {
    if (op_.in.size() < n || op_.out.empty()) fail("missing inputs or outputs");
}

int64_t OpCheck::mul(int64_t a, int64_t b) const {
    constexpr int64_t kMax = int64_t(1) << 40;  // elements: far beyond any buffer
    if (a < 0 || b < 0) fail("negative size");
    if (a != 0 && b > kMax / a) fail("size overflows");
    return a * b;
}

int64_t OpCheck::prod(const int64_t* d, int n) const {
    int64_t p = 1;
    for (int i = 0; i < n; ++i) p = mul(p, d[i]);
    return p;
}

void OpCheck::fits(int id, int64_t n, const char* what) const {
    if (id < 0) fail(std::string("missing ") + what);
    if (n < 0) fail("negative size");
    if (p_.size(id) < n)
        fail(std::string(what) + " buffer holds " + std::to_string(p_.size(id)) + " floats, needs " +
             std::to_string(n));
}

void OpCheck::pos(int64_t v, const char* what) const {
    if (v < 1) fail(std::string(what) + " must be >= 1");
}

int OpCheck::rank(size_t r) const {
    if (r > 64) fail("rank out of range");
    return int(r);
}

void OpCheck::range(int64_t v, int64_t lo, int64_t hi, const char* what) const {
    if (v < lo || v > hi)
        fail(std::string(what) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
             std::to_string(v));
}

// ---------------------------------------------------------------- program
int Program::add_buffer(int64_t n) {
    bufs_.emplace_back(size_t(std::max<int64_t>(n, 1)), 0.0f);
    slot_.push_back(int(bufs_.size()) - 1);
    return int(slot_.size()) - 1;
}

int Program::add_const(const float* data, int64_t n) {
    const int id = add_buffer(n);
    if (n) std::memcpy(bufs_.back().data(), data, sizeof(float) * size_t(n));
    return id;
}

int Program::alias(int id) {
    if (id < 0 || size_t(id) >= slot_.size()) throw std::invalid_argument("alias: unknown buffer");
    slot_.push_back(slot_[size_t(id)]);
    return int(slot_.size()) - 1;
}

// Every size an op will read or write is checked against its parameters and buffers once,
// here: a forged or inconsistent program is an error, never a read out of bounds.
void Program::add_op(Op op) {
    auto check = [&](int id) {
        if (id < -1 || id >= int(slot_.size())) throw std::invalid_argument("op " + op.name + ": unknown buffer");
    };
    for (int id : op.in) check(id);
    for (int id : op.out) check(id);
    check(op.bias);
    check(op.res);
    check(op.wf);
    OpCheck c(*this, op);
    if (op.kind() < 0) c.fail("has no parameters");
    const OpImpl* impl = find_op(op.kind());
    if (!impl) c.fail("unknown op kind " + std::to_string(op.kind()));
    impl->validate(*this, op, c);
    if (op.kind() == kOpConv) {
        const ConvParams& q = op.get<ConvParams>();
        const int64_t slot = std::max(q.share_input, q.quantize_output);
        while (slot > 0 && shared_.size() < size_t(slot)) shared_.push_back(std::make_unique<ConvActs>());
        // a BFP conv reading the output of the last op that quantizes its output into this
        // conv's slot (ConvParams::quantize_output), no op between them using the slot: the two
        // are linked (unlinked, the producer writes its output as usual)
        if (q.share_input && op.w && !op.in.empty())
            for (size_t j = ops_.size(); j-- > 0;) {
                Op& pr = ops_[j];
                if (pr.kind() != kOpConv) continue;
                const ConvParams& pq = pr.get<ConvParams>();
                if (pq.quantize_output == q.share_input && !pr.reader_w &&
                    slot_[size_t(pr.out[0])] == slot_[size_t(op.in[0])]) {
                    pr.reader_w = op.w;
                    op.input_from_producer = true;
                }
                if (pq.quantize_output == q.share_input || pq.share_input == q.share_input) break;
            }
        // a depthwise conv that quantizes its input, made by the last op writing that buffer: a
        // BFP conv with quantize_output_elements (no residual) quantizes it for this conv
        if (q.depthwise && q.quantize_input && !q.expand_channels && !op.in.empty())
            for (size_t j = ops_.size(); j-- > 0;) {
                Op& pr = ops_[j];
                if (std::find_if(pr.out.begin(), pr.out.end(), [&](int o) { return slot_[size_t(o)] == slot_[size_t(op.in[0])]; }) ==
                    pr.out.end())
                    continue;  // (not the writer of the input)
                if (pr.kind() == kOpConv && pr.out.size() == 1 && pr.w && pr.res < 0 && !pr.elems_to_reader) {
                    const ConvParams& pq = pr.get<ConvParams>();
                    if (pq.quantize_output_elements && !pq.depthwise && !pq.expand_channels)
                        pr.elems_to_reader = op.elems_from_producer = true;
                }
                break;
            }
    }
    ops_.push_back(std::move(op));
    impls_.push_back(impl);
}

std::vector<std::string> Program::op_names() const {
    std::vector<std::string> v;
    for (const Op& o : ops_) v.push_back(o.name);
    return v;
}

void Program::run(const std::vector<std::pair<int, const float*>>& inputs) {
    for (const auto& in : inputs) {
        float* d = buf(in.first);
        std::memcpy(d, in.second, sizeof(float) * bufs_[size_t(slot_[size_t(in.first)])].size());
    }
    times_.assign(profile_ ? ops_.size() : 0, 0.0);
    gemm_times_.assign(profile_ ? ops_.size() : 0, 0.0);
    // shared activations never outlive the run, nor a write to the buffer they were made from
    for (auto& a : shared_) a->valid = false;
    reused_ = 0;
    stems_ = 0;
    for (size_t i = 0; i < ops_.size(); ++i) {
        if (profile_) {
            const GemmTimer gt(&gemm_times_[i]);
            const auto t0 = std::chrono::steady_clock::now();
            impls_[i]->exec(*this, ops_[i]);
            times_[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        } else {
            impls_[i]->exec(*this, ops_[i]);
        }
        // (except the slot the op has just filled from its own output: quantize_output)
        const int64_t made = ops_[i].kind() == kOpConv ? ops_[i].get<ConvParams>().quantize_output : 0;
        for (size_t s = 0; s < shared_.size(); ++s) {
            ConvActs& a = *shared_[s];
            if (a.valid && int64_t(s) + 1 != made)
                for (int id : ops_[i].out)
                    if (a.key.x == data(id)) a.valid = false;
        }
    }
}

}  // namespace bfp

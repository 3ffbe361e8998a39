// The one bindings file: numpy arrays and named parameter structs in, kernels called with the
// GIL released. The structs (FmtParams, ConvGeometry, the ops' *Params) and enums are bound
// from their declarations' field and value lists (op_params.h, op_kinds.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "ops.h"
#include "pool.h"
#include "runtime.h"

namespace py = pybind11;
using namespace bfp;

namespace {

using f32arr = py::array_t<float, py::array::c_style>;
using i8arr = py::array_t<int8_t, py::array::c_style>;
using i16arr = py::array_t<int16_t, py::array::c_style>;

// The fields of bfp::FmtParams (bfp.h), in the order of formats.Format.kernel_params().
#define BFP_FIELDS_FmtParams(F)                                                                         \
    F(int, block, "elements per block") F(int, kind, "element kind: ElemKind.INT or ElemKind.FP")     \
    F(int, mbits, "p of int(p), m of fp(e, m)") F(int, ebits, "e of fp(e, m)")                        \
    F(int, bias, "element exponent bias (fp)") F(int, specials, "0 none, 1 NaN only (E4M3), 2 Inf + NaN (E5M2)") \
    F(int, unit_shift, "value = units * 2^(E - unit_shift)") F(int64_t, max_units, "largest |units|")  \
    F(int, exp_min, "smallest shared exponent") F(int, exp_max, "largest shared exponent")            \
    F(int, emax_elem, "largest element exponent") F(int, rounding, "a Rounding")

// A format's parameters as every kernel entry point takes them: checked once here.
const FmtParams& checked(const FmtParams& f) {
    if (f.block < 1 || f.block > 4096) throw std::invalid_argument("block must be in [1, 4096]");
    if (f.kind != kInt && f.kind != kFp) throw std::invalid_argument("element kind must be ElemKind.INT or FP");
    if (f.rounding < kNearestEven || f.rounding > kStochastic) throw std::invalid_argument("unknown rounding");
    if (f.specials < 0 || f.specials > 2) throw std::invalid_argument("specials must be 0, 1 or 2");
    return f;
}

// the positional form (formats.Format.kernel_params()), accepted wherever FmtParams is; its
// values are checked where it is used (ValueError)
FmtParams from_tuple(const py::tuple& t) {
    if (t.size() != 12) throw std::invalid_argument("format parameters must be a 12-tuple (Format.kernel_params())");
    FmtParams f{};
    int i = 0;
#define BFP_FROM_TUPLE(type, name, doc) f.name = t[size_t(i++)].cast<type>();
    BFP_FIELDS_FmtParams(BFP_FROM_TUPLE)
#undef BFP_FROM_TUPLE
    return f;
}

// One field of a struct set from a Python value: a TypeError naming the field when it does not fit.
template <class T>
void set_field(T& dst, py::handle v, const char* cls, const char* name) {
    try {
        dst = v.cast<T>();
    } catch (const py::cast_error&) {
        throw py::type_error(std::string(cls) + "." + name + ": cannot take " + std::string(py::repr(v)));
    }
}

// Binds a struct made from a field list: an attribute per field, keyword-only construction
// (unknown names are a TypeError), a readable repr.
#define BFP_PY_FIELD(type, name, doc) c.def_readwrite(#name, &Self::name, doc);
#define BFP_PY_SET(type, name, doc) \
    if (k == #name) { set_field(t.name, item.second, cls, #name); continue; }
#define BFP_PY_REPR(type, name, doc) \
    r += std::string(sep) + #name "=" + std::string(py::repr(py::cast(t.name))); sep = ", ";
#define BFP_BIND_STRUCT(S, DOC)                                                                    \
    [&]() {                                                                                        \
        using Self = S;                                                                            \
        py::class_<S> c(m, #S, DOC);                                                               \
        BFP_FIELDS_##S(BFP_PY_FIELD)                                                               \
        c.def(py::init([](const py::kwargs& kw) {                                                  \
                  const char* cls = #S;                                                            \
                  S t{};                                                                           \
                  for (auto item : kw) {                                                           \
                      const std::string k = py::str(item.first);                                   \
                      BFP_FIELDS_##S(BFP_PY_SET)                                                   \
                      throw py::type_error(std::string(cls) + ": unknown field '" + k + "'");      \
                  }                                                                                \
                  return t;                                                                        \
              }),                                                                                  \
              "Keyword arguments set the fields of the same names; the others are zero.");       \
        c.def("__repr__", [](const S& t) {                                                         \
            std::string r = #S "(";                                                                \
            const char* sep = "";                                                                  \
            BFP_FIELDS_##S(BFP_PY_REPR)                                                            \
            return r + ")";                                                                        \
        });                                                                                        \
        return c;                                                                                  \
    }()

void check3(const py::array& a, const char* what, int64_t d0, int64_t d1, int64_t d2) {
    if (a.ndim() != 3 || a.shape(0) != d0 || a.shape(1) != d1 || a.shape(2) != d2)
        throw std::invalid_argument(std::string(what) + " has the wrong shape");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "bfpaccel C++ core: block-floating-point quantization, GEMM and convolution";

    // the program's op kinds and sub-op kinds (op_kinds.h): Python reads their numbers from here
#define BFP_PY_VALUE(k, py) .value(#py, k)
#define BFP_PY_OP_VALUE(k, py, params) .value(#py, k)
    py::enum_<OpKind>(m, "OpKind", py::arithmetic(), "Kinds of program ops (one executor each)")
        BFP_OP_KINDS(BFP_PY_OP_VALUE);
#undef BFP_PY_OP_VALUE
    py::enum_<BinaryKind>(m, "BinaryKind", py::arithmetic(), "Broadcasting elementwise ops")
        BFP_BINARY_KINDS(BFP_PY_VALUE);
    py::enum_<UnaryKind>(m, "UnaryKind", py::arithmetic(), "Elementwise functions") BFP_UNARY_KINDS(BFP_PY_VALUE);
    py::enum_<PoolKind>(m, "PoolKind", py::arithmetic(), "2-D pooling") BFP_POOL_KINDS(BFP_PY_VALUE);
    py::enum_<ReduceKind>(m, "ReduceKind", py::arithmetic(), "Reductions") BFP_REDUCE_KINDS(BFP_PY_VALUE);
    py::enum_<CompareKind>(m, "CompareKind", py::arithmetic(), "Comparisons and logic (0 / 1 results)")
        BFP_COMPARE_KINDS(BFP_PY_VALUE);
    py::enum_<ExactKind>(m, "ExactKind", py::arithmetic(), "Exact unary functions (not rounded)")
        BFP_EXACT_KINDS(BFP_PY_VALUE);
    py::enum_<VecPrec>(m, "VecPrec", py::arithmetic(), "Vector precisions (docs/numerics.md#vector-unit)")
        BFP_VEC_PRECS(BFP_PY_VALUE);
    py::enum_<Activation>(m, "Activation", py::arithmetic(), "A conv's fused activation") BFP_ACTIVATIONS(BFP_PY_VALUE);
    py::enum_<RnnCell>(m, "RnnCell", py::arithmetic(), "Recurrent cells") BFP_RNN_CELLS(BFP_PY_VALUE);
    py::enum_<RnnActivation>(m, "RnnActivation", py::arithmetic(), "Activation functions of recurrent cells")
        BFP_RNN_ACTIVATIONS(BFP_PY_VALUE);
#undef BFP_PY_VALUE
    py::enum_<ElemKind>(m, "ElemKind", py::arithmetic(), "Block element kinds").value("INT", kInt).value("FP", kFp);
    py::enum_<Rounding>(m, "Rounding", py::arithmetic(), "Rounding modes (formats.ROUNDING_MODES)")
        .value("NEAREST_EVEN", kNearestEven)
        .value("NEAREST_AWAY", kNearestAway)
        .value("TOWARD_ZERO", kTowardZero)
        .value("STOCHASTIC", kStochastic);

    // typed parameters (op_params.h): a block format, a conv / pool window, each op kind's
    BFP_BIND_STRUCT(FmtParams, "A block format's parameters, as the kernels take them (see formats.Format)")
        .def(py::init(&from_tuple), py::arg("kernel_params"), "From the 12-tuple of Format.kernel_params()")
        .def_property_readonly("simd_elements", &FmtParams::simd_elements,
                               "one-element blocks of an int(p) format with deterministic rounding (what the "
                               "element quantizers and ConvParams.quantize_output take)");
    py::implicitly_convertible<py::tuple, FmtParams>();
    BFP_BIND_STRUCT(ConvGeometry, "A 2-D window over NHWC data: a convolution's geometry or a pooling window");
#define BFP_PY_PARAMS(k, pyname, P)                                                                    \
    BFP_BIND_STRUCT(P, "Parameters of an OpKind." #pyname " op")                                       \
        .def_property_readonly_static("kind", [](py::object) { return k; }, "the op kind these parameters make");
    BFP_OP_KINDS(BFP_PY_PARAMS)
#undef BFP_PY_PARAMS

    m.def("set_num_threads", &set_num_threads, py::arg("n"));
    m.def("get_num_threads", &num_threads);
    m.def("max_threads", &max_threads);
    m.def("available_kernels", &available_kernels);
    // tests only: load another tile configuration on the calling thread, as oneDNN or a user's own
    // AMX code would ("amx" needs the hardware; "amx-emu" exists in emulation builds)
    m.def("_amx_load_foreign_config", [](const std::string& kernel) {
        const auto names = available_kernels();
        if (std::find(names.begin(), names.end(), kernel) == names.end()) return false;
        if (kernel == "amx") return amx::load_foreign_config_for_tests();
#ifdef BFPACCEL_HAVE_AVX512_EMU
        if (kernel == "amx-emu") return amxemu::load_foreign_config_for_tests();
#endif
        return false;
    }, py::arg("kernel"));
    // tests only: the largest num_threads() that the items of a parallel loop of n items on
    // `threads` threads see (1: nested loops and OpenMP regions in an item stay on its thread)
    m.def("_threads_in_items", [](int threads, int64_t n) {
        std::atomic<int> most{0};
        {
            ExecScope scope(&current_kernel(), threads);
            parallel_for(threads, n, [&](int64_t) {
                const int t = num_threads();
                int m = most.load();
                while (t > m && !most.compare_exchange_weak(m, t)) {
                }
            });
        }
        return most.load();
    }, py::arg("threads"), py::arg("n"));
    // tests only: whether a thread of the kernel's OpenMP team (up to `threads`, the caller's
    // included) still holds tile state after a GEMM returned
    m.def("_amx_tiles_in_use", [](const std::string& kernel, int threads) {
        const auto names = available_kernels();
        if (std::find(names.begin(), names.end(), kernel) == names.end()) return false;
        if (kernel == "amx") return amx::tiles_in_use_for_tests(threads);
#ifdef BFPACCEL_HAVE_AVX512_EMU
        if (kernel == "amx-emu") return amxemu::tiles_in_use_for_tests(threads);
#endif
        return false;
    }, py::arg("kernel"), py::arg("threads") = 1);
    // tests and benchmarks: how the AVX-512 GEMM tiles scale block sums ("fma" or "add_pipes";
    // the same bits either way), None: this CPU's choice; returns the mode in force
    m.def("_tile_scaling", [](std::optional<std::string> mode) {
        if (mode) {
            if (*mode != "fma" && *mode != "add_pipes" && *mode != "auto")
                throw py::value_error("tile scaling: 'fma', 'add_pipes' or 'auto', not '" + *mode + "'");
            const int m = *mode == "fma" ? 0 : *mode == "add_pipes" ? 1 : -1;
            avx512::set_tile_scaling(m);
#ifdef BFPACCEL_HAVE_AVX512_EMU
            avx512emu::set_tile_scaling(m);
#endif
        }
        return std::string(avx512::tile_scaling() == 1 ? "add_pipes" : "fma");
    }, py::arg("mode") = py::none());
    m.def("kernel_names", []() {
        std::vector<std::string> v;
        for (int i = 0; i < kernel_count(); ++i) v.push_back(kernel_at(i).name);
        return v;
    }, "every kernel of this build, slowest first (available or not)");
    m.def("get_kernel", []() { return std::string(current_kernel().name); });
    m.def("kernel_fuses_epilogue", []() { return current_kernel().fused_epilogue; },
          "whether the kernel in use applies a conv's bias / residual / activation to each tile itself");
    m.def("kernel_has_stem_path", []() { return current_kernel().stem_conv != nullptr; },
          "whether the kernel in use has a path of its own for convs of <= 4 input channels (StemArgs)");
    m.def("set_kernel", [](std::optional<std::string> s) { set_kernel(s ? &find_kernel(*s) : nullptr); },
          py::arg("name"));

    // Session options: `with _core.ExecOptions("avx512", 2): ...` makes this thread's calls use
    // that kernel and thread count (None / 0: the process defaults), the process untouched.
    struct ExecOptions {
        const KernelDesc* k = nullptr;
        int threads = 0;
        std::unique_ptr<ExecScope> scope;
    };
    py::class_<ExecOptions>(m, "ExecOptions", "Per-call kernel and thread count (a context manager)")
        .def(py::init([](std::optional<std::string> kernel, int threads) {
                 auto o = std::make_unique<ExecOptions>();
                 if (kernel) o->k = &find_kernel(*kernel);
                 if (threads != 0 && (threads < 1 || threads > max_threads()))
                     throw std::invalid_argument("number of threads must be in [1, " + std::to_string(max_threads()) + "]");
                 o->threads = threads;
                 return o;
             }),
             py::arg("kernel") = py::none(), py::arg("threads") = 0)
        .def("__enter__", [](ExecOptions& o) {
            if (o.scope) throw std::runtime_error("ExecOptions is already entered");
            o.scope = std::make_unique<ExecScope>(o.k, o.threads);
            return &o;
        }, py::return_value_policy::reference)
        .def("__exit__", [](ExecOptions& o, py::args) { o.scope.reset(); })
        .def_property_readonly("kernel", [](const ExecOptions& o) { return o.k ? std::string(o.k->name) : std::string(current_kernel().name); })
        .def_property_readonly("threads", [](const ExecOptions& o) { return o.threads ? o.threads : num_threads(); });

    m.def(
        "quantize",
        [](f32arr x, const FmtParams& params, uint64_t seed, i8arr codes, i16arr exps) {
            const FmtParams& f = checked(params);
            const int64_t o = x.shape(0), K = x.shape(1), in = x.shape(2);
            check3(codes, "codes", o, K, in);
            check3(exps, "exponents", o, (K + f.block - 1) / f.block, in);
            const float* px = x.data();
            int8_t* pc = codes.mutable_data();
            int16_t* pe = exps.mutable_data();
            py::gil_scoped_release nogil;
            quantize_tensor(px, o, K, in, f, seed, pc, pe);
        },
        py::arg("x"), py::arg("params"), py::arg("seed"), py::arg("codes").noconvert(), py::arg("exps").noconvert());

    m.def(
        "fake_quantize",
        [](f32arr x, const FmtParams& params, uint64_t seed, f32arr out) {
            const FmtParams& f = checked(params);
            const int64_t o = x.shape(0), K = x.shape(1), in = x.shape(2);
            check3(out, "out", o, K, in);
            const float* px = x.data();
            float* po = out.mutable_data();
            py::gil_scoped_release nogil;
            fake_quantize_tensor(px, o, K, in, f, seed, po);
        },
        py::arg("x"), py::arg("params"), py::arg("seed"), py::arg("out").noconvert());

    m.def(
        "dequantize",
        [](i8arr codes, i16arr exps, const FmtParams& params, f32arr out) {
            const FmtParams& f = checked(params);
            const int64_t o = codes.shape(0), K = codes.shape(1), in = codes.shape(2);
            check3(exps, "exponents", o, (K + f.block - 1) / f.block, in);
            check3(out, "out", o, K, in);
            const int8_t* pc = codes.data();
            const int16_t* pe = exps.data();
            float* po = out.mutable_data();
            py::gil_scoped_release nogil;
            dequantize_tensor(pc, pe, o, K, in, f, po);
        },
        py::arg("codes"), py::arg("exps"), py::arg("params"), py::arg("out").noconvert());

    py::class_<Operand, std::shared_ptr<Operand>>(m, "Operand", "A quantized operand packed for the kernels")
        .def_readonly("role", &Operand::role)
        .def_property_readonly("kernel", [](const Operand& o) { return std::string(o.kern ? o.kern->name : "scalar"); })
        .def_readonly("rows", &Operand::R)
        .def_readonly("K", &Operand::K)
        .def_readonly("taps", &Operand::taps);

    m.def(
        "pack_operand",
        [](i8arr codes, i16arr exps, const FmtParams& params, const std::string& role, int taps, int groups) {
            const FmtParams& f = checked(params);
            std::vector<int64_t> shape(codes.shape(), codes.shape() + codes.ndim());
            const size_t want = role == "convw" ? 4 : 2;
            if (shape.size() != want) throw std::invalid_argument("operand has the wrong rank for role " + role);
            if (role == "convw" && shape[2] * shape[3] != taps) throw std::invalid_argument("taps != KH*KW");
            if (groups < 1 || shape[0] % groups) throw std::invalid_argument("groups must divide the output channels");
            // the exponents must hold one per block of the codes (the C++ side reads exactly that many)
            std::vector<int64_t> want_e = shape;
            const size_t ax = role == "cols" ? 0 : 1;
            want_e[ax] = (shape[ax] + f.block - 1) / f.block;
            if (exps.ndim() != py::ssize_t(want_e.size()) ||
                !std::equal(want_e.begin(), want_e.end(), exps.shape()))
                throw std::invalid_argument("exponents have the wrong shape for codes of this shape and block size");
            if (role == "convw" && (taps < 1 || groups > shape[0]))
                throw std::invalid_argument("taps and groups must be >= 1 and groups <= output channels");
            const int8_t* pc = codes.data();
            const int16_t* pe = exps.data();
            py::gil_scoped_release nogil;
            return make_operand(pc, pe, shape, f, role, taps, groups);
        },
        py::arg("codes"), py::arg("exps"), py::arg("params"), py::arg("role"), py::arg("taps") = 1,
        py::arg("groups") = 1);

    m.def(
        "quantize_rows",
        [](f32arr x, const FmtParams& params, uint64_t seed) {
            const FmtParams& f = checked(params);
            if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D");
            const float* px = x.data();
            const int64_t R = x.shape(0), K = x.shape(1);
            py::gil_scoped_release nogil;
            return quantize_rows(px, R, K, f, seed);
        },
        py::arg("x"), py::arg("params"), py::arg("seed"));

    m.def(
        "gemm",
        [](Operand& a, Operand& b) {
            if (a.role != "rows" || b.role != "cols") throw std::invalid_argument("gemm takes (rows, cols) operands");
            if (a.K != b.K) throw std::invalid_argument("K mismatch");
            f32arr out({a.R, b.R});
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                gemm(a, b, po);
            }
            return out;
        },
        py::arg("a"), py::arg("b"));

    m.def(
        "conv2d",
        [](f32arr x, const FmtParams& params, uint64_t seed, Operand& w, int groups, std::pair<int, int> stride,
           std::tuple<int, int, int, int> pads, std::pair<int, int> dil, std::optional<f32arr> bias) {
            if (w.role != "convw") throw std::invalid_argument("conv2d takes a convw operand");
            if (w.groups != groups) throw std::invalid_argument("the weight was packed for other groups");
            const FmtParams& fx = checked(params);
            if (x.ndim() != 4) throw std::invalid_argument("x must be NCHW");
            ConvGeom g{};
            g.N = x.shape(0);
            g.C = x.shape(1);
            g.H = x.shape(2);
            g.W = x.shape(3);
            g.groups = groups;
            g.sh = stride.first;
            g.sw = stride.second;
            std::tie(g.pt, g.pl, g.pb, g.pr) = pads;
            g.dh = dil.first;
            g.dw = dil.second;
            if (g.C != w.K * groups) throw std::invalid_argument("channel mismatch");
            if (g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1) throw std::invalid_argument("stride and dilation must be >= 1");
            if (std::min({g.pt, g.pl, g.pb, g.pr}) < 0) throw std::invalid_argument("padding must be >= 0");
            g.OH = (g.H + g.pt + g.pb - int64_t(g.dh) * (w.kh - 1) - 1) / g.sh + 1;
            g.OW = (g.W + g.pl + g.pr - int64_t(g.dw) * (w.kw - 1) - 1) / g.sw + 1;
            if (g.OH < 1 || g.OW < 1) throw std::invalid_argument("empty output");
            f32arr out({g.N, w.R, g.OH, g.OW});
            const float* pb = nullptr;
            if (bias) {
                if (bias->size() != w.R) throw std::invalid_argument("bias size");
                pb = bias->data();
            }
            const float* px = x.data();
            float* po = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                conv2d(px, fx, seed, w, g, pb, po);
            }
            return out;
        },
        py::arg("x"), py::arg("params"), py::arg("seed"), py::arg("w"), py::arg("groups"), py::arg("stride"),
        py::arg("pads"), py::arg("dilation"), py::arg("bias"));

    m.def("round_vector", [](f32arr x, int vp) {
        if (vp < 0 || vp >= kVecCount) throw std::invalid_argument("unknown vector precision " + std::to_string(vp));
        f32arr y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        std::memcpy(y.mutable_data(), x.data(), sizeof(float) * size_t(x.size()));
        round_vec(y.mutable_data(), x.size(), vp);
        return y;
    }, py::arg("x"), py::arg("vector_precision"));

    py::class_<Program, std::shared_ptr<Program>>(m, "Program", "A lowered plan: ops over planned buffers")
        .def(py::init([](int vp, std::optional<FmtParams> params, uint64_t seed) {
                 if (vp < 0 || vp >= kVecCount)
                     throw std::invalid_argument("unknown vector precision " + std::to_string(vp));
                 FmtParams f{};
                 if (params) f = checked(*params);
                 return std::make_shared<Program>(vp, bool(params), f, seed);
             }),
             py::arg("vector_precision"), py::arg("params"), py::arg("seed") = 0)
        .def("add_buffer", &Program::add_buffer, py::arg("n"))
        .def("add_const", [](Program& p, f32arr a) { return p.add_const(a.data(), a.size()); }, py::arg("data"))
        .def("alias", &Program::alias, py::arg("id"))
        .def(
            "add_op",
            [](Program& p, OpParams params, std::vector<int> in, std::vector<int> out, std::shared_ptr<Operand> w,
               int wf, int bias, int res, std::string name) {
                if (w && w->role != "convw") throw std::invalid_argument("conv weights must be a convw operand");
                Op op;
                op.params = std::move(params);
                op.in = std::move(in);
                op.out = std::move(out);
                op.w = std::move(w);
                op.wf = wf;
                op.bias = bias;
                op.res = res;
                op.name = std::move(name);
                p.add_op(std::move(op));
            },
            py::arg("params"), py::arg("inputs"), py::arg("outputs"), py::arg("w") = nullptr, py::arg("wf") = -1,
            py::arg("bias") = -1, py::arg("res") = -1, py::arg("name") = "",
            "Appends an op: its kind is its parameters' type (ConvParams, UnaryParams, ...); every size it will "
            "touch is checked against the buffers here (ValueError)")
        .def("size", &Program::size, py::arg("id"))
        .def_property_readonly("num_ops", &Program::num_ops)
        .def_property_readonly("op_names", &Program::op_names)
        .def_property_readonly("last_times", &Program::last_times)
        .def_property_readonly("last_gemm_times", &Program::last_gemm_times)
        .def_property_readonly("op_kinds", &Program::op_kinds)
        .def_property_readonly("last_reused", &Program::last_reused,
                               "convs of the last run that reused another's quantized input (share_input)")
        .def_property_readonly("last_stems", &Program::last_stems,
                               "convs of the last run on the kernel's stem path (inputs of <= 4 channels)")
        .def("set_profile", &Program::set_profile, py::arg("on"))
        .def(
            "run",
            [](Program& p, const std::vector<std::pair<int, f32arr>>& inputs, const std::vector<int>& outs) {
                std::vector<std::pair<int, const float*>> in;
                for (const auto& kv : inputs) {
                    if (kv.second.size() != p.size(kv.first))
                        throw std::invalid_argument("input buffer " + std::to_string(kv.first) + " holds " +
                                                    std::to_string(p.size(kv.first)) + " floats, got " +
                                                    std::to_string(kv.second.size()));
                    in.emplace_back(kv.first, kv.second.data());
                }
                std::vector<f32arr> res;
                for (int id : outs) res.emplace_back(f32arr(p.size(id)));
                std::vector<float*> dst;
                for (auto& a : res) dst.push_back(a.mutable_data());
                {
                    py::gil_scoped_release nogil;
                    std::lock_guard<std::mutex> lock(p.mu);
                    p.run(in);
                    for (size_t i = 0; i < outs.size(); ++i)
                        std::memcpy(dst[i], p.data(outs[i]), sizeof(float) * size_t(p.size(outs[i])));
                }
                return res;
            },
            py::arg("inputs"), py::arg("outputs"));
}

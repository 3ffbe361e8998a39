// MatMul between run-time tensors (attention's Q x K^T and P x V, a Gemm with a computed B, a
// MatMul whose constant is the left operand): batched with numpy broadcasting. Both operands are
// quantized at run time along the reduced axis -- A's rows as a dense layer's activations, B's
// columns as a dense layer's weights -- and multiplied on the same datapath (gemm: blocks in
// ascending k order, one fp32 accumulation per block), so each output matrix has the bits of
// bfpaccel.matmul(A[j], B[j]). Without a format (fp32 plans) the products are summed in fp32 in
// k order, a multiply and an add per term, as the fp32 dense layers do.
#include <algorithm>
#include <cstring>
#include <exception>
#include <memory>
#include <vector>

#include "ops.h"
#include "ops/vec.h"
#include "pool.h"
#include "runtime.h"

namespace bfp {

// below this many multiply-adds (all matrices of the op together) a MatMul runs single-threaded
constexpr int64_t kMatMulParallelMacs = int64_t(1) << 25;

static void validate_matmul(const Program& p, const Op& op, OpCheck& c) {
    const MatMulParams& q = op.get<MatMulParams>();
    c.ins(2);
    constexpr int64_t kMaxK = int64_t(1) << 30;  // the operands count blocks in int
    c.range(q.m, 0, int64_t(1) << 40, "m");
    c.range(q.k, 0, kMaxK, "k");
    c.range(q.n, 0, int64_t(1) << 40, "n");
    const int rank = c.rank(q.batch_shape.size());
    c.entries(q.a_strides.size(), size_t(rank), "a_strides");
    c.entries(q.b_strides.size(), size_t(rank), "b_strides");
    c.range(q.a_count, 1, int64_t(1) << 40, "a_count");
    c.range(q.b_count, 1, int64_t(1) << 40, "b_count");
    int64_t alast = 0, blast = 0;  // the last matrix each operand's strides reach
    for (int d = 0; d < rank; ++d) {
        const int64_t s = q.batch_shape[size_t(d)];
        c.pos(s, "a batch dimension");
        const int64_t sa = q.a_strides[size_t(d)], sb = q.b_strides[size_t(d)];
        if (sa < 0 || sb < 0) c.fail("negative batch stride");
        alast += c.mul(s - 1, sa);
        blast += c.mul(s - 1, sb);
    }
    if (alast >= q.a_count) c.fail("the batch strides reach past A's matrices");
    if (blast >= q.b_count) c.fail("the batch strides reach past B's matrices");
    const int64_t batches = c.prod(q.batch_shape.data(), rank);
    c.fits(op.in[0], c.mul(q.a_count, c.mul(q.m, q.k)), "A");
    c.fits(op.in[1], c.mul(q.b_count, c.mul(q.k, q.n)), "B");
    c.fits(op.out[0], c.mul(batches, c.mul(q.m, q.n)), "output");
    (void)p;
}

// the matrices of A and B that batch index j multiplies
static inline void batch_operands(const MatMulParams& q, int64_t j, int64_t* ai, int64_t* bi) {
    int64_t a = 0, b = 0, rem = j;
    for (int d = int(q.batch_shape.size()) - 1; d >= 0; --d) {
        const int64_t s = q.batch_shape[size_t(d)], i = rem % s;
        rem /= s;
        a += i * q.a_strides[size_t(d)];
        b += i * q.b_strides[size_t(d)];
    }
    *ai = a;
    *bi = b;
}

static int64_t batch_count(const MatMulParams& q) {
    int64_t n = 1;
    for (int64_t s : q.batch_shape) n *= s;
    return n;
}

// fp32: y[i][j] = sum_k a[i][k] * b[k][j], sequentially in k from +0.0 (no FMA)
__attribute__((target_clones("avx2", "default"))) static void matmul_fp32_rows(const float* a, const float* b,
                                                                              bool bt, int64_t K, int64_t N,
                                                                              float* y) {
    if (bt) {  // b stored [N][K]: one dot product per output, k in order
        for (int64_t j = 0; j < N; ++j) {
            const float* br = b + j * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc = acc + a[k] * br[k];
            y[j] = acc;
        }
        return;
    }
    for (int64_t j = 0; j < N; ++j) y[j] = 0.0f;  // b stored [K][N]: rows of b streamed, k in order
    for (int64_t k = 0; k < K; ++k) {
        const float av = a[k];
        const float* br = b + k * N;
        for (int64_t j = 0; j < N; ++j) y[j] = y[j] + av * br[j];
    }
}

static void exec_matmul_fp32(Program& p, const Op& op) {
    const MatMulParams& q = op.get<MatMulParams>();
    const float* A = p.buf(op.in[0]);
    const float* B = p.buf(op.in[1]);
    float* Y = p.buf(op.out[0]);
    const int64_t M = q.m, K = q.k, N = q.n, rows = batch_count(q) * M;
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(rows * K * N))
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = r / M, i = r % M;
        int64_t ai, bi;
        batch_operands(q, j, &ai, &bi);
        matmul_fp32_rows(A + (ai * M + i) * K, B + bi * K * N, q.b_transposed, K, N, Y + r * N);
    }
}

// [count][rows][cols] -> [count][cols][rows]
static void transpose_matrices(const float* x, int64_t count, int64_t rows, int64_t cols, float* y) {
#pragma omp parallel for num_threads(num_threads()) schedule(static) if (par(count * rows * cols))
    for (int64_t t = 0; t < count * cols; ++t) {
        const int64_t m = t / cols, c = t % cols;
        const float* s = x + m * rows * cols + c;
        float* d = y + t * rows;
        for (int64_t r = 0; r < rows; ++r) d[r] = s[r * cols];
    }
}

static void exec_matmul(Program& p, const Op& op) {
    if (!p.has_format()) {
        exec_matmul_fp32(p, op);
        return;
    }
    const MatMulParams& q = op.get<MatMulParams>();
    const FmtParams& f = p.format();
    const int64_t M = q.m, K = q.k, N = q.n, batches = batch_count(q);
    float* Y = p.buf(op.out[0]);
    if (M == 0 || N == 0 || batches == 0) return;
    const int64_t nb = (K + f.block - 1) / f.block;
    // A small product (attention at short sequences: a few million multiply-adds) runs on this
    // thread alone: each parallel region is a fork and a join, and on a loaded machine a join
    // waits for a descheduled thread far longer than the op takes. Larger ones share the
    // threads; their loops below run each matrix on one thread under this thread's kernel and
    // thread settings (ExecScope: they are per thread). The bits do not depend on the threads.
    const KernelDesc& kern = current_kernel();
    const bool small = double(batches) * double(M) * double(K) * double(N) < double(kMatMulParallelMacs);
    const int team = num_threads();  // a small op shares its matrices among them (parallel_for)
    ExecScope serial(nullptr, small ? 1 : 0);
    const int nthreads = num_threads();
    // A: every row of every matrix, blocked along k; stochastic bits indexed by A's flat index
    // (deterministic rounding: each matrix's rows straight to the kernel's operand, as a dense
    // layer's activations -- the same blocks, no intermediate codes)
    const bool stochastic = f.rounding == kStochastic;
    std::vector<int8_t> ac(stochastic ? size_t(q.a_count * M * K) : 0);
    std::vector<int16_t> ae(stochastic ? size_t(q.a_count * M * nb) : 0);
    if (stochastic) quantize_tensor(p.buf(op.in[0]), q.a_count * M, K, 1, f, p.seed(), ac.data(), ae.data());
    const float* A = p.buf(op.in[0]);
    // B: every column blocked along k. Deterministic rounding quantizes the columns as contiguous
    // rows of B^T (the fast path); stochastic rounding indexes the bits by B's logical [k][n]
    // flat index, whatever its storage
    const float* B = p.buf(op.in[1]);
    const bool need_t = stochastic == q.b_transposed;  // the storage differs from what is quantized
    std::vector<float> bt;
    if (need_t) {
        bt.resize(size_t(q.b_count * K * N));
        if (q.b_transposed) transpose_matrices(B, q.b_count, N, K, bt.data());  // -> [k][n]
        else transpose_matrices(B, q.b_count, K, N, bt.data());                 // -> [n][k]
        B = bt.data();
    }
    // (deterministic rounding: the rows of B^T straight to the kernel's column operand)
    std::vector<int8_t> bc(stochastic ? size_t(q.b_count * K * N) : 0);
    std::vector<int16_t> be(stochastic ? size_t(q.b_count * N * nb) : 0);
    if (stochastic) quantize_tensor(B, q.b_count, K, N, f, p.seed(), bc.data(), be.data());
    // One parallel loop over the matrices (attention: one per head), each built and multiplied by
    // one thread (the operands' and the GEMM's own loops then run inside it): a few parallel
    // regions per op instead of several per head. The bits do not depend on the threads.
    std::vector<std::shared_ptr<Operand>> aop(size_t(q.a_count)), bop(size_t(q.b_count));
    const int64_t nops = q.a_count + q.b_count;
    std::vector<std::exception_ptr> err(size_t(std::max(nops, batches)));
    // operand t: A's matrices first, then B's
    auto build_operand = [&](int64_t t) {
        if (t < q.a_count) {
            aop[size_t(t)] = stochastic ? make_operand(ac.data() + t * M * K, ae.data() + t * M * nb, {M, K}, f,
                                                       "rows", 1, 1)
                                        : quantize_rows(A + t * M * K, M, K, f, p.seed());
        } else {
            const int64_t i = t - q.a_count;
            bop[size_t(i)] = stochastic ? make_operand(bc.data() + i * K * N, be.data() + i * N * nb, {K, N}, f,
                                                       "cols", 1, 1)
                                        : quantize_cols_t(B + i * K * N, N, K, f, p.seed());
        }
    };
    if (small) {  // matrices on parallel_for, each on one thread (no join on a late helper)
        parallel_for(team, nops, [&](int64_t t) {
            ExecScope scope(&kern, 1);
            build_operand(t);
        });
        parallel_for(team, batches, [&](int64_t j) {
            ExecScope scope(&kern, 1);
            int64_t ai, bi;
            batch_operands(q, j, &ai, &bi);
            gemm(*aop[size_t(ai)], *bop[size_t(bi)], Y + j * M * N);
        });
        return;
    }
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic) if (nops > 2 && par(M * K + K * N))
    for (int64_t t = 0; t < nops; ++t) {
        try {
            ExecScope scope(&kern, nthreads);
            build_operand(t);
        } catch (...) {
            err[size_t(t)] = std::current_exception();
        }
    }
    for (const auto& e : err)
        if (e) std::rethrow_exception(e);
#pragma omp parallel for num_threads(num_threads()) schedule(dynamic) if (batches > 1 && par(M * K * N))
    for (int64_t j = 0; j < batches; ++j) {
        try {
            ExecScope scope(&kern, nthreads);
            int64_t ai, bi;
            batch_operands(q, j, &ai, &bi);
            gemm(*aop[size_t(ai)], *bop[size_t(bi)], Y + j * M * N);
        } catch (...) {
            err[size_t(j)] = std::current_exception();
        }
    }
    for (const auto& e : err)
        if (e) std::rethrow_exception(e);
}

BFP_REGISTER_OP(kOpMatMul, validate_matmul, exec_matmul);

}  // namespace bfp

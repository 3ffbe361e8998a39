// parallel_items (pool.h): persistent helper threads that claim loop items from a counter.
#include "pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <pthread.h>
#include <sched.h>
#include <thread>
#include <vector>

namespace bfp {

namespace {

// How long an idle helper spins before it sleeps: long enough to bridge the gaps between one
// layer's parallel loops and the next (single-threaded ops, OpenMP regions, the run's Python
// call) so that a loop rarely waits for a sleeping helper to wake (a futex wake-up on a shared
// VM took tens of microseconds or more: EfficientNet-Lite0 at 2 threads ran 5 ms per call
// back to back but ~8 ms in the benchmark's blocks after 1 s pauses with a 20 us spin, ~5 ms
// with ~100 us), short enough that a helper without a free core of its own gives the core back
// soon. Timed, not counted: a pause instruction takes ~10 ns on one CPU, ~40 on another.
constexpr auto kHelperSpin = std::chrono::microseconds(100);

thread_local bool t_in_item = false;  // this thread runs an item: a nested loop runs inline

// A helper woken on the CPU its caller runs on moves to another CPU it may use. Measured on 2
// vCPUs: once another runtime's threads had run in the process (onnxruntime sessions beside a
// BFP one, as in `bfpaccel bench`), the scheduler often placed the woken helper on the caller's
// CPU while the other one stayed idle; the two then shared one CPU (EfficientNet-Lite0 at 2
// threads: 8-13 ms calls instead of 4; in ~40 % of the loops the helper did not run at all).
// Narrowing this thread's CPU mask moves it at once; the mask is restored right after, so the
// scheduler may place it anywhere later. Returns false where the mask allows only that CPU (the
// helper cannot leave it).
bool leave_cpu(int cpu) {
    cpu_set_t all;
    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(0, sizeof(all), &all) != 0) return true;
    if (!CPU_ISSET(cpu, &all)) return true;
    if (CPU_COUNT(&all) < 2) return false;
    cpu_set_t others = all;
    CPU_CLR(cpu, &others);
    if (sched_setaffinity(0, sizeof(others), &others) == 0) sched_setaffinity(0, sizeof(all), &all);
    return true;
}

struct Pool {
    // the current loop (valid while `active`)
    void (*fn)(void*, int64_t) = nullptr;
    void* ctx = nullptr;
    int64_t n = 0;
    std::atomic<int> helpers{0};       // helpers 0 .. helpers-1 take part
    // the unclaimed items [front, back), packed as front | back << 32 (loops of < 2^31 items;
    // longer ones hand out items from the front only, through next)
    std::atomic<uint64_t> ends{0};
    bool two_ended = false;
    std::atomic<int64_t> next{0};      // the next unclaimed item (loops of >= 2^31 items)
    std::atomic<int64_t> done{0};      // items finished
    std::atomic<int> inside{0};        // helpers between entering and leaving the loop
    std::atomic<bool> active{false};
    std::atomic<uint64_t> gen{0};      // bumped for every loop
    std::atomic<int> caller_cpu{-1};   // the CPU the current loop's caller started on

    // this thread runs on the CPU of the (current or last) loop's caller: that CPU, else -1
    int on_caller_cpu() const {
        const int cc = caller_cpu.load(std::memory_order_relaxed);
        return cc >= 0 && sched_getcpu() == cc ? cc : -1;
    }
    std::exception_ptr err;
    std::mutex err_mu;

    std::mutex mu;                     // sleeping helpers wait on cv
    std::condition_variable cv;
    std::mutex busy;                   // one loop at a time
    std::vector<std::thread> threads;

    // The next item for this thread, or -1: the caller and the helpers but one take items from
    // the front, the first helper from the back. Loops over the same rows in the same order (a
    // layer's GEMM, the next layer's quantizer, a depthwise conv: their items run along the
    // image) then give each of two threads mostly the same rows in every loop, so a layer reads
    // what its own core wrote (its L2) instead of lines the other core holds.
    int64_t claim(bool from_back) {
        if (!two_ended) {
            const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
            return i < n ? i : -1;
        }
        uint64_t w = ends.load(std::memory_order_relaxed);
        for (;;) {
            const uint64_t f = w & 0xffffffffu, b = w >> 32;
            if (f >= b) return -1;
            const uint64_t nw = from_back ? (f | ((b - 1) << 32)) : ((f + 1) | (b << 32));
            if (ends.compare_exchange_weak(w, nw, std::memory_order_relaxed)) return int64_t(from_back ? b - 1 : f);
        }
    }

    void run_items(bool from_back = false) {
        for (;;) {
            const int64_t i = claim(from_back);
            if (i < 0) return;
            try {
                fn(ctx, i);
            } catch (...) {
                std::lock_guard<std::mutex> lk(err_mu);
                if (!err) err = std::current_exception();
            }
            done.fetch_add(1, std::memory_order_release);
        }
    }

    void helper(int id) {
        uint64_t seen = 0;
        for (;;) {
            // wait for a new loop: spin a little (the next layer follows soon), then sleep
            uint64_t g = gen.load(std::memory_order_acquire);
            const auto spin_end = std::chrono::steady_clock::now() + kHelperSpin;
            bool checked_cpu = false;  // at most one move per wait (none is possible on one CPU)
            for (int spin = 1; g == seen; ++spin) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
                g = gen.load(std::memory_order_acquire);
                if (spin % 64 == 0) {
                    if (std::chrono::steady_clock::now() >= spin_end) break;
                    // spinning on the CPU the caller now runs on would take it from the caller:
                    // move, or (more threads than allowed CPUs) sleep at once
                    const int cc = checked_cpu ? -1 : on_caller_cpu();
                    if (cc >= 0) {
                        if (!leave_cpu(cc)) break;
                        checked_cpu = true;
                    }
                }
            }
            if (g == seen) {
                std::unique_lock<std::mutex> lk(mu);
                cv.wait(lk, [&] { return gen.load(std::memory_order_acquire) != seen; });
                g = gen.load(std::memory_order_acquire);
            }
            seen = g;
            // sequentially consistent: either the caller sees this helper inside, or the helper
            // sees the loop inactive (the caller waits for `inside` after clearing `active`)
            inside.fetch_add(1);
            if (active.load() && gen.load() == g && id < helpers.load()) {
                const int cc = on_caller_cpu();
                if (cc >= 0) leave_cpu(cc);
                t_in_item = true;
                run_items(id == 0);
                t_in_item = false;
            }
            inside.fetch_sub(1);
        }
    }
};

std::atomic<Pool*> g_pool{nullptr};

// A child of fork() has none of the parent's helpers, and a lock they held stays held: it
// starts with a fresh pool (the old one is left as it is, never touched again).
void reset_in_child() { g_pool.store(new Pool()); }

Pool& pool() {
    static const bool once = [] {
        g_pool.store(new Pool());  // never destroyed: helpers may still be waiting at exit
        pthread_atfork(nullptr, nullptr, reset_in_child);
        return true;
    }();
    (void)once;
    return *g_pool.load();
}

}  // namespace

bool in_parallel_item() { return t_in_item; }

void parallel_items(int nt, int64_t n, void (*fn)(void* ctx, int64_t i), void* ctx) {
    if (n <= 0) return;
    Pool& P = pool();
    std::unique_lock<std::mutex> own(P.busy, std::defer_lock);
    if (nt <= 1 || n == 1 || t_in_item || !own.try_lock()) {
        for (int64_t i = 0; i < n; ++i) fn(ctx, i);
        return;
    }
    const int helpers = int(std::min<int64_t>(nt - 1, n - 1));
    while (int(P.threads.size()) < helpers) {
        const int id = int(P.threads.size());
        P.threads.emplace_back([&P, id] { P.helper(id); });
        P.threads.back().detach();
    }
    P.fn = fn;
    P.caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
    P.ctx = ctx;
    P.n = n;
    P.helpers.store(helpers);
    P.err = nullptr;
    P.next.store(0, std::memory_order_relaxed);
    P.two_ended = n < (int64_t(1) << 31);
    P.ends.store(P.two_ended ? uint64_t(n) << 32 : 0, std::memory_order_relaxed);
    P.done.store(0, std::memory_order_relaxed);
    P.active.store(true);
    {
        std::lock_guard<std::mutex> lk(P.mu);
        P.gen.fetch_add(1, std::memory_order_acq_rel);
    }
    P.cv.notify_all();
    t_in_item = true;
    P.run_items();
    t_in_item = false;
    // every item is claimed; wait for the ones still running on helpers
    for (int spin = 0; P.done.load(std::memory_order_acquire) < n; ++spin) {
        if (spin < 4096) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            std::this_thread::yield();  // the item's thread was descheduled: let it run
        }
    }
    P.active.store(false);
    while (P.inside.load() != 0) std::this_thread::yield();
    std::exception_ptr e = P.err;
    P.err = nullptr;
    own.unlock();
    if (e) std::rethrow_exception(e);
}

}  // namespace bfp

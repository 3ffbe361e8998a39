// A parallel loop that never waits for a thread that has not started.
//
// An OpenMP region ends in a join: the calling thread waits until every thread of the team has
// arrived, even one that got no work because the OS had not scheduled it yet. On a machine
// shared with other processes that wait is a scheduler time slice (milliseconds), far longer
// than the work of one layer. parallel_items() hands out items from a shared counter instead:
// the calling thread and up to nt - 1 persistent helper threads claim items until none is left,
// and the call returns as soon as every claimed item is done -- a helper that wakes late finds
// nothing to claim. Which thread runs an item never changes a result (each item writes its own
// outputs).
#pragma once

#include <cstdint>
#include <type_traits>

namespace bfp {

// fn(ctx, i) for every i in [0, n), on up to nt threads (the caller included); returns when all
// are done. The first exception thrown by an item is rethrown here (the other items still run).
// Called from inside an item (nested) or while another call runs: the items run on the caller.
void parallel_items(int nt, int64_t n, void (*fn)(void* ctx, int64_t i), void* ctx);

// Whether this thread is running an item of parallel_items (a loop it calls runs inline; see
// num_threads(), which is 1 there)
bool in_parallel_item();

// The same with a callable: parallel_for(nt, n, [&](int64_t i) { ... }).
template <class F>
inline void parallel_for(int nt, int64_t n, F&& f) {
    using G = std::remove_reference_t<F>;
    parallel_items(nt, n, [](void* c, int64_t i) { (*static_cast<G*>(c))(i); }, const_cast<void*>(static_cast<const void*>(&f)));
}

// f(lo, hi) over [0, n) in ranges of `grain` indices, as items of parallel_for; nt = 1 (or a
// single range) runs on the caller.
template <class F>
inline void parallel_ranges(int nt, int64_t n, int64_t grain, F&& f) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int64_t items = (n + grain - 1) / grain;
    parallel_for(nt, items, [&](int64_t it) {
        const int64_t lo = it * grain;
        f(lo, n - lo < grain ? n : lo + grain);
    });
}

}  // namespace bfp

// retrieval_attention/parallel.h -- OpenMP loops that carry exceptions out of the parallel region.
//
// An exception escaping an OpenMP region terminates the process; parallel_for catches the first one
// thrown by any iteration, lets the others finish, and rethrows it on the calling thread.
// parallel_for_split is for a few large items that are parallel inside (one graph build per head): the
// threads are split between the items, and each item's own parallel_for loops run on its share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace retrieval_attention {

// Threads a parallel_for at this level uses (1 without OpenMP).
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// team: threads of the region (0: OpenMP's default).
template <class Fn>
void parallel_for(int64_t n, Fn&& fn, bool dynamic = true, int team = 0) {
  std::exception_ptr error;
  std::mutex error_mu;
  auto body = [&](int64_t i) {
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
    }
  };
  if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team > 0 ? team : omp_get_max_threads())
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static) num_threads(team > 0 ? team : omp_get_max_threads())
    for (int64_t i = 0; i < n; ++i) body(i);
  }
  if (error) std::rethrow_exception(error);
}

#ifdef _OPENMP
// Allows two levels of active parallel regions while at least one instance lives (max-active-levels is one
// setting for the whole process; concurrent users, e.g. index builds in two threads, share one save/restore).
class NestedRegions {
 public:
  NestedRegions() {
    std::lock_guard<std::mutex> lock(mu());
    if (users()++ == 0) {
      saved() = omp_get_max_active_levels();
      omp_set_max_active_levels(std::max(saved(), 2));
    }
  }
  ~NestedRegions() {
    std::lock_guard<std::mutex> lock(mu());
    if (--users() == 0) omp_set_max_active_levels(saved());
  }
  NestedRegions(const NestedRegions&) = delete;
  NestedRegions& operator=(const NestedRegions&) = delete;

 private:
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static int& users() {
    static int u = 0;
    return u;
  }
  static int& saved() {
    static int s = 1;
    return s;
  }
};
#endif

// fn(i) for i in [0, n). With fewer items than threads, item i runs on a team of about threads / n threads
// (nested OpenMP; without it the items' inner loops would run serially and 6 heads would use 6 of 16 cores);
// a single item runs on the calling thread with every thread for its own loops.
template <class Fn>
void parallel_for_split(int64_t n, Fn&& fn) {
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  if (n == 1 && omp_get_level() == 0) {  // one item: its own loops get every thread (a region around it would not)
    fn(int64_t{0});
    return;
  }
  if (n > 1 && n < threads && omp_get_level() == 0) {
    const int items = static_cast<int>(n);
    NestedRegions nested;
    parallel_for(
        n,
        [&](int64_t i) {
          omp_set_num_threads(threads / items + (i < threads % items ? 1 : 0));  // this item's inner team
          fn(i);
        },
        /*dynamic=*/true, /*team=*/items);
    return;
  }
#endif
  parallel_for(n, fn);
}

}  // namespace retrieval_attention

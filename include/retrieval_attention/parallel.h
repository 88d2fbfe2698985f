// retrieval_attention/parallel.h -- OpenMP loops that carry exceptions out of the parallel region.
//
// An exception escaping an OpenMP region terminates the process; parallel_for catches the first one
// thrown by any iteration, lets the others finish, and rethrows it on the calling thread.
// parallel_for_split is for a few large items that are parallel inside (one graph build per head): every thread
// of the caller's team takes items, and the items' own parallel_for loops hand their iterations to a work pool that
// every thread without an item of its own serves. So a thread whose item finished early helps the items still
// running, instead of idling while the slowest one ends (one 8B layer builds 8 graphs whose times differ by 1.5x).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
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

// Keeps the first exception thrown by any of the calls it wraps, for rethrow() on the calling thread.
class FirstException {
 public:
  template <class F>
  void run(F&& f) {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::mutex mu_;
};

// One loop shared by several threads: each takes the next iteration until none is left; the thread that ends the last
// one wakes whoever waits on `finished`. A thread that comes late finds none left and never calls body.
struct LoopJob {
  LoopJob(int64_t n_, const std::function<void(int64_t)>* body_) : n(n_), body(body_) {}
  void work() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*body)(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }
  const int64_t n;
  const std::function<void(int64_t)>* body;  // lives on the posting thread's stack until done == n
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable finished;
};

// The work pool of one parallel_for_split call. A parallel_for run by one of its items posts its iterations as a
// job; the item's thread and every idle thread of the call take iterations from the posted jobs (the one with the
// most left first) until all are taken, and the item's thread returns when its own job's iterations are done.
class SplitPool {
 public:
  // The pool the calling thread works for (null outside parallel_for_split).
  static SplitPool*& current() {
    thread_local SplitPool* pool = nullptr;
    return pool;
  }

  explicit SplitPool(int64_t items) : items_left_(items) {}

  // body(i) for i in [0, n) on this thread and the pool's idle ones; body must not throw.
  void run(int64_t n, const std::function<void(int64_t)>& body) {
    auto job = std::make_shared<Job>(n, &body);
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(job);
    }
    wake_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();  // iterations other threads hold
    std::lock_guard<std::mutex> lock(mu_);
    jobs_.erase(std::find(jobs_.begin(), jobs_.end(), job));
  }

  // Called once per finished item; the last one releases the helpers.
  void item_finished() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--items_left_ == 0) wake_.notify_all();
  }

  // Serves posted jobs until every item has finished.
  void help() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return items_left_ == 0 || (job = most_left()) != nullptr; });
        if (!job) return;
      }
      job->work();
    }
  }

 private:
  using Job = LoopJob;
  std::shared_ptr<Job> most_left() const {  // caller holds mu_
    std::shared_ptr<Job> best;
    int64_t left = 0;
    for (const auto& j : jobs_) {
      const int64_t l = j->n - j->next.load(std::memory_order_relaxed);
      if (l > left) left = l, best = j;
    }
    return best;
  }
  std::mutex mu_;
  std::condition_variable wake_;
  std::vector<std::shared_ptr<Job>> jobs_;
  int64_t items_left_;
};

// team: threads of the region (0: OpenMP's default).
template <class Fn>
void parallel_for(int64_t n, Fn&& fn, bool dynamic = true, int team = 0) {
  FirstException error;
  auto body = [&](int64_t i) { error.run([&] { fn(i); }); };
  if (SplitPool* pool = SplitPool::current()) {  // inside parallel_for_split: share the iterations with its threads
    if (n > 0) pool->run(n, std::function<void(int64_t)>(body));
    error.rethrow();
    return;
  }
  if (dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(team > 0 ? team : omp_get_max_threads())
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static) num_threads(team > 0 ? team : omp_get_max_threads())
    for (int64_t i = 0; i < n; ++i) body(i);
  }
  error.rethrow();
}

// A 32-bit counter that threads sleep on until it changes. On Linux a futex: one bump wakes every sleeper at once,
// with no mutex for them to take in turn on their way out (a condition variable's waiters reacquire its mutex one by
// one). Elsewhere a mutex and a condition variable.
class Generation {
 public:
  uint32_t load() const { return value_.load(std::memory_order_acquire); }
  // value + 1, seen by a thread that then loads with acquire together with every write made before the bump
  void bump_and_wake_all() {
#if defined(__linux__)
    value_.fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#else
    {
      std::lock_guard<std::mutex> lock(mu_);
      value_.fetch_add(1, std::memory_order_release);
    }
    changed_.notify_all();
#endif
  }
  // returns once the value differs from `seen` (at once if it already does)
  void wait_while(uint32_t seen) {
#if defined(__linux__)
    while (load() == seen)  // FUTEX_WAIT returns at once if the value moved on, and may return spuriously
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&value_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
    std::unique_lock<std::mutex> lock(mu_);
    changed_.wait(lock, [&] { return load() != seen; });
#endif
  }

 private:
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "the futex word is the atomic's storage");
  std::atomic<uint32_t> value_{0};
#if !defined(__linux__)
  std::mutex mu_;
  std::condition_variable changed_;
#endif
};

// A process-wide pool for short parallel loops on the decode path (retrieve_attend: about a millisecond per layer and
// token). Its threads block whenever they have no item, where OpenMP threads under libgomp's default wait policy spin
// for a while after each region and at its end: on the H200 host (16 vCPUs) the spinning took about 20% off every
// decode step (the threads finished early spin beside those still searching, and after the call beside the Python
// thread). Items are handed out one at a time (dynamic), the calling thread takes part, and the first exception is
// rethrown on it. One loop runs at a time; a caller that finds the pool busy (a concurrent retrieve_attend) or is one
// of its threads (a loop inside a loop) runs the loop through parallel_for instead.
// Waking and waiting cost what a loop of a few hundred microseconds can feel, so: the threads sleep on a Generation,
// which one post wakes all at once; the caller, the one thread the loop's end waits on, spins briefly on the items
// other threads still hold before it blocks.
class BlockingPool {
 public:
  // Never destroyed: its threads stay blocked until the process exits (joining them at exit could hang a forked child,
  // which has the vector but not the threads; there a loop's caller simply does every item itself).
  static BlockingPool& shared() {
    static BlockingPool* pool = new BlockingPool;
    return *pool;
  }

  // fn(i) for i in [0, n) on the calling thread and up to max_threads() - 1 pool threads.
  template <class Fn>
  void run(int64_t n, Fn&& fn) {
    const int team = static_cast<int>(std::min<int64_t>(max_threads(), n));
    std::unique_lock<std::mutex> busy;  // not tried inside a loop: try_lock by the thread holding run_mu_ is undefined
    if (team > 1 && !in_loop()) busy = std::unique_lock<std::mutex>(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) {
      parallel_for(n, std::forward<Fn>(fn));
      return;
    }
    struct InLoop {  // the caller is inside the loop until run returns, however it returns
      InLoop() { in_loop() = true; }
      ~InLoop() { in_loop() = false; }
    } inside;
    FirstException error;
    const std::function<void(int64_t)> body = [&](int64_t i) { error.run([&] { fn(i); }); };
    auto job = std::make_shared<Job>(n, &body);
    while (static_cast<int>(workers_.size()) < team - 1) {  // only the holder of run_mu_ touches workers_
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { serve(index); });
    }
    std::atomic_store_explicit(&job_, job, std::memory_order_release);
    helpers_.store(team - 1, std::memory_order_release);
    generation_.bump_and_wake_all();  // after job_ and helpers_: a thread that sees the new value sees them
    job->work();
    // items other threads still hold; a helper that wakes after this finds none left and never calls body
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kCallerSpinMicros);
    for (int i = 1; job->done.load(std::memory_order_acquire) != n; ++i) {
      cpu_relax();
      if (i % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(job->mu);
        job->finished.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == n; });
        break;
      }
    }
    error.rethrow();
  }

 private:
  using Job = LoopJob;
  static constexpr int64_t kCallerSpinMicros = 500;  // about the longest search item at 128K keys

  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // True on the pool's threads, and on a caller while its loop runs: a loop started there runs through parallel_for.
  static bool& in_loop() {
    thread_local bool inside = false;
    return inside;
  }

  void serve(int index) {
    in_loop() = true;
    uint32_t seen = 0;
    for (;;) {
      generation_.wait_while(seen);
      seen = generation_.load();
      if (index >= helpers_.load(std::memory_order_acquire)) continue;  // a smaller loop than this thread's rank
      std::atomic_load_explicit(&job_, std::memory_order_acquire)->work();  // the copy keeps a late thread's job alive
    }
  }

  std::mutex run_mu_;                  // one loop at a time; its holder alone touches workers_
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;           // the newest loop, read and written through std::atomic_load/store
  std::atomic<int> helpers_{0};        // pool threads the newest loop may use
  Generation generation_;              // bumped by every post; the threads sleep on it
};

// Whether pred(i) holds for every i in [0, n), the items over the threads (each item is evaluated; a check over many
// blocks of an input, e.g. id ranges, where one thread would take a serial pass).
template <class Pred>
bool parallel_all_of(int64_t n, Pred&& pred) {
  std::vector<uint8_t> ok(static_cast<size_t>(std::max<int64_t>(n, 0)), 0);
  parallel_for(n, [&](int64_t i) { ok[static_cast<size_t>(i)] = pred(i) ? 1 : 0; });
  return std::all_of(ok.begin(), ok.end(), [](uint8_t v) { return v != 0; });
}

// An allocator whose vectors' resize() leaves trivially constructible elements uninitialised, so that the copy of
// parallel_assign is the memory's first touch, spread over the threads.
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <class U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T>
using UninitVector = std::vector<T, NoInitAllocator<T>>;

// dst = src[0, count), copied in blocks over the threads (a prefill hands each 8B layer ~300 MB of lists at 128K).
template <class T, class A>
void parallel_assign(std::vector<T, A>& dst, const T* src, int64_t count) {
  static_assert(std::is_trivially_copyable_v<T>, "parallel_assign copies bytes");
  dst.resize(static_cast<size_t>(count));
  constexpr int64_t kBlock = int64_t{1} << 18;
  parallel_for((count + kBlock - 1) / kBlock, [&](int64_t b) {
    std::memcpy(dst.data() + b * kBlock, src + b * kBlock, sizeof(T) * static_cast<size_t>(std::min(kBlock, count - b * kBlock)));
  });
}

// fn(i) for i in [0, n): the threads of a new team take items, and each item's parallel_for loops run on its own
// thread plus every thread of the team that has no item left to start (SplitPool). A single item runs on the
// calling thread with every thread for its own loops; inside another parallel region or pool this is parallel_for.
template <class Fn>
void parallel_for_split(int64_t n, Fn&& fn) {
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  if (n == 1 && omp_get_level() == 0 && SplitPool::current() == nullptr) {  // its loops get every thread
    fn(int64_t{0});
    return;
  }
  if (n > 1 && threads > 1 && omp_get_level() == 0 && SplitPool::current() == nullptr) {
    SplitPool pool(n);
    std::atomic<int64_t> next_item{0};
    FirstException error;
#pragma omp parallel num_threads(threads)
    {
      SplitPool::current() = &pool;
      for (int64_t i; (i = next_item.fetch_add(1)) < n;) {
        error.run([&] { fn(i); });
        pool.item_finished();
      }
      pool.help();
      SplitPool::current() = nullptr;
    }
    error.rethrow();
    return;
  }
#endif
  parallel_for(n, fn);
}

}  // namespace retrieval_attention

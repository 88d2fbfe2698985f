// retrieval_attention/parallel.h -- OpenMP loop that carries exceptions out of the parallel region.
//
// An exception escaping an OpenMP region terminates the process; parallel_for catches the first one
// thrown by any iteration, lets the others finish, and rethrows it on the calling thread.
#pragma once

#include <cstdint>
#include <exception>
#include <mutex>

namespace retrieval_attention {

template <class Fn>
void parallel_for(int64_t n, Fn&& fn, bool dynamic = true) {
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
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace retrieval_attention

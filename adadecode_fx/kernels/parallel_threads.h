// Shared by the block_linear kernels (one of them is built per machine).
#pragma once
#include <ATen/Parallel.h>
#include <atomic>
#include <cstdint>

// How many threads a parallel_for here really uses. ATen's parallel_for is inlined from its headers as
// `#pragma omp parallel`: built without -fopenmp it silently runs on one thread.
inline int64_t parallel_threads() {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) { seen |= uint64_t{1} << (at::get_thread_num() % 64); });
  return __builtin_popcountll(seen.load());
}

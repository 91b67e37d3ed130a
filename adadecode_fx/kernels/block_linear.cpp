// Block linear for bf16 on x86 AVX2: y = x @ w.T (+ b), each output rounded exactly as ATen's one-row
// bf16 GEMV rounds it, but every weight row is read from memory once per block instead of once per row.
//
// Why: on CPUs where ATen runs bf16 linears as independent fp32-accumulated dot products (torch 2.13,
// CPU capability AVX2), a block of T rows costs T times one row, so deferred rows are never free.
// Here row m of the result is bit-identical to ATen's result for row m alone; the Python side checks
// that against ATen at load time and falls back to ATen when it does not hold.
//
// ATen's reduction order (ReducedPrecisionFloatGemvFastPathKernel, AVX2: 8 float lanes), reproduced:
//  - 8 accumulator registers; chunk c covers 64 elements, register r lanes l hold element 64c + 8r + l;
//    acc[r] = fma(x, w, acc[r]) in order of c (products of bf16 values are exact in fp32, so the fused
//    and unfused forms agree);
//  - registers folded as acc[i] += acc[i + 4], acc[i] += acc[i + 2], acc[0] += acc[1];
//  - lanes folded as b_i = a_i + a_(i+4), then (b0 + b2) + (b1 + b3);
//  - y = round_to_nearest_even_bf16(beta_term + dot), with the bias as the beta term.
// Only K % 64 == 0 is handled (no tail loop); callers fall back to ATen otherwise.
#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cstring>

#include "parallel_threads.h"

namespace {

inline float lanes_sum(__m256 v) {
  __m256 v1 = _mm256_permute2f128_ps(v, v, 0x1);
  v = _mm256_add_ps(v, v1);
  v1 = _mm256_shuffle_ps(v, v, 0x4E);
  v = _mm256_add_ps(v, v1);
  v1 = _mm256_shuffle_ps(v, v, 0xB1);
  v = _mm256_add_ps(v, v1);
  return _mm256_cvtss_f32(v);
}

// R rows against one weight row, in ATen's order, chunk by chunk: each weight element is loaded and
// widened once (zero-extend from memory, shift into the high half: two uops per 8 values, one scratch
// register) for R rows. R = 2 keeps 16 accumulators + 1 scratch, so at most one spills; from DRAM a
// 2-row call then costs about one ATen row (docs/kernels.md). One-row calls use dots_two_weight_rows.
// (The two-halves loop below is written out twice on purpose: a shared lambda-taking helper measured
// 3-7% slower on two-row blocks; docs/kernels.md.)
constexpr int kRows = 2;
// Bytes of weights (bf16) and of rows (fp32) per tile of a long block: two such tiles fit a 512 KB L2.
constexpr int64_t kTileBytes = 96 * 1024;

// Elements (bf16) a streaming pass prefetches ahead of the row it reads: 2 KB, measured best with two
// streams per thread (docs/kernels.md). The long-block tiles read from L2 and do not prefetch.
constexpr int kPrefetch = 1024;

inline __m256 widen(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline float fold(__m256* a) {
  for (int r = 0; r < 4; ++r) a[r] = _mm256_add_ps(a[r], a[r + 4]);
  for (int r = 0; r < 2; ++r) a[r] = _mm256_add_ps(a[r], a[r + 2]);
  return lanes_sum(_mm256_add_ps(a[0], a[1]));
}

inline void prefetch(const uint16_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 32), _MM_HINT_T0);
}

template <int R, bool PF>
inline void dots_aten_order(const float* x, int64_t K, const uint16_t* w, float* out) {
  __m256 acc[R][8];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < 8; ++r) acc[i][r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < K; j += 64) {
    if (PF) prefetch(w + j + kPrefetch);
    for (int r = 0; r < 8; ++r) {
      const __m256 wr = widen(w + j + 8 * r);
      for (int i = 0; i < R; ++i) acc[i][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * K + j + 8 * r), wr, acc[i][r]);
    }
  }
  for (int i = 0; i < R; ++i) out[i] = fold(acc[i]);
}

// One row against two weight rows far apart in memory. Why: a single sequential stream per core reads
// DRAM at ~15 GB/s here; two streams (plus a short software prefetch) keep more misses in flight and
// reach what a plain read of the same bytes gets (~18-19 GB/s): one-row layer linears ~20% faster.
inline void dots_two_weight_rows(const float* x, int64_t K, const uint16_t* w0, const uint16_t* w1, float* out) {
  __m256 a[8], b[8];
  for (int r = 0; r < 8; ++r) a[r] = b[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < K; j += 64) {
    prefetch(w0 + j + kPrefetch);
    prefetch(w1 + j + kPrefetch);
    for (int r = 0; r < 8; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + j + 8 * r);
      a[r] = _mm256_fmadd_ps(xv, widen(w0 + j + 8 * r), a[r]);
      b[r] = _mm256_fmadd_ps(xv, widen(w1 + j + 8 * r), b[r]);
    }
  }
  out[0] = fold(a);
  out[1] = fold(b);
}

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous [N, K] matrix");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K && K % 64 == 0, "K must match and be a multiple of 64");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  auto xf = x2.to(at::kFloat);  // exact; converted once instead of once per weight row
  const float* xp = xf.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::Tensor bc;
  const uint16_t* bp = nullptr;
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->scalar_type() == at::kBFloat16 && b->numel() == N, "bias must be bf16 [N]");
    bc = b->contiguous();
    bp = reinterpret_cast<const uint16_t*>(bc.data_ptr<at::BFloat16>());
  }
  auto store = [&](int64_t m, int64_t n, float dot) { yp[m * N + n] = to_bf16(bp ? from_bf16(bp[n]) + dot : dot); };
  // Long blocks (a prompt's prefill) are tiled: the weights of a tile of outputs stay in L2 while every
  // tile of rows passes over them, and a tile of rows (fp32) stays in L2 while its outputs are computed.
  // Without tiles each output streamed all M rows of x from L2/L3 (for a 137-row prompt, 2.7 MB per output
  // of the 4864-wide down projection). Each output is still one dots_aten_order call: the bits are the same.
  const int64_t n_tile = std::max<int64_t>(16, kTileBytes / (K * 2));
  const int64_t m_tile = std::max<int64_t>(kRows, kTileBytes / (K * 4) / kRows * kRows);
  at::parallel_for(0, N, n_tile, [&](int64_t begin, int64_t end) {
    float d[kRows];
    // Short blocks stream the weights once, visiting the thread's two halves alternately (two streams).
    const int64_t half = (end - begin) / 2;
    if (M == 1) {
      for (int64_t i = 0; i < half; ++i) {
        dots_two_weight_rows(xp, K, wp + (begin + i) * K, wp + (begin + half + i) * K, d);
        store(0, begin + i, d[0]);
        store(0, begin + half + i, d[1]);
      }
      if (begin + 2 * half < end) {
        dots_aten_order<1, true>(xp, K, wp + (end - 1) * K, d);
        store(0, end - 1, d[0]);
      }
      return;
    }
    if (M <= m_tile) {
      auto output = [&](int64_t n) {
        for (int64_t m = 0; m < M; m += kRows) {
          const int64_t rows = std::min<int64_t>(kRows, M - m);
          if (rows == kRows) {
            dots_aten_order<kRows, true>(xp + m * K, K, wp + n * K, d);
          } else {
            dots_aten_order<1, true>(xp + m * K, K, wp + n * K, d);
          }
          for (int64_t i = 0; i < rows; ++i) store(m + i, n, d[i]);
        }
      };
      for (int64_t i = 0; i < half; ++i) {
        output(begin + i);
        output(begin + half + i);
      }
      if (begin + 2 * half < end) output(end - 1);
      return;
    }
    for (int64_t n0 = begin; n0 < end; n0 += n_tile) {
      const int64_t n1 = std::min(end, n0 + n_tile);
      for (int64_t m0 = 0; m0 < M; m0 += m_tile) {
        const int64_t m1 = std::min(M, m0 + m_tile);
        for (int64_t n = n0; n < n1; ++n) {
          const uint16_t* wn = wp + n * K;
          for (int64_t m = m0; m < m1; m += kRows) {
            const int64_t rows = std::min<int64_t>(kRows, m1 - m);
            const float* xm = xp + m * K;
            if (rows == kRows) {
              dots_aten_order<kRows, false>(xm, K, wn, d);
            } else {
              for (int64_t i = 0; i < rows; ++i) dots_aten_order<1, false>(xm + i * K, K, wn, d + i);
            }
            for (int64_t i = 0; i < rows; ++i) store(m + i, n, d[i]);
          }
        }
      }
    }
  });
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY(adadecode_kernels, m) {
  m.def("block_linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(adadecode_kernels, CPU, m) {
  m.impl("block_linear", &block_linear);
}

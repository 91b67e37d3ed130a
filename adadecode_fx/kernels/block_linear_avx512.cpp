// Block linear for bf16 on x86 AVX-512 BF16: y = x @ w.T (+ b), each output rounded exactly as ATen's
// one-row bf16 linear rounds it on such a CPU, but every weight tile is read from memory once per block.
//
// Why: with AVX-512 BF16, ATen (torch 2.13) sends bf16 linears to oneDNN's brgemm matmul, whose result
// for a row depends on how many rows the call has. A deferred row must equal what plain decoding's
// one-row step computed, so without this kernel a decode block runs one call per row (exact, no saving).
// The Python side checks this kernel against ATen at load time and falls back when it does not hold.
//
// oneDNN's one-row order, reproduced (measured against ATen on shapes K = 64..14336, N = 16..151936,
// 1 and 2 threads, with cancelling data that tells orders apart; docs/kernels.md):
//  - K is cut into blocks of 512; within a block each output accumulates from 0 in k order with
//    vdpbf16ps (acc += x[2p+1] w[2p+1], then += x[2p] w[2p]: the instruction's own order);
//  - block sums are added in block order: c = b0, c = c + b1, ...;
//  - y = round_to_nearest_even_bf16(c + bias) (oneDNN's sum post-op over the bias copied into y).
// So each output lane must hold one output feature: the kernel transposes each 16 x 32 tile of bf16
// weights into vdpbf16ps's pair layout once per block and feeds it to every row of the block.
// Only K % 32 == 0; callers fall back otherwise.
#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel_threads.h"

namespace {

constexpr int64_t kKBlock = 512;  // oneDNN's K block for one-row bf16 matmuls
constexpr int kGroups = 4;        // groups of 16 outputs per panel (one panel's block tile: 64 KB)
constexpr int kRows = 4;          // rows per register pass: kRows x kGroups accumulators
constexpr int kPairsPerBlock = kKBlock / 2;
constexpr int64_t kPanel = 16 * kGroups;
// Prefetch, measured (docs/kernels.md): 512 bytes ahead in the row into L1, plus the same line of the
// next panel into L2; together 1.9x faster than either alone on one-row calls, from DRAM.
constexpr int64_t kAhead = 256;   // bf16 elements a pack prefetches ahead in each weight row

// A prompt's prefill runs as one ATen call, as plain decoding runs it (set by the runtime).
thread_local bool g_prefill = false;

// 16 rows of 16 dwords (bf16 pairs) -> out[j] lane r = dword j of row r.
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4i + q], 128-bit lane L: column 4L + q of rows 4i..4i+3
  for (int q = 0; q < 4; ++q) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x88), a1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x88),
                  b1 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xdd);
    r[q] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
    r[12 + q] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
  }
}

// Pack outputs [n0, n0 + 16 * kGroups) x k in [kb, kb + len) into buf[g][pair][16 lanes].
inline void pack_block(const uint16_t* w, int64_t N, int64_t K, int64_t n0, int64_t kb, int64_t len, __m512i* buf) {
  for (int g = 0; g < kGroups; ++g) {
    const int64_t base = n0 + 16 * g;
    const int valid = static_cast<int>(std::clamp<int64_t>(N - base, 0, 16));
    __m512i* out = buf + g * kPairsPerBlock;
    if (valid == 0) {
      for (int64_t p = 0; p < len / 2; ++p) out[p] = _mm512_setzero_si512();
      continue;
    }
    for (int64_t c = 0; c < len; c += 32) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        if (i < valid) {
          const uint16_t* p = w + (base + i) * K + kb + c;
          if (kb + c + kAhead < K) _mm_prefetch(reinterpret_cast<const char*>(p + kAhead), _MM_HINT_T0);
          // the same line of the next panel, into L2: a panel ahead is far enough to hide DRAM latency
          if (base + i + kPanel < N) _mm_prefetch(reinterpret_cast<const char*>(p + kPanel * K), _MM_HINT_T1);
          r[i] = _mm512_loadu_si512(p);
        } else {
          r[i] = _mm512_setzero_si512();
        }
      }
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(out + c / 2 + j, r[j]);
    }
  }
}

// R rows x kGroups groups over one packed block; c[m][64] gets the block's sums (first block: stores).
template <int R>
inline void rows_block(const uint16_t* x, int64_t K, int64_t kb, int64_t len, const __m512i* buf, float* c,
                       bool first) {
  __m512 acc[R][kGroups];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < kGroups; ++g) acc[i][g] = _mm512_setzero_ps();
  const int64_t pairs = len / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh xv[R];
    for (int i = 0; i < R; ++i) {
      int32_t pair;
      std::memcpy(&pair, x + i * K + kb + 2 * p, 4);
      xv[i] = (__m512bh)_mm512_set1_epi32(pair);
    }
    for (int g = 0; g < kGroups; ++g) {
      const __m512bh wv = (__m512bh)_mm512_load_si512(buf + g * kPairsPerBlock + p);
      for (int i = 0; i < R; ++i) acc[i][g] = _mm512_dpbf16_ps(acc[i][g], xv[i], wv);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < kGroups; ++g) {
      float* dst = c + i * 16 * kGroups + 16 * g;
      _mm512_storeu_ps(dst, first ? acc[i][g] : _mm512_add_ps(_mm512_loadu_ps(dst), acc[i][g]));
    }
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 only");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous [N, K] matrix");
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(x.size(-1) == K && K % 32 == 0, "K must match and be a multiple of 32");
  const bool has_bias = b.has_value() && b->defined();
  auto aten = [&](const at::Tensor& t) { return has_bias ? at::linear(t, w, *b) : at::linear(t, w); };
  if (g_prefill) return aten(x);
  // Every other row, a batch's rows included, is computed as that row alone: a batch row then decodes
  // exactly as its prompt does alone (ATen's one call over B rows would round a row by B).
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::Tensor bc;
  const uint16_t* bp = nullptr;
  if (has_bias) {
    TORCH_CHECK(b->scalar_type() == at::kBFloat16 && b->numel() == N, "bias must be bf16 [N]");
    bc = b->contiguous();
    bp = reinterpret_cast<const uint16_t*>(bc.data_ptr<at::BFloat16>());
  }
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> buf(kGroups * kPairsPerBlock);
    std::vector<float> c(M * kPanel);
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t n0 = panel * kPanel;
      for (int64_t kb = 0; kb < K; kb += kKBlock) {
        const int64_t len = std::min(kKBlock, K - kb);
        pack_block(wp, N, K, n0, kb, len, buf.data());
        int64_t m = 0;
        for (; m + kRows <= M; m += kRows) rows_block<kRows>(xp + m * K, K, kb, len, buf.data(), &c[m * kPanel], kb == 0);
        switch (M - m) {
          case 3: rows_block<3>(xp + m * K, K, kb, len, buf.data(), &c[m * kPanel], kb == 0); break;
          case 2: rows_block<2>(xp + m * K, K, kb, len, buf.data(), &c[m * kPanel], kb == 0); break;
          case 1: rows_block<1>(xp + m * K, K, kb, len, buf.data(), &c[m * kPanel], kb == 0); break;
          default: break;
        }
      }
      for (int g = 0; g < kGroups; ++g) {
        const int64_t base = n0 + 16 * g;
        if (base >= N) break;
        const int valid = static_cast<int>(std::min<int64_t>(N - base, 16));
        const __mmask16 mask = valid == 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
        __m512 bias = _mm512_setzero_ps();
        if (bp) {
          bias = _mm512_castsi512_ps(_mm512_slli_epi32(
              _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bp + base)), 16));
        }
        for (int64_t r = 0; r < M; ++r) {
          __m512 v = _mm512_loadu_ps(&c[r * kPanel + 16 * g]);
          if (bp) v = _mm512_add_ps(v, bias);
          _mm256_mask_storeu_epi16(yp + r * N + base, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  });
  return y.view(sizes);
}

void set_prefill(bool on) { g_prefill = on; }

}  // namespace

TORCH_LIBRARY(adadecode_kernels, m) {
  m.def("block_linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("parallel_threads() -> int", &parallel_threads);
  m.def("set_prefill(bool on) -> ()", &set_prefill);
}

TORCH_LIBRARY_IMPL(adadecode_kernels, CPU, m) {
  m.impl("block_linear", &block_linear);
}

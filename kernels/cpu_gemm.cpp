// GPTQ matmul for CPUs over the packed layout, fp32 activations, for few input rows (decode).
//
//   y[m, n] = sum_g s[g, n] * ( sum_{k in g} x[m, k] * q[k, n]  -  z[g, n] * sum_{k in g} x[m, k] )
//
// qweight is int32 [N_pad / 16, K_pad * BITS / 32, 16]: runs of 32 codes along k, each in BITS words
// (lowest bits first), cut into tiles of 16 output columns stored one after the other, so a tile's codes are
// one sequential read. For 2, 4 and 8 bits a run is the checkpoint's bit stream; 3-bit runs are laid out in the way
// the build decodes cheaply (THREE_BIT_TENS, code_at). Groups are contiguous runs of `group_size`
// columns (a multiple of 32); the caller permutes act-order columns and pads K and N.
// Codes are decoded once per tile of NB output columns and reused for every input row, so the
// weight is read once per call and never expanded in memory. Written as plain loops over a lane
// array that the compiler vectorises for the machine it is built on (-march=native: AVX2 or AVX-512).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int NB = 16;  // output columns per tile: one vector of 16 floats (one AVX-512 register, two AVX2 ones)
#ifdef __AVX512F__
constexpr int MB = 8;   // input rows per pass over the weight tile (their accumulators stay in registers: 32 on AVX-512)
#else
constexpr int MB = 4;   // (16 registers on AVX2, and each vector takes two)
#endif
// The fp32 kernel's rows per pass: on AVX2 six rows' accumulators (12 registers) still fit beside 2-, 4- and 8-bit
// codes (1.3-1.6x faster than passes of 4 at 6 rows, 4-bit); 3-bit codes take more masks, which then spill
// (3-bit over 4-bit time at 6 rows, one thread: 1.05-1.18 with passes of 6, 0.92-1.07 with passes of 4 and 2).
template <int BITS>
constexpr int rows_per_pass() {
#ifdef __AVX512F__
  return MB;
#else
  return BITS == 3 ? 4 : 6;
#endif
}

// Codes are asked for this many runs of 32 ahead (16 KB at 4 bits), into L2 (hint 1): inside a model's decode
// step the weights come from memory, and 16 runs into L1 measured 0.4-1.0 ms/token slower on SmolLM2
// (scripts/bench_stream.py shows the one-row kernel near the speed of a plain read of its bytes).
constexpr int PREFETCH_RUNS = 128;

// The scales and zeros of the tile after n0 (one line per group each; they are read at every group's end).
inline void prefetch_next_groups(const float* scales, const float* zeros, int64_t n_groups, int64_t ld, int64_t n0) {
  for (int64_t g = 0; g < n_groups; ++g) {
    __builtin_prefetch(scales + g * ld + n0 + NB, 0, 1);
    __builtin_prefetch(zeros + g * ld + n0 + NB, 0, 1);
  }
}

// Tiles per thread's share: a call smaller than SERIAL_WORK row-weights runs on the calling thread, since
// waking the pool costs more than it saves there (SmolLM2's 576x576 layers at one row).
int64_t serial_work = 1 << 15;
inline int64_t grain(int64_t tiles, int64_t m, int64_t k_pad) {
  return m * k_pad * tiles * NB < serial_work ? tiles : 1;
}

// GCC vector extensions: the compiler lowers these to AVX-512 or pairs of AVX2 instructions.
typedef float vf __attribute__((vector_size(NB * 4)));
typedef uint32_t vu __attribute__((vector_size(NB * 4)));
typedef int32_t vi __attribute__((vector_size(NB * 4)));  // codes < 256: a signed convert (AVX2 has no unsigned one)

inline vu load_u(const uint32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vf load_f(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 floats to p: with AVX2 as two explicit 8-float stores (GCC lowered a 64-byte memcpy there through the stack
// and general registers, several times slower)
inline void store_f(float* p, vf v) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  _mm256_storeu_ps(p, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_ps(p + 8, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// y[m, n0 .. n0+15] = out[m] (+ bias), cut at n_out
template <int rows>
inline void store(const vf* out, float* y, int64_t n_out, int64_t n0, const float* bias) {
  const int64_t width = std::min<int64_t>(NB, n_out - n0);
  for (int m = 0; m < rows; ++m)
    for (int l = 0; l < width; ++l) y[m * n_out + n0 + l] = out[m][l] + (bias ? bias[n0 + l] : 0.f);
}

// The layout of 3-bit runs, by build. AVX2-only builds ("tens"): word b holds codes 10b + j at bit 3j (j < 10);
// its top two bits hold the low bits of code 30 (word 0) and 31 (word 1), whose high bits are bits 30 and 31 of
// word 2, so 30 of 32 codes are masked and converted like 2-, 4- and 8-bit ones (on the AVX2 EPYC: 3-bit one-row
// time 1.06-1.18x 4-bit's in cache, 0.78-1.05x from memory, where the planes took 1.26-1.41x). Other builds
// ("planes", as measured on the AVX-512 VNNI Xeon): words 0 and 1 hold the low two bits of codes 0-15 and 16-31 as
// 2-bit codes; word 2 holds the high bit of code 16b + 4t + j at bit 8t + 4b + j, so that one shift lines up the
// high bits of four codes with their low bits byte by byte (the int8 path decodes four codes per lane with five
// operations; with tens it would take about 18).
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool THREE_BIT_TENS = true;
#else
constexpr bool THREE_BIT_TENS = false;
#endif
constexpr int high_bit_position(int i) { return 8 * ((i % 16) / 4) + 4 * (i / 16) + i % 4; }

template <int BITS>
inline vu code_at(const vu* w, int i) {
  if constexpr (BITS == 3 && THREE_BIT_TENS) {
    if (i < 30) return (w[i / 10] >> (3 * (i % 10))) & 7u;
    return (w[i - 30] >> 30) | ((w[2] >> (i - 2)) & 4u);
  } else if constexpr (BITS == 3) {
    return ((w[i / 16] >> (2 * (i % 16))) & 3u) | (((w[2] >> high_bit_position(i)) & 1u) << 2);
  } else {
    return (w[(i * BITS) / 32] >> ((i * BITS) % 32)) & ((1u << BITS) - 1);
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: the same loop, written with intrinsics on pairs of 8-lane registers. GCC kept the 16-float vector type's
// accumulators on the stack here, so each multiply-add waited on a store and a load (3-4x slower at one row).

// code i of a run (0..31) for the 8 lanes of half h of the tile, from its BITS words at w (int32 [BITS][16]).
// The code is masked where it sits, not shifted down: its value is code * 2^shift, and the input it multiplies was
// pre-multiplied by 2^-shift (prescale_rows), so the product is the same float. One operation fewer per code (the
// top code of a word is shifted down instead: it needs no mask, and a mask would reach the sign bit).
template <int BITS>
inline __m256i code8(const uint32_t* w, int h, int i) {
  const auto word = [&](int b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * NB + 8 * h)); };
  if constexpr (BITS == 3) {  // tens (THREE_BIT_TENS)
    if (i < 30) return _mm256_and_si256(word(i / 10), _mm256_set1_epi32(7 << (3 * (i % 10))));
    // codes 30 and 31: two bits from the top of word 0 or 1, the high bit from word 2 (shifted down, not pre-scaled)
    return _mm256_or_si256(_mm256_srli_epi32(word(i - 30), 30),
                           _mm256_and_si256(_mm256_srli_epi32(word(2), i - 2), _mm256_set1_epi32(4)));
  } else {
    const int shift = (i * BITS) % 32;
    if (shift + BITS == 32) return _mm256_srli_epi32(word((i * BITS) / 32), shift);
    return _mm256_and_si256(word((i * BITS) / 32), _mm256_set1_epi32(((1 << BITS) - 1) << shift));
  }
}

template <int BITS, int rows>
void tile(const float* x, int64_t k_pad, const uint32_t* qw, const float* scales, const float* zeros,
          const float* xsum, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, int64_t n0, float* y, int64_t n_out,
          const float* bias) {
  const uint32_t* tile_qw = qw + (n0 / NB) * (k_pad / 32 * BITS) * NB;
  prefetch_next_groups(scales, zeros, n_groups, n_pad, n0);
  __m256 out[rows][2];
  for (int m = 0; m < rows; ++m) out[m][0] = out[m][1] = _mm256_setzero_ps();
  // independent accumulator chains against the FMA latency (3-bit at one row: 2, since its ten masks then stay in
  // registers; one thread, cache-hot, 1.02-1.12x faster than 4 chains)
  constexpr int chains = rows >= 4 ? 1 : (BITS == 3 && rows == 1) ? 2 : 4 / rows;
  for (int64_t g = 0; g < n_groups; ++g) {
    __m256 acc[rows][chains][2];
#pragma GCC unroll 16
    for (int m = 0; m < rows; ++m)
#pragma GCC unroll 4
      for (int c = 0; c < chains; ++c) acc[m][c][0] = acc[m][c][1] = _mm256_setzero_ps();
    const int64_t run_end = std::min((g + 1) * runs_per_group, k_pad / 32);
    for (int64_t run = g * runs_per_group; run < run_end; ++run) {
      const uint32_t* w = tile_qw + run * BITS * NB;
      for (int b = 0; b < BITS; ++b) __builtin_prefetch(tile_qw + ((run + PREFETCH_RUNS) * BITS + b) * NB, 0, 1);
      const float* xr = x + run * 32;
      const auto step = [&](int i, __m256 q0, __m256 q1) {
#pragma GCC unroll 16
        for (int m = 0; m < rows; ++m) {
          const __m256 a = _mm256_broadcast_ss(xr + m * k_pad + i);
          acc[m][i % chains][0] = _mm256_fmadd_ps(a, q0, acc[m][i % chains][0]);
          acc[m][i % chains][1] = _mm256_fmadd_ps(a, q1, acc[m][i % chains][1]);
        }
      };
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) step(i, _mm256_cvtepi32_ps(code8<BITS>(w, 0, i)), _mm256_cvtepi32_ps(code8<BITS>(w, 1, i)));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(scales + g * n_pad + n0 + 8 * h);
      const __m256 z = _mm256_loadu_ps(zeros + g * n_pad + n0 + 8 * h);
#pragma GCC unroll 16
      for (int m = 0; m < rows; ++m) {
        __m256 a = acc[m][0][h];
        for (int c = 1; c < chains; ++c) a = _mm256_add_ps(a, acc[m][c][h]);
        const __m256 centred = _mm256_sub_ps(a, _mm256_mul_ps(z, _mm256_set1_ps(xsum[m * n_groups + g])));
        out[m][h] = _mm256_add_ps(out[m][h], _mm256_mul_ps(s, centred));
      }
    }
  }
  vf o[rows];
  for (int m = 0; m < rows; ++m) {
    std::memcpy(&o[m], &out[m][0], 32);
    std::memcpy(reinterpret_cast<float*>(&o[m]) + 8, &out[m][1], 32);
  }
  store<rows>(o, y, n_out, n0, bias);
}
#else
template <int BITS, int rows>
void tile(const float* x, int64_t k_pad, const uint32_t* qw, const float* scales, const float* zeros,
          const float* xsum, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, int64_t n0, float* y, int64_t n_out,
          const float* bias) {
  static_assert(!THREE_BIT_TENS, "builds with the tens layout use the AVX2 tile");
  const uint32_t* tile_qw = qw + (n0 / NB) * (k_pad / 32 * BITS) * NB;
  prefetch_next_groups(scales, zeros, n_groups, n_pad, n0);
  vf out[rows];
  for (int m = 0; m < rows; ++m) out[m] = vf{};
  // Independent accumulator chains per row, so that few rows are not bound by the FMA latency.
  constexpr int chains = rows >= 4 ? 1 : 4 / rows;
  for (int64_t g = 0; g < n_groups; ++g) {
    vf acc[rows][chains];
    for (int m = 0; m < rows; ++m)
      for (int c = 0; c < chains; ++c) acc[m][c] = vf{};
    const int64_t run_end = std::min((g + 1) * runs_per_group, k_pad / 32);
    for (int64_t run = g * runs_per_group; run < run_end; ++run) {
      vu w[BITS];
      for (int b = 0; b < BITS; ++b) w[b] = load_u(tile_qw + (run * BITS + b) * NB);
      // Codes are read once, from memory (a model's weights are not in cache): ask for them early.
      for (int b = 0; b < BITS; ++b) __builtin_prefetch(tile_qw + ((run + PREFETCH_RUNS) * BITS + b) * NB, 0, 1);
      const float* xr = x + run * 32;
      if constexpr (BITS == 3) {
        // planes: four codes per lane at a time, one per byte, as the int8 path takes them: 11 operations for
        // four codes instead of 6 for each (code_at)
#pragma GCC unroll 8
        for (int a = 0; a < 8; ++a) {
          const vu c = ((w[a / 4] >> ((a % 4) * 2)) & 0x03030303u) | (((w[2] >> a) << 2) & 0x04040404u);
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t) {
            const int i = 16 * (a / 4) + 4 * t + a % 4;  // byte t holds code i (see high_bit_position)
            const vu code = t == 0 ? c & 0xFFu : t == 3 ? c >> 24 : (c >> (8 * t)) & 0xFFu;
            const vf q = __builtin_convertvector((vi)code, vf);
            for (int m = 0; m < rows; ++m) acc[m][i % chains] += xr[m * k_pad + i] * q;
          }
        }
      } else {
#pragma GCC unroll 32
        for (int i = 0; i < 32; ++i) {
          const vf q = __builtin_convertvector((vi)code_at<BITS>(w, i), vf);
          for (int m = 0; m < rows; ++m) acc[m][i % chains] += xr[m * k_pad + i] * q;
        }
      }
    }
    const vf s = load_f(scales + g * n_pad + n0);
    const vf z = load_f(zeros + g * n_pad + n0);
    for (int m = 0; m < rows; ++m) {
      vf a = acc[m][0];
      for (int c = 1; c < chains; ++c) a += acc[m][c];
      out[m] += s * (a - z * xsum[m * n_groups + g]);
    }
  }
  store<rows>(out, y, n_out, n0, bias);
}

#endif

template <int BITS>
void run(const float* x, int64_t m_total, int64_t k_pad, const uint32_t* qw, const float* scales, const float* zeros,
         const float* xsum, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, float* y, int64_t n_out,
         const float* bias) {
  const int64_t tiles = n_pad / NB;
  at::parallel_for(0, tiles, grain(tiles, m_total, k_pad), [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < m_total;) {
      // passes of rows_per_pass, 4, 2 or 1 rows, each a separate instantiation with its accumulators in registers
      const int64_t left = m_total - m0;
      constexpr int mb = rows_per_pass<BITS>();
      const int rows = left >= mb ? mb : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t t = t0; t < t1; ++t) {
        const float* xm = x + m0 * k_pad;
        const float* xs = xsum + m0 * n_groups;
        float* ym = y + m0 * n_out;
        const int64_t n0 = t * NB;
        if (rows == mb && mb != 4) tile<BITS, mb>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out, bias);
        else if (rows == 4) tile<BITS, 4>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out, bias);
        else if (rows == 2) tile<BITS, 2>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out, bias);
        else tile<BITS, 1>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out, bias);
      }
      m0 += rows;
    }
  });
}

// ---- many rows: dequantize a slice, then a register-blocked fp32 kernel --------------------------------
//
// For many rows, decoding inside the row loop (tile) costs as many decodes as there are passes of rows. Here each
// slice of K_BLOCK inputs x 16 outputs is dequantized once into a buffer that stays in L1, and every row then runs
// over it with the inner loop of a dense GEMM: per input, one load of 16 weights and one multiply-add per row,
// BLOCK_ROWS rows' accumulators held in registers. Rows' partial sums go to y between slices.
constexpr int K_BLOCK = 256;  // 16 KB of fp32 weights, beside BLOCK_ROWS rows' 1 KB slices of x, in a 32 KB L1
#ifdef __AVX512F__
constexpr int BLOCK_ROWS = 12;  // 12 accumulators hide the FMA latency (not yet measured on an AVX-512 machine)
#else
constexpr int BLOCK_ROWS = 6;  // 12 accumulators + 2 weight registers + 1 broadcast of the 16 AVX2 registers
#endif

template <int BITS>
void dequant_slice(const uint32_t* tile_qw, const float* scales, const float* zeros, int64_t n_pad, int64_t n0,
                   int64_t run0, int64_t run1, int64_t runs_per_group, float* panel) {
  for (int64_t run = run0; run < run1; ++run) {
    const int64_t g = run / runs_per_group;
    vu w[BITS];
    for (int b = 0; b < BITS; ++b) w[b] = load_u(tile_qw + (run * BITS + b) * NB);
    const vf s = load_f(scales + g * n_pad + n0);
    const vf z = load_f(zeros + g * n_pad + n0);
    float* p = panel + (run - run0) * 32 * NB;
#pragma GCC unroll 32
    for (int i = 0; i < 32; ++i) {
      store_f(p + i * NB, s * (__builtin_convertvector((vi)code_at<BITS>(w, i), vf) - z));  // as dequant: one rounding
    }
  }
}

// y[m, 0..15] (row stride ld) = (init or y[m]) + x[m, 0..kb) . panel[0..kb) for `rows` rows (x row stride k_pad).
// AVX2 gets intrinsics: GCC's lowering of the 16-float vector type to pairs of AVX2 registers kept this loop's
// accumulators on the stack (0.1x dense); with AVX-512 the same vector type becomes one FMA with a broadcast
// operand per row.
template <int rows>
inline void block_rows(const float* x, int64_t k_pad, const float* panel, int64_t kb, float* y, int64_t ld, const float* init) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  __m256 lo[rows], hi[rows];
#pragma GCC unroll 16
  for (int m = 0; m < rows; ++m) {
    lo[m] = _mm256_loadu_ps(init ? init : y + m * ld);
    hi[m] = _mm256_loadu_ps(init ? init + 8 : y + m * ld + 8);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kb; ++k) {
    const __m256 w0 = _mm256_load_ps(panel + k * NB), w1 = _mm256_load_ps(panel + k * NB + 8);
#pragma GCC unroll 16
    for (int m = 0; m < rows; ++m) {
      const __m256 a = _mm256_broadcast_ss(x + m * k_pad + k);
      lo[m] = _mm256_fmadd_ps(a, w0, lo[m]);
      hi[m] = _mm256_fmadd_ps(a, w1, hi[m]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < rows; ++m) {
    _mm256_storeu_ps(y + m * ld, lo[m]);
    _mm256_storeu_ps(y + m * ld + 8, hi[m]);
  }
#else
  vf acc[rows];
#pragma GCC unroll 16
  for (int m = 0; m < rows; ++m) acc[m] = load_f(init ? init : y + m * ld);
  for (int64_t k = 0; k < kb; ++k) {
    const vf w = load_f(panel + k * NB);
#pragma GCC unroll 16
    for (int m = 0; m < rows; ++m) acc[m] += x[m * k_pad + k] * w;
  }
#pragma GCC unroll 16
  for (int m = 0; m < rows; ++m) std::memcpy(y + m * ld, &acc[m], sizeof(vf));
#endif
}

// y [M, N_pad] (row stride N_pad): chunk by chunk of M_BLOCK rows (their slices of x, 96 KB, stay in L2 while every
// tile of 16 outputs runs over them), slice by slice of K
constexpr int64_t M_BLOCK = 96;

template <int BITS>
void run_blocked(const float* x, int64_t m_total, int64_t k_pad, const uint32_t* qw, const float* scales,
                 const float* zeros, int64_t runs_per_group, int64_t n_pad, float* y, const float* bias, int64_t n_out) {
  const int64_t tiles = n_pad / NB, runs = k_pad / 32;
  at::parallel_for(0, tiles, grain(tiles, m_total, k_pad), [&](int64_t t0, int64_t t1) {
    alignas(64) static thread_local float panel[K_BLOCK * NB];
    for (int64_t mc = 0; mc < m_total; mc += M_BLOCK) {
      const int64_t m_end = std::min(m_total, mc + M_BLOCK);
      for (int64_t run0 = 0; run0 < runs; run0 += K_BLOCK / 32) {
        const int64_t run1 = std::min(runs, run0 + K_BLOCK / 32), kb = (run1 - run0) * 32;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n0 = t * NB;
          dequant_slice<BITS>(qw + t * runs * BITS * NB, scales, zeros, n_pad, n0, run0, run1, runs_per_group, panel);
          alignas(64) float start[NB] = {};
          for (int l = 0; bias && l < NB && n0 + l < n_out; ++l) start[l] = bias[n0 + l];
          const float* init = run0 == 0 ? start : nullptr;
          const float* xk = x + run0 * 32;
          for (int64_t m0 = mc; m0 < m_end;) {
            const int64_t left = m_end - m0;
            const float* xm = xk + m0 * k_pad;
            float* ym = y + m0 * n_pad + n0;
            if (left >= BLOCK_ROWS) {
              block_rows<BLOCK_ROWS>(xm, k_pad, panel, kb, ym, n_pad, init);
              m0 += BLOCK_ROWS;
            } else if (left >= 4) {
              block_rows<4>(xm, k_pad, panel, kb, ym, n_pad, init);
              m0 += 4;
            } else if (left >= 2) {
              block_rows<2>(xm, k_pad, panel, kb, ym, n_pad, init);
              m0 += 2;
            } else {
              block_rows<1>(xm, k_pad, panel, kb, ym, n_pad, init);
              m0 += 1;
            }
          }
        }
      }
    }
  });
}

// ---- int8 activations: integer dot products (VNNI) ------------------------------------------------
//
//   y[m, n] = sum_g s[g, n] * ( sum_{r in g} d[m, r] * sum_{k in r} xq[m, k] * q[k, n]  -  z[g, n] * xs[m, g] )
//
// Each run r of 32 inputs of a row is rounded with its own scale d = max|x| / 127 to one int8 digit
// (xq = round(x / d)) or two (round_rows), and xs[m, g] = sum_{r in g} d[m, r] * sum_{k in r} xq[m, k] is the
// zero-point term of the rounded inputs, so the result is exactly the oracle's matmul of the rounded
// activations. Codes (unsigned bytes) times digits (signed) are summed four at a time into int32 lanes: one
// vpdpbusd per 64 products with AVX-512 VNNI, two with AVX-VNNI, six with plain AVX2 (vpmaddubsw, vpmaddwd, vpaddd
// per half; codes of up to 4 bits), plain integer vector code elsewhere (correct, slower: `auto` times it and
// will not pick it there).

template <int BITS>
inline vi dot4(vi acc, vu codes, int32_t x4) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)codes, _mm512_set1_epi32(x4));
#elif defined(__AVXVNNI__)
  __m256i a[2], c[2];
  std::memcpy(a, &acc, sizeof(acc));
  std::memcpy(c, &codes, sizeof(codes));
  const __m256i xb = _mm256_set1_epi32(x4);
  a[0] = _mm256_dpbusd_avx_epi32(a[0], c[0], xb);
  a[1] = _mm256_dpbusd_avx_epi32(a[1], c[1], xb);
  std::memcpy(&acc, a, sizeof(acc));
  return acc;
#else
#if defined(__AVX2__)
  if constexpr (BITS <= 4) {
    // AVX2 without VNNI: pairs of code x digit products summed to int16, then pairs of those to int32 (three
    // instructions per 32 products). The int16 sums cannot saturate: 2 * 15 * 127 < 2^15 for codes below 16;
    // 8-bit codes (2 * 255 * 127) take the plain path below.
    __m256i a[2], c[2];
    std::memcpy(a, &acc, sizeof(acc));
    std::memcpy(c, &codes, sizeof(codes));
    const __m256i xb = _mm256_set1_epi32(x4), ones = _mm256_set1_epi16(1);
    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(_mm256_maddubs_epi16(c[0], xb), ones));
    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(_mm256_maddubs_epi16(c[1], xb), ones));
    std::memcpy(&acc, a, sizeof(acc));
    return acc;
  }
#endif
  for (int t = 0; t < 4; ++t)
    acc += (vi)((codes >> (8 * t)) & 0xFFu) * (int32_t)(int8_t)(x4 >> (8 * t));
  return acc;
#endif
}

// Where input k (0..31) of a run sits in the rounded row: the order in which the kernel takes bytes.
// A word of codes is split into bytes by one shift and mask per code in a byte (byte t of word b, after
// shifting by j*BITS, holds code b*32/BITS + t*(8/BITS) + j), so the inputs are stored in that order;
// 3-bit planes are decoded as 2-bit codes (code_at); 3-bit tens are gathered into bytes one by one, in their
// natural order.
constexpr int i8_position(int bits, int k) {
  if (bits == 3 && THREE_BIT_TENS) return k;
  if (bits == 3) bits = 2;
  const int per_byte = 8 / bits, per_word = 32 / bits;
  const int b = k / per_word, t = (k % per_word) / per_byte, j = k % per_byte;
  return b * per_word + j * 4 + t;
}

typedef int8_t vb16 __attribute__((vector_size(NB)));
typedef int8_t vb32 __attribute__((vector_size(32)));

// The byte shuffle that puts a run's 32 digits (natural order) into the kernel's order (i8_position).
template <int BITS>
vb32 i8_order() {
  int8_t table[32];
  for (int k = 0; k < 32; ++k) table[i8_position(BITS, k)] = (int8_t)k;
  vb32 order;
  std::memcpy(&order, table, 32);
  return order;
}

inline float lanes_max(vf v) {
  float m = v[0];
  for (int l = 1; l < NB; ++l) m = std::max(m, v[l]);
  return m;
}

inline float lanes_sum(vf v) {
  float s = 0.f;
  for (int l = 0; l < NB; ++l) s += v[l];
  return s;
}

// Rounds x (the rows in kernel order, padded to k_pad) run by run: f = x / d with d = max|x| / 127, the high
// digit q = round(f) and, with DIGITS = 2, the low digit r = round((f - q) * 254), so x ≈ d * (q + r / 254)
// (relative step about 2^-15 instead of 2^-8). Digit planes of [M, k_pad] follow each other in xq.
template <int BITS, int DIGITS>
void round_rows(const float* x, int64_t m_total, int64_t k_pad, int64_t n_groups, int64_t runs_per_group, int8_t* xq,
                float* d, float* xs) {
  static const vb32 order = i8_order<BITS>();
  const int64_t runs = k_pad / 32;
  // rounding half to even by the float adder: exact for |f| < 2^22 (here |f| <= 127)
  const vf magic = vf{} + 12582912.f;
  const auto round_even = [&](vf f) { return (f + magic) - magic; };
  const auto digits_of = [&](vf lo, vf hi) {  // two runs of 16 integral floats -> 32 int8 in kernel order
    const vb16 a = __builtin_convertvector(__builtin_convertvector(lo, vi), vb16);
    const vb16 b = __builtin_convertvector(__builtin_convertvector(hi, vi), vb16);
    vb32 both;
    std::memcpy(&both, &a, NB);
    std::memcpy(reinterpret_cast<int8_t*>(&both) + NB, &b, NB);
    return __builtin_shuffle(both, order);
  };
  for (int64_t m = 0; m < m_total; ++m) {
    for (int64_t g = 0; g < n_groups; ++g) xs[m * n_groups + g] = 0.f;
    for (int64_t r = 0; r < runs; ++r) {
      const float* xr = x + m * k_pad + r * 32;
      const vf x0 = load_f(xr), x1 = load_f(xr + NB);
      const vf a0 = x0 < 0 ? -x0 : x0, a1 = x1 < 0 ? -x1 : x1;
      const float amax = lanes_max(a0 > a1 ? a0 : a1);
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const vf f0 = x0 * inv, f1 = x1 * inv;
      const vf q0 = round_even(f0), q1 = round_even(f1);
      int8_t* high = xq + m * k_pad + r * 32;
      const vb32 hd = digits_of(q0, q1);
      std::memcpy(high, &hd, 32);
      float total = lanes_sum(q0 + q1);
      if constexpr (DIGITS == 2) {
        const vf l0 = round_even((f0 - q0) * 254.f), l1 = round_even((f1 - q1) * 254.f);
        const vb32 ld = digits_of(l0, l1);
        std::memcpy(high + m_total * k_pad, &ld, 32);
        total += lanes_sum(l0 + l1) / 254.f;
      }
      d[m * runs + r] = scale;
      xs[m * n_groups + std::min(r / runs_per_group, n_groups - 1)] += scale * total;
    }
  }
}

// TILES output tiles at once (one row of x only, TILES > 1): their codes come from TILES places in memory and their
// dot-product chains are independent, so more loads and multiply-adds are in flight than one tile's.
template <int BITS, int DIGITS, int rows, int TILES = 1>
void tile_i8(const int8_t* xq, int64_t low_plane, const float* d, int64_t k_pad, const uint32_t* qw, const float* scales,
             const float* zeros, const float* xs, int64_t n_groups, int64_t runs_per_group, int64_t n_pad,
             const int64_t* n0, float* y, int64_t n_out, const float* bias) {
  static_assert(TILES == 1 || rows == 1, "several tiles at once for one row of x only");
  const int64_t runs = k_pad / 32;
  const uint32_t* tile_qw[TILES];
  for (int u = 0; u < TILES; ++u) {
    tile_qw[u] = qw + (n0[u] / NB) * (runs * BITS) * NB;
    prefetch_next_groups(scales, zeros, n_groups, n_pad, n0[u]);
  }
  vf out[TILES][rows];
  for (int u = 0; u < TILES; ++u)
    for (int m = 0; m < rows; ++m) out[u][m] = vf{};
  for (int64_t g = 0; g < n_groups; ++g) {
    vf acc[TILES][rows];
    for (int u = 0; u < TILES; ++u)
      for (int m = 0; m < rows; ++m) acc[u][m] = vf{};
    const int64_t run_end = std::min((g + 1) * runs_per_group, runs);
    for (int64_t run = g * runs_per_group; run < run_end; ++run) {
      vu w[TILES][BITS];
      for (int u = 0; u < TILES; ++u) {
        for (int b = 0; b < BITS; ++b) w[u][b] = load_u(tile_qw[u] + (run * BITS + b) * NB);
        for (int b = 0; b < BITS; ++b) __builtin_prefetch(tile_qw[u] + ((run + PREFETCH_RUNS) * BITS + b) * NB, 0, 1);
      }
      // two chains per row against the dot-product latency: alternate inputs, or the two digits
      vi dots[TILES][rows][2];
      for (int u = 0; u < TILES; ++u)
        for (int m = 0; m < rows; ++m) dots[u][m][0] = dots[u][m][1] = vi{};
      const int8_t* xr = xq + run * 32;
#pragma GCC unroll 8
      for (int a = 0; a < 8; ++a) {  // byte t of lane c: the code at input position 4a + t of the rounded row
        for (int u = 0; u < TILES; ++u) {
          vu c;
          if constexpr (BITS == 3 && THREE_BIT_TENS) {  // codes 4a .. 4a + 3, one per byte
            c = code_at<3>(w[u], 4 * a) | (code_at<3>(w[u], 4 * a + 1) << 8) | (code_at<3>(w[u], 4 * a + 2) << 16) |
                (code_at<3>(w[u], 4 * a + 3) << 24);
          } else if constexpr (BITS == 3) {  // planes: as 2-bit codes, plus the high bits lined up by one shift
            c = ((w[u][a / 4] >> ((a % 4) * 2)) & 0x03030303u) | (((w[u][2] >> a) << 2) & 0x04040404u);
          } else {  // word a / per_byte, shifted by (a % per_byte) * BITS
            constexpr int per_byte = 8 / BITS;
            c = (w[u][a / per_byte] >> ((a % per_byte) * BITS)) & (0x01010101u * ((1u << BITS) - 1));
          }
          for (int m = 0; m < rows; ++m) {
            int32_t x4;
            std::memcpy(&x4, xr + m * k_pad + 4 * a, 4);
            if constexpr (DIGITS == 2) {
              dots[u][m][0] = dot4<BITS>(dots[u][m][0], c, x4);
              std::memcpy(&x4, xr + low_plane + m * k_pad + 4 * a, 4);
              dots[u][m][1] = dot4<BITS>(dots[u][m][1], c, x4);
            } else {
              dots[u][m][a & 1] = dot4<BITS>(dots[u][m][a & 1], c, x4);
            }
          }
        }
      }
      const float step = 1.f / 254.f;
      for (int u = 0; u < TILES; ++u)
        for (int m = 0; m < rows; ++m) {
          const vf sum = DIGITS == 2 ? __builtin_convertvector(dots[u][m][0], vf) + __builtin_convertvector(dots[u][m][1], vf) * step
                                     : __builtin_convertvector(dots[u][m][0] + dots[u][m][1], vf);
          acc[u][m] += sum * d[m * runs + run];
        }
    }
    for (int u = 0; u < TILES; ++u) {
      const vf s = load_f(scales + g * n_pad + n0[u]);
      const vf z = load_f(zeros + g * n_pad + n0[u]);
      for (int m = 0; m < rows; ++m) out[u][m] += s * (acc[u][m] - z * xs[m * n_groups + g]);
    }
  }
  for (int u = 0; u < TILES; ++u) store<rows>(out[u], y, n_out, n0[u], bias);
}

// Output tiles computed at once by a one-row call of the int8 kernels (1 or 2; set_tile_streams). Two made the fused
// decode step 1.06-1.13x faster on the AVX-512 Xeon (experiments/tile_streams_step_ab.py; alone, per shape, 0.92-1.36x:
// tile_streams_ab.py); with AVX2's sixteen registers two tiles' state would spill, so there it stays 1 (unmeasured).
#if defined(__AVX512F__)
int64_t tile_streams = 2;
#else
int64_t tile_streams = 1;
#endif

template <int BITS, int DIGITS>
void run_i8(const int8_t* xq, const float* d, int64_t m_total, int64_t k_pad, const uint32_t* qw, const float* scales,
            const float* zeros, const float* xs, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, float* y,
            int64_t n_out, const float* bias) {
  const int64_t tiles = n_pad / NB, runs = k_pad / 32, low_plane = m_total * k_pad;
  at::parallel_for(0, tiles, grain(tiles, m_total, k_pad), [&](int64_t t0, int64_t t1) {
    if (m_total == 1 && tile_streams == 2 && t1 - t0 >= 2) {
      // tiles t and t + half together: two sequential streams through this thread's share of the codes
      const int64_t half = (t1 - t0 + 1) / 2;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t n0[2] = {(t0 + i) * NB, (t0 + half + i) * NB};
        if (t0 + half + i < t1)
          tile_i8<BITS, DIGITS, 1, 2>(xq, low_plane, d, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad,
                                      n0, y, n_out, bias);
        else
          tile_i8<BITS, DIGITS, 1>(xq, low_plane, d, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad,
                                   n0, y, n_out, bias);
      }
      return;
    }
    for (int64_t m0 = 0; m0 < m_total;) {
      const int64_t left = m_total - m0;
      const int rows = left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t t = t0; t < t1; ++t) {
        const int8_t* xm = xq + m0 * k_pad;
        const float* dm = d + m0 * runs;
        const float* xsm = xs + m0 * n_groups;
        float* ym = y + m0 * n_out;
        const int64_t n0 = t * NB;
#define GPTQ_TILE(R) tile_i8<BITS, DIGITS, R>(xm, low_plane, dm, k_pad, qw, scales, zeros, xsm, n_groups, runs_per_group, \
                                              n_pad, &n0, ym, n_out, bias)
        if (rows == 4) GPTQ_TILE(4);
        else if (rows == 2) GPTQ_TILE(2);
        else GPTQ_TILE(1);
#undef GPTQ_TILE
      }
      m0 += rows;
    }
  });
}

// Dense W^T [K_pad, N_pad] from the packed codes: the dequantize-then-GEMM path for many rows.
// OUT is float or uint16_t (bf16 bits, rounded to nearest even with integer vector ops).
typedef uint16_t vh __attribute__((vector_size(NB * 2)));

template <int BITS, typename OUT>
void dequant(const uint32_t* qw, const float* scales, const float* zeros, int64_t k_pad, int64_t n_pad,
             int64_t runs_per_group, OUT* w) {
  const int64_t runs = k_pad / 32;
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t run = r0; run < r1; ++run) {
      const int64_t g = run / runs_per_group;
      for (int64_t n0 = 0; n0 < n_pad; n0 += NB) {
        const uint32_t* tile_qw = qw + (n0 / NB) * (runs * BITS) * NB;
        vu wd[BITS];
        for (int b = 0; b < BITS; ++b) wd[b] = load_u(tile_qw + (run * BITS + b) * NB);
        const vf s = load_f(scales + g * n_pad + n0);
        const vf z = load_f(zeros + g * n_pad + n0);
#pragma GCC unroll 32
        for (int i = 0; i < 32; ++i) {
          const vf f = s * (__builtin_convertvector((vi)code_at<BITS>(wd, i), vf) - z);  // q − z is exact: one rounding, as the oracle
          OUT* row = w + (run * 32 + i) * n_pad + n0;
          if constexpr (sizeof(OUT) == 4) {
            store_f(row, f);
          } else {
            vu u;
            std::memcpy(&u, &f, sizeof(u));
            u += 0x7FFFu + ((u >> 16) & 1u);
            const vh h = __builtin_convertvector(u >> 16, vh);
            std::memcpy(row, &h, sizeof(h));
          }
        }
      }
    }
  });
}

template <typename OUT>
void dequant_bits(int64_t bits, const uint32_t* qw, const float* s, const float* z, int64_t k_pad, int64_t n_pad,
                  int64_t rpg, OUT* w) {
  switch (bits) {
    case 2: dequant<2, OUT>(qw, s, z, k_pad, n_pad, rpg, w); break;
    case 3: dequant<3, OUT>(qw, s, z, k_pad, n_pad, rpg, w); break;
    case 4: dequant<4, OUT>(qw, s, z, k_pad, n_pad, rpg, w); break;
    case 8: dequant<8, OUT>(qw, s, z, k_pad, n_pad, rpg, w); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8, got ", bits);
  }
}

}  // namespace

// qweight int32 [N_pad/16, K_pad*bits/32, 16]; scales, zeros fp32 [G, N_pad] -> W^T written into out [K_pad, N_pad], fp32 or bf16
torch::Tensor gptq_dequant(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                           int64_t group_size, torch::Tensor out) {
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "qweight must be contiguous int32");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32, "scales/zeros must be fp32");
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == NB, "qweight must be [N_pad/16, K_pad*bits/32, 16]");
  const int64_t n_pad = qweight.size(0) * NB, k_pad = qweight.size(1) * 32 / bits;
  TORCH_CHECK(n_pad % NB == 0 && group_size % 32 == 0, "N must be a multiple of 16 and the group size of 32");
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const int64_t rpg = group_size / 32;
  TORCH_CHECK(out.is_contiguous() && out.size(0) == k_pad && out.size(1) == n_pad, "out must be contiguous [K_pad, N_pad]");
  if (out.dtype() == torch::kBFloat16) {
    dequant_bits<uint16_t>(bits, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), k_pad, n_pad, rpg,
                           reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  } else {
    TORCH_CHECK(out.dtype() == torch::kFloat32, "out must be float32 or bfloat16");
    dequant_bits<float>(bits, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), k_pad, n_pad, rpg, out.data_ptr<float>());
  }
  return out;
}

// The fp32 kernel's inputs, pre-multiplied by 2^-shift where the AVX2 kernel takes a code masked in place
// (code8): input k of a run (0..31) by 2^-((k * bits) % 32), except the top code of each word (3 bits: by
// 2^-(3 (k % 10)) for k < 30). Powers of two, so the products are unchanged (unless an input falls below 2^-98,
// into fp32's subnormal range). Other builds take the rows as they are.
const float* prescale_rows(const float* rows, int64_t m, int64_t k_pad, int64_t bits) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  float factor[32];
  for (int k = 0; k < 32; ++k) {
    const int shift = bits == 3 ? (k < 30 ? 3 * (k % 10) : 0) : (k * bits) % 32;
    factor[k] = shift + bits == 32 ? 1.f : std::ldexp(1.f, -shift);
  }
  thread_local std::vector<float> buffer;
  buffer.resize(m * k_pad);
  for (int64_t j = 0; j < m * k_pad; j += 32)
    for (int k = 0; k < 32; ++k) buffer[j + k] = rows[j + k] * factor[k];
  return buffer.data();
#else
  return rows;
#endif
}

// The rows of x [M, K] in kernel order (x[:, perm] when perm is given) padded with zeros to k_pad, into a
// buffer reused by the calling thread (a fresh tensor per call costs more than a small layer's matmul). Rows are
// split between threads once there are many: an act-order layer gathers its whole input on every call, and at
// 128 rows done on one thread that took as long as a quarter of the matmul (576x1536, AVX2 EPYC).
const float* kernel_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& perm, int64_t k_pad) {
  thread_local std::vector<float> buffer;
  const int64_t m = x.size(0), k = x.size(1);
  const float* src = x.data_ptr<float>();
  if (!perm.has_value() && k == k_pad) return src;
  buffer.resize(m * k_pad);
  float* out = buffer.data();
  const int64_t* p = perm.has_value() ? perm->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, m, std::max<int64_t>(1, (1 << 16) / k_pad), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* row = src + i * k;
      float* dst = out + i * k_pad;
      if (p) {
        for (int64_t j = 0; j < k; ++j) dst[j] = row[p[j]];
      } else {
        std::memcpy(dst, row, k * sizeof(float));
      }
      std::fill(dst + k, dst + k_pad, 0.f);
    }
  });
  return out;
}

// x [..., K] fp32 (K ≤ K_pad; the leading dimensions are the rows M); perm int64 [K] or None: the kernel's column order; qweight int32
// [N_pad/16, K_pad*bits/32, 16]; scales, zeros fp32 [G, N_pad]; bias fp32 [≥ n_out] or None -> y [..., n_out].
// kernel 0 (gemm) and 3 (blocked): exact fp32; 1 and 2 (int8, int8x2): each run of 32 inputs rounded to one or
// two int8 digits (round_rows) for integer dot products.
torch::Tensor gptq_matmul(torch::Tensor x, c10::optional<torch::Tensor> perm, torch::Tensor qweight, torch::Tensor scales,
                          torch::Tensor zeros, c10::optional<torch::Tensor> bias, int64_t bits, int64_t group_size,
                          int64_t n_out, int64_t kernel) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "the cpu-packed kernel runs on CPU tensors only; "
              "after moving a model, rebuild its layers with lightning_gptq.nn.to_backend");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1, "x must be fp32 [..., K]");
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = n_out;
  x = x.reshape({-1, x.size(-1)}).contiguous();  // in here: each Python-side tensor op costs about a microsecond
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "qweight must be contiguous int32");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32, "scales/zeros must be fp32");
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == NB, "qweight must be [N_pad/16, K_pad*bits/32, 16]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  const int64_t m = x.size(0), k_pad = qweight.size(1) * 32 / bits, n_pad = qweight.size(0) * NB, n_groups = scales.size(0);
  TORCH_CHECK(qweight.size(1) * 32 == k_pad * bits && k_pad % 32 == 0, "qweight rows do not match a K that is a multiple of 32");
  TORCH_CHECK(x.size(1) <= k_pad, "x has more columns than the packed weight");
  TORCH_CHECK(group_size % 32 == 0, "the group size must be a multiple of 32");
  TORCH_CHECK(n_out <= n_pad, "n_out larger than the packed width");
  TORCH_CHECK(!perm.has_value() || (perm->dtype() == torch::kInt64 && perm->numel() == x.size(1) && perm->is_contiguous()),
              "perm must be contiguous int64 [K]");
  TORCH_CHECK(!bias.has_value() || (bias->dtype() == torch::kFloat32 && bias->numel() >= n_out && bias->is_contiguous()),
              "bias must be contiguous fp32 [n_out]");
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* rows = kernel_rows(x, perm, k_pad);
  const int64_t rpg = group_size / 32, runs = k_pad / 32;
  auto y = torch::empty(y_shape, x.options());
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const float *s = scales.data_ptr<float>(), *z = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  thread_local std::vector<float> sums, steps;
  thread_local std::vector<int8_t> rounded;
  sums.assign(m * n_groups, 0.f);
  TORCH_CHECK(kernel >= 0 && kernel <= 3, "kernel must be 0 (gemm), 1 (int8), 2 (int8x2) or 3 (blocked), got ", kernel);
  if (kernel == 3) {
    // full tiles are written: straight into y when N is a multiple of 16, else into a padded buffer first
    auto out = n_out == n_pad ? y : torch::empty({m, n_pad}, x.options());
#define GPTQ_BLOCKED(B)                                                                                  \
  case B:                                                                                                \
    run_blocked<B>(rows, m, k_pad, qw, s, z, rpg, n_pad, out.data_ptr<float>(), bp, n_out);              \
    break;
    switch (bits) { GPTQ_BLOCKED(2) GPTQ_BLOCKED(3) GPTQ_BLOCKED(4) GPTQ_BLOCKED(8) }
#undef GPTQ_BLOCKED
    if (n_out != n_pad) y.view({m, n_out}).copy_(out.narrow(1, 0, n_out));
    return y;
  }
  const int64_t digits = kernel;
  if (digits > 0) {
    rounded.resize(digits * m * k_pad);
    steps.resize(m * runs);
#define GPTQ_I8(B, D)                                                                                \
  round_rows<B, D>(rows, m, k_pad, n_groups, rpg, rounded.data(), steps.data(), sums.data());        \
  run_i8<B, D>(rounded.data(), steps.data(), m, k_pad, qw, s, z, sums.data(), n_groups, rpg, n_pad, yp, n_out, bp);
#define GPTQ_I8_BITS(B) \
  case B:               \
    if (digits == 1) {  \
      GPTQ_I8(B, 1)     \
    } else {            \
      GPTQ_I8(B, 2)     \
    }                   \
    break;
    switch (bits) { GPTQ_I8_BITS(2) GPTQ_I8_BITS(3) GPTQ_I8_BITS(4) GPTQ_I8_BITS(8) }
#undef GPTQ_I8_BITS
#undef GPTQ_I8
  } else {
    for (int64_t i = 0; i < m; ++i)  // per-row group sums of x: the zero-point term
      for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t end = g == n_groups - 1 ? k_pad : (g + 1) * group_size;
        float total = 0.f;
        for (int64_t k = g * group_size; k < end; ++k) total += rows[i * k_pad + k];
        sums[i * n_groups + g] = total;
      }
    const float* scaled = prescale_rows(rows, m, k_pad, bits);
#define GPTQ_F32(B)                                                                                  \
  case B:                                                                                            \
    run<B>(scaled, m, k_pad, qw, s, z, sums.data(), n_groups, rpg, n_pad, yp, n_out, bp);            \
    break;
    switch (bits) { GPTQ_F32(2) GPTQ_F32(3) GPTQ_F32(4) GPTQ_F32(8) }
#undef GPTQ_F32
  }
  return y;
}

// y [..., N] = x [..., K] . w [N, K]^T in fp32 for few rows (a dense layer's decode step, e.g. an LM head): each
// output is a dot product along a contiguous weight row, rows split between threads, so the weight is streamed once
// at the memory's speed. (MKL's GEMV read SmolLM2's 113 MB head at 7 GB/s on both threads of an AVX2 EPYC where a
// plain read ran at 17.) Sixteen partial sums per dot product, which the compiler keeps in vector registers.
torch::Tensor dense_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "dense_gemv runs on CPU tensors only");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32, "x and w must be fp32");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w must be contiguous [N, K]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "x must be [..., K] with w's K");
  const int64_t n = w.size(0), k = w.size(1);
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = n;
  x = x.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  auto y = torch::empty(y_shape, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t k16 = k / 16 * 16;
  at::parallel_for(0, n, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      const float* row = wp + j * k;
      __builtin_prefetch(row + 16 * k, 0, 0);  // a few rows ahead, past what the hardware prefetcher has asked for
      for (int64_t i = 0; i < m; ++i) {
        const float* xr = xp + i * k;
        float part[16] = {};
        for (int64_t c = 0; c < k16; c += 16)
#pragma GCC unroll 16
          for (int l = 0; l < 16; ++l) part[l] += row[c + l] * xr[c + l];
        float total = 0.f;
        for (int l = 0; l < 16; ++l) total += part[l];
        for (int64_t c = k16; c < k; ++c) total += row[c] * xr[c];
        yp[i * n + j] = total;
      }
    }
  });
  return y;
}

// sum_c w[c] * x[c], int8 codes widened to fp32 in registers, four independent accumulators (a single one would wait
// on each fused multiply-add's latency). Written with intrinsics: GCC left the plain loop's int8 widening scalar.
inline float dot_i8_f32(const int8_t* w, const float* x, int64_t k) {
  int64_t c = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  auto widen = [](const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); };
  for (; c + 64 <= k; c += 64)
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(widen(w + c + 16 * u), _mm512_loadu_ps(x + c + 16 * u), acc[u]);
  for (; c + 16 <= k; c += 16) acc[0] = _mm512_fmadd_ps(widen(w + c), _mm512_loadu_ps(x + c), acc[0]);
  total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  auto widen = [](const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); };
  for (; c + 32 <= k; c += 32)
    for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(widen(w + c + 8 * u), _mm256_loadu_ps(x + c + 8 * u), acc[u]);
  for (; c + 8 <= k; c += 8) acc[0] = _mm256_fmadd_ps(widen(w + c), _mm256_loadu_ps(x + c), acc[0]);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  total = _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
#endif
  for (; c < k; ++c) total += static_cast<float>(w[c]) * x[c];
  return total;
}

// Rows n0..n1 of a GEMV in STREAMS interleaved stretches: row i of each stretch, then row i + 1 of each. Several
// sequential streams per thread keep more memory reads in flight than one (measured on SmolLM2's int8 head, 27 MiB
// read per token: one stream per thread 10.8 GB/s, eight 14.4; experiments/head_gemv_variants.py).
constexpr int STREAMS = 8;

template <typename F>
inline void for_stream_rows(int64_t n0, int64_t n1, F&& rows) {
  const int64_t len = (n1 - n0 + STREAMS - 1) / STREAMS;
  for (int64_t i = 0; i < len; ++i) {
    int64_t js[STREAMS];
    int live = 0;
    for (int t = 0; t < STREAMS; ++t)
      if (n0 + t * len + i < n1) js[live++] = n0 + t * len + i;
    rows(js, live);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One row x [K] against int8 rows q [N, K] with VNNI. Each run of 32 inputs is rounded to two int8 digits with its
// own step d = max|x| / 127, x ≈ d (hi + lo / 254) (about 2^-15 relative, as the int8x2 layer kernel); the weight
// bytes go in as unsigned w + 128 (vpdpbusd multiplies unsigned by signed), and the 128 · sum(x) this adds to every
// row is subtracted once. Per 64 weight bytes: two vpdpbusd, both int32 results exact, then fp32 with the run steps.
void int8_rows_vnni(const float* x, int64_t k, const int8_t* q, const float* scale, int64_t n, float* y) {
  const int64_t runs = (k + 31) / 32, chunks = (k + 63) / 64, kp = chunks * 64;
  std::vector<int8_t> digits(2 * kp, 0);
  std::vector<float> steps(chunks * 16, 0.f);
  int8_t *hi = digits.data(), *lo = hi + kp;
  double shift = 0;
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t c0 = r * 32, c1 = std::min(k, c0 + 32);
    float big = 0.f;
    for (int64_t c = c0; c < c1; ++c) big = std::max(big, std::fabs(x[c]));
    const float d = big > 0.f ? big / 127.f : 1.f;
    double sum = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const float v = x[c] / d, h = std::nearbyint(v), l = std::nearbyint((v - h) * 254.f);
      hi[c] = static_cast<int8_t>(h);
      lo[c] = static_cast<int8_t>(l);
      sum += h + l / 254.0;
    }
    shift += 128.0 * d * sum;
    for (int i = 0; i < 8; ++i) steps[r / 2 * 16 + r % 2 * 8 + i] = d;  // lanes 0-7 sum run 2c's bytes, 8-15 run 2c+1's
  }
  const float shift_f = static_cast<float>(shift);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512 inv254 = _mm512_set1_ps(1.f / 254.f);
  const __mmask64 tail = k % 64 ? (~0ULL >> (64 - k % 64)) : ~0ULL;
  at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
    for_stream_rows(n0, n1, [&](const int64_t* js, int live) {
      __m512 acc[STREAMS];
      for (int t = 0; t < live; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i xh = _mm512_loadu_si512(hi + 64 * c), xl = _mm512_loadu_si512(lo + 64 * c);
        const __m512 d = _mm512_loadu_ps(steps.data() + 16 * c);
        const __mmask64 mask = c + 1 == chunks ? tail : ~0ULL;
        for (int t = 0; t < live; ++t) {
          // (masked-off bytes load as 0 and meet zero digits: they add nothing)
          const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + js[t] * k + 64 * c), flip);
          const __m512 ph = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xh));
          const __m512 pl = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xl));
          acc[t] = _mm512_fmadd_ps(_mm512_fmadd_ps(pl, inv254, ph), d, acc[t]);
        }
      }
      for (int t = 0; t < live; ++t) y[js[t]] = (_mm512_reduce_add_ps(acc[t]) - shift_f) * scale[js[t]];
    });
  });
}
#endif

// Whether int8_row_gemv takes the VNNI path where it is built (set_head_vnni: the fp32 path is then tested here too).
bool head_vnni = true;

// y [..., N] = (x [..., K] . q [N, K]^T) * scale [N] for few rows of x: a dense layer stored as int8 rows with one fp32
// step per row (an LM head quantized per row), a quarter of an fp32 GEMV's bytes. With AVX-512 VNNI the inputs are
// rounded to two int8 digits per run of 32 (int8_rows_vnni: about 2^-15 relative); elsewhere codes widen to fp32 in
// registers (exact up to fp32 summation order). Each row of x reads the weight once.
torch::Tensor int8_row_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(), "int8_row_gemv runs on CPU tensors only");
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be fp32");
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.dim() == 2 && q.is_contiguous(), "q must be contiguous int8 [N, K]");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0), "scale must be fp32 [N]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == q.size(1), "x must be [..., K] with q's K");
  const int64_t n = q.size(0), k = q.size(1);
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = n;
  x = x.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  auto y = torch::empty(y_shape, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scale.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (head_vnni) {
      int8_rows_vnni(xp + i * k, k, qp, sp, n, yp + i * n);
      continue;
    }
#endif
    at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
      for_stream_rows(n0, n1, [&](const int64_t* js, int live) {
        for (int t = 0; t < live; ++t) yp[i * n + js[t]] = dot_i8_f32(qp + js[t] * k, xp + i * k, k) * sp[js[t]];
      });
    });
  }
  return y;
}

// Attention of one new token over a KV cache: out [B, 1, H, D] = softmax(q . K^T * scale + mask) V per head, with
// H/Hkv query heads sharing each cache head (grouped-query attention). q [B, H, 1, D]; k, v [B, Hkv, L, D]; mask
// additive [B, 1, 1, L] or none. Positions whose mask is below -1e30 (the "masked" value transformers writes: the
// dtype's minimum) are skipped: their weight is exactly 0 in the plain computation too, since exp underflows.
// Scores and sums in fp32, positions in order; one (batch, head) per task.
struct AttendScratch {
  std::vector<float> w, acc;
  std::vector<int32_t> live;
  AttendScratch(int64_t l, int64_t d) : w(l), acc(d), live(l) {}
};

// One query vector qv [d] over l cached positions (kb, vb: [l, d] rows): softmax(qv . k * sc + mask) . v into o [d].
// Positions whose mask is below -1e30 are skipped (a static cache's unfilled tail).
void attend_one(const float* qv, const float* kb, const float* vb, int64_t l, int64_t d, float sc, const float* mrow,
                float* o, AttendScratch& scratch) {
  const int64_t dv = d / NB * NB;  // columns done with vectors
  float* w = scratch.w.data();
  int32_t* live = scratch.live.data();
  float* acc = scratch.acc.data();
  float top = -std::numeric_limits<float>::infinity();
  int64_t n_live = 0;
  for (int64_t j = 0; j < l; ++j) {
    if (mrow && mrow[j] < -1e30f) continue;
    const float* kr = kb + j * d;
    vf s = {};
    for (int64_t c = 0; c < dv; c += NB) s += load_f(qv + c) * load_f(kr + c);
    float dot = lanes_sum(s);
    for (int64_t c = dv; c < d; ++c) dot += qv[c] * kr[c];
    const float score = dot * sc + (mrow ? mrow[j] : 0.f);
    top = std::max(top, score);
    w[n_live] = score;
    live[n_live++] = static_cast<int32_t>(j);
  }
  float total = 0.f;
  for (int64_t i = 0; i < n_live; ++i) {
    w[i] = std::exp(w[i] - top);
    total += w[i];
  }
  std::fill(acc, acc + d, 0.f);
  for (int64_t i = 0; i < n_live; ++i) {
    const float p = w[i];
    const float* vr = vb + static_cast<int64_t>(live[i]) * d;
    const vf pv = vf{} + p;
    for (int64_t c = 0; c < dv; c += NB) store_f(acc + c, load_f(acc + c) + pv * load_f(vr + c));
    for (int64_t c = dv; c < d; ++c) acc[c] += p * vr[c];
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "decode_attention runs on CPU tensors only");
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(), "q [B, H, 1, D], k and v [B, Hkv, L, D]");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(3), hkv = k.size(1), l = k.size(2);
  TORCH_CHECK(k.size(0) == b && k.size(3) == d && h % hkv == 0, "k/v must be [B, Hkv, L, D] with Hkv dividing H");
  q = q.contiguous();
  k = k.contiguous();
  v = v.contiguous();
  torch::Tensor m;
  int64_t m_stride = 0;  // between batch rows of the mask (0: one row for all)
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(-1) == l && mask->size(-2) == 1, "mask must be [B or 1, 1, 1, L]");
    m = *mask;
    if (m.dtype() != torch::kFloat32 || m.stride(-1) != 1) m = m.to(torch::kFloat32).contiguous();
    m_stride = m.size(0) == 1 ? 0 : m.stride(0);  // read in place: no copy of a sliced mask
  }
  auto out = torch::empty({b, 1, h, d}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* mp = mask.has_value() ? m.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * h, 1, [&](int64_t t0, int64_t t1) {
    AttendScratch scratch(l, d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / h, hi = t % h, kvh = hi / (h / hkv);
      attend_one(qp + t * d, kp + (bi * hkv + kvh) * l * d, vp + (bi * hkv + kvh) * l * d, l, d, sc,
                 mp ? mp + bi * m_stride : nullptr, op + (bi * h + hi) * d, scratch);
    }
  });
  return out;
}

// x [..., H] * rsqrt(mean(x²) + eps) * w, row by row: a LLaMA RMSNorm in fp32 (for decode-sized inputs).
torch::Tensor rms_norm_row(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && x.is_contiguous() && w.is_contiguous() &&
                  w.numel() == x.size(-1),
              "rms_norm: contiguous fp32 x [..., H] and w [H]");
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  auto out = torch::empty_like(x);
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = x.data_ptr<float>() + r * n;
    float* o = out.data_ptr<float>() + r * n;
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += a[i] * a[i];
    const float inv = 1.f / std::sqrt(total / static_cast<float>(n) + static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) o[i] = wp[i] * (a[i] * inv);
  }
  return out;
}

// v [heads, d] rotated in place: v·cos + rotate_half(v)·sin, rotate_half(v) = (−v[d/2:], v[:d/2]) (LLaMA's RoPE).
void rope_rows(float* v, int64_t heads, int64_t d, const float* cos, const float* sin) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* r = v + h * d;
    for (int64_t j = 0; j < half; ++j) {
      const float a = r[j], b = r[j + half];
      r[j] = a * cos[j] - b * sin[j];
      r[j + half] = b * cos[j + half] + a * sin[j + half];
    }
  }
}

// One decoder layer of a LLaMA-family model (RMSNorm, RoPE, grouped-query attention, SiLU-gated MLP; no biases) for
// one new token at `position`, in one call: the layer's four packed matmuls (q/k/v joined, o, gate/up joined, down)
// with the norms, rotary, cache write, attention over positions 0..position and residuals between them, so a decode
// step is one call per layer instead of a dozen kernels. x [1, 1, H]; cos, sin: RoPE tables [positions, d] (row
// `position` used); k_cache, v_cache [1, Hkv, L, d] (row `position` written); length: the cache's int64 count of
// filled positions (set to position + 1); linears: four (perm, qweight, scales, zeros, bias) groups as packed_matmul
// takes them; meta: four (bits, group_size, n_out, kernel); dims: (heads, kv_heads, d, intermediate).
torch::Tensor llama_decode_layer(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                                 torch::Tensor v_cache, torch::Tensor length, int64_t position, torch::Tensor ln1,
                                 torch::Tensor ln2,
                                 double eps, double scale, std::vector<c10::optional<torch::Tensor>> linears,
                                 std::vector<int64_t> meta, std::vector<int64_t> dims) {
  TORCH_CHECK(linears.size() == 20 && meta.size() == 16 && dims.size() == 4, "four linears, their meta and four dims");
  const int64_t nh = dims[0], nkv = dims[1], d = dims[2], inter = dims[3], hidden = x.size(-1);
  const int64_t l = k_cache.size(2);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.numel() == hidden && x.is_contiguous(), "x must be fp32 [1, 1, H]");
  TORCH_CHECK(k_cache.dtype() == torch::kFloat32 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4 && k_cache.size(0) == 1 &&
                  k_cache.size(1) == nkv && k_cache.size(3) == d,
              "k/v caches must be contiguous fp32 [1, Hkv, L, d]");
  TORCH_CHECK(position >= 0 && position < l, "position ", position, " outside the cache (", l, " positions)");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == d && cos.size(0) > position && cos.sizes() == sin.sizes() &&
                  cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos, sin: contiguous fp32 [positions, d] tables covering the position");
  TORCH_CHECK(length.dtype() == torch::kInt64 && length.numel() == 1, "length: an int64 scalar tensor");
  TORCH_CHECK(nh % nkv == 0 && d % 2 == 0, "heads must be a multiple of kv heads, d even");
  TORCH_CHECK(meta[2] == (nh + 2 * nkv) * d && meta[6] == hidden && meta[10] == 2 * inter && meta[14] == hidden,
              "the linears' widths do not match the dims");
  const auto linear = [&](const torch::Tensor& in, int i) {
    return gptq_matmul(in, linears[5 * i], *linears[5 * i + 1], *linears[5 * i + 2], *linears[5 * i + 3],
                       linears[5 * i + 4], meta[4 * i], meta[4 * i + 1], meta[4 * i + 2], meta[4 * i + 3]);
  };
  auto qkv = linear(rms_norm_row(x, ln1, eps), 0);
  float* q = qkv.data_ptr<float>();
  float* k = q + nh * d;
  const float* v = k + nkv * d;
  const float *cr = cos.data_ptr<float>() + position * d, *sr = sin.data_ptr<float>() + position * d;
  rope_rows(q, nh, d, cr, sr);
  rope_rows(k, nkv, d, cr, sr);
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  for (int64_t h = 0; h < nkv; ++h) {
    std::copy(k + h * d, k + (h + 1) * d, kc + (h * l + position) * d);
    std::copy(v + h * d, v + (h + 1) * d, vc + (h * l + position) * d);
  }
  auto attn = torch::empty({1, 1, nh * d}, x.options());
  float* ap = attn.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, nh, 1, [&](int64_t h0, int64_t h1) {
    AttendScratch scratch(position + 1, d);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t kvh = h / (nh / nkv);
      attend_one(q + h * d, kc + kvh * l * d, vc + kvh * l * d, position + 1, d, sc, nullptr, ap + h * d, scratch);
    }
  });
  auto mid = linear(attn, 1);
  float* mp = mid.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < hidden; ++i) mp[i] += xp[i];  // the residual: mid is x + attention
  auto gate_up = linear(rms_norm_row(mid, ln2, eps), 2);
  auto act = torch::empty({1, 1, inter}, x.options());
  const float* g = gate_up.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  for (int64_t i = 0; i < inter; ++i) actp[i] = g[i] / (1.f + std::exp(-g[i])) * g[inter + i];
  auto out = linear(act, 3);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < hidden; ++i) op[i] += mp[i];
  *length.data_ptr<int64_t>() = position + 1;
  return out;
}

torch::Tensor gptq_dequant_new(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                               int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK(qweight.dim() == 3, "qweight must be [N_pad/16, K_pad*bits/32, 16]");
  auto out = torch::empty({qweight.size(1) * 32 / bits, qweight.size(0) * NB}, qweight.options().dtype(dtype));
  return gptq_dequant(qweight, scales, zeros, bits, group_size, out);
}

// The kernels as operators of the dispatcher (namespace lightning_gptq), so torch.compile and torch.export hold one
// opaque node per call and the compiled code calls them without Python in between. Registered when Python asks
// (register_ops), not when the library loads: a second build of this file loaded into the same process (an A/B of two
// revisions) must not define the same operators again.
std::vector<std::unique_ptr<torch::Library>> libraries;

bool register_ops() {
  if (!libraries.empty()) return false;
  auto defs = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "lightning_gptq", c10::nullopt, __FILE__, __LINE__);
  defs->def("packed_matmul(Tensor x, Tensor? perm, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int bits, "
            "int group_size, int n_out, int kernel) -> Tensor");
  defs->def("packed_dequant_t(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, ScalarType dtype) "
            "-> Tensor");
  defs->def("dense_gemv(Tensor x, Tensor weight) -> Tensor");
  defs->def("int8_row_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
  defs->def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  defs->def("llama_decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor(c!) length, int position, Tensor ln1, Tensor ln2, float eps, float scale, Tensor?[] linears, "
            "int[] meta, int[] dims) -> Tensor");
  defs->def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  auto impls = std::make_unique<torch::Library>(torch::Library::IMPL, "lightning_gptq", c10::DispatchKey::CPU, __FILE__,
                                                __LINE__);
  impls->impl("packed_matmul", &gptq_matmul);
  impls->impl("packed_dequant_t", &gptq_dequant_new);
  impls->impl("dense_gemv", &dense_gemv);
  impls->impl("int8_row_gemv", &int8_row_gemv);
  impls->impl("decode_attention", &decode_attention);
  impls->impl("llama_decode_layer", &llama_decode_layer);
  impls->impl("rms_norm", &rms_norm_row);
  libraries.push_back(std::move(defs));
  libraries.push_back(std::move(impls));
  return true;
}

// Which integer dot product this build uses: "avx512-vnni", "avx-vnni", "avx2" or "generic".
std::string int8_dot_isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";  // maddubs for codes of up to 4 bits, plain integer code for 8
#else
  return "generic";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_matmul", &gptq_matmul, "GPTQ packed matmul for few rows (CPU): exact fp32, or int8 activations");
  m.def("dense_gemv", &dense_gemv, "y = x . w^T in fp32 for few rows of x (a dense layer's decode step)");
  m.def("set_serial_work", [](int64_t v) { serial_work = v; }, "calls below this many row-weights run on one thread");
  m.def("set_head_vnni", [](bool v) { const bool old = head_vnni; head_vnni = v; return old; },
        "whether int8_row_gemv uses VNNI where built (else codes widen to fp32); returns the previous value");
  m.def("head_has_vnni", []() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return true;
#else
    return false;
#endif
  }, "whether int8_row_gemv was built with its VNNI path");
  m.def("set_tile_streams", [](int64_t v) { TORCH_CHECK(v == 1 || v == 2, "tile streams: 1 or 2"); const int64_t old = tile_streams; tile_streams = v; return old; },
        "output tiles a one-row call of the int8 kernels computes at once (1 or 2); returns the previous value");
  m.def("int8_dot_isa", &int8_dot_isa, "the instruction set of the int8 dot product");
  m.def("three_bit_layout", []() { return std::string(THREE_BIT_TENS ? "tens" : "planes"); },
        "how this build lays out 3-bit runs (see code_at)");
  m.def("int8_row_gemv", &int8_row_gemv, "y = (x . q^T) * scale for few rows of x, q int8 [N, K] with a step per row");
  m.def("register_ops", &register_ops, "define the lightning_gptq:: operators (once per process; false if done)");
  m.def("gptq_dequant", &gptq_dequant, "GPTQ packed codes to a dense transposed weight (CPU, fp32 or bf16)");
}

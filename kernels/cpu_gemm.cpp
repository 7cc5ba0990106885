// GPTQ matmul for CPUs over the packed layout, fp32 activations, for few input rows (decode).
//
//   y[m, n] = sum_g s[g, n] * ( sum_{k in g} x[m, k] * q[k, n]  -  z[g, n] * sum_{k in g} x[m, k] )
//
// qweight is int32 [N_pad / 16, K_pad * BITS / 32, 16]: the checkpoint's bit stream (runs of 32
// codes along k packed into BITS words, lowest bits first; a code may straddle two words when
// BITS = 3), cut into tiles of 16 output columns stored one after the other, so a tile's codes
// are one sequential read. Groups are contiguous runs of
// `group_size` columns (a multiple of 32); the caller permutes act-order columns and pads K and N.
// Codes are decoded once per tile of NB output columns and reused for every input row, so the
// weight is read once per call and never expanded in memory. Written as plain loops over a lane
// array that the compiler vectorises for the machine it is built on (-march=native: AVX2 or AVX-512).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int NB = 16;  // output columns per tile: one vector of 16 floats (one AVX-512 register, two AVX2 ones)
#ifdef __AVX512F__
constexpr int MB = 8;   // input rows per pass over the weight tile (their accumulators stay in registers: 32 on AVX-512)
#else
constexpr int MB = 4;   // (16 registers on AVX2, and each vector takes two)
#endif

constexpr int PREFETCH_RUNS = 16;  // runs of 32 codes ahead (2 KB at 4 bits)

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

template <int BITS, int rows>
void tile(const float* x, int64_t k_pad, const uint32_t* qw, const float* scales, const float* zeros,
          const float* xsum, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, int64_t n0, float* y, int64_t n_out) {
  constexpr uint32_t mask = (1u << BITS) - 1;
  const uint32_t* tile_qw = qw + (n0 / NB) * (k_pad / 32 * BITS) * NB;
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
      vu w[BITS + 1];
      for (int b = 0; b < BITS; ++b) w[b] = load_u(tile_qw + (run * BITS + b) * NB);
      w[BITS] = vu{};
      // Codes are read once, from memory (a model's weights are not in cache): ask for them early.
      for (int b = 0; b < BITS; ++b) __builtin_prefetch(tile_qw + ((run + PREFETCH_RUNS) * BITS + b) * NB);
      const float* xr = x + run * 32;
#pragma GCC unroll 32
      for (int i = 0; i < 32; ++i) {
        const int word = (i * BITS) / 32, off = (i * BITS) % 32;
        vu v = w[word] >> off;
        if (off + BITS > 32) v |= w[word + 1] << (32 - off);
        const vf q = __builtin_convertvector((vi)(v & mask), vf);
        for (int m = 0; m < rows; ++m) acc[m][i % chains] += xr[m * k_pad + i] * q;
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
  const int64_t width = std::min<int64_t>(NB, n_out - n0);
  for (int m = 0; m < rows; ++m)
    for (int l = 0; l < width; ++l) y[m * n_out + n0 + l] = out[m][l];
}

template <int BITS>
void run(const float* x, int64_t m_total, int64_t k_pad, const uint32_t* qw, const float* scales, const float* zeros,
         const float* xsum, int64_t n_groups, int64_t runs_per_group, int64_t n_pad, float* y, int64_t n_out) {
  const int64_t tiles = n_pad / NB;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < m_total;) {
      // passes of MB, 4, 2 or 1 rows, each a separate instantiation with its accumulators in registers
      const int64_t left = m_total - m0;
      const int rows = left >= MB ? MB : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t t = t0; t < t1; ++t) {
        const float* xm = x + m0 * k_pad;
        const float* xs = xsum + m0 * n_groups;
        float* ym = y + m0 * n_out;
        const int64_t n0 = t * NB;
        if (rows == MB) tile<BITS, MB>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out);
        else if (rows == 4) tile<BITS, 4>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out);
        else if (rows == 2) tile<BITS, 2>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out);
        else tile<BITS, 1>(xm, k_pad, qw, scales, zeros, xs, n_groups, runs_per_group, n_pad, n0, ym, n_out);
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
  constexpr uint32_t mask = (1u << BITS) - 1;
  const int64_t runs = k_pad / 32;
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t run = r0; run < r1; ++run) {
      const int64_t g = run / runs_per_group;
      for (int64_t n0 = 0; n0 < n_pad; n0 += NB) {
        const uint32_t* tile_qw = qw + (n0 / NB) * (runs * BITS) * NB;
        vu wd[BITS + 1];
        for (int b = 0; b < BITS; ++b) wd[b] = load_u(tile_qw + (run * BITS + b) * NB);
        wd[BITS] = vu{};
        const vf s = load_f(scales + g * n_pad + n0);
        const vf z = load_f(zeros + g * n_pad + n0);
#pragma GCC unroll 32
        for (int i = 0; i < 32; ++i) {
          const int word = (i * BITS) / 32, off = (i * BITS) % 32;
          vu v = wd[word] >> off;
          if (off + BITS > 32) v |= wd[word + 1] << (32 - off);
          const vf f = s * (__builtin_convertvector((vi)(v & mask), vf) - z);  // q − z is exact: one rounding, as the oracle
          OUT* row = w + (run * 32 + i) * n_pad + n0;
          if constexpr (sizeof(OUT) == 4) {
            std::memcpy(row, &f, sizeof(f));
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

// x [M, K_pad] fp32; qweight int32 [N_pad/16, K_pad*bits/32, 16]; scales, zeros fp32 [G, N_pad]; -> y [M, n_out]
torch::Tensor gptq_gemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                        int64_t bits, int64_t group_size, int64_t n_out) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "the cpu-packed kernel runs on CPU tensors only; "
              "after moving a model, rebuild its layers with lightning_gptq.nn.to_backend");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous(), "qweight must be contiguous int32");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32, "scales/zeros must be fp32");
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(2) == NB, "qweight must be [N_pad/16, K_pad*bits/32, 16]");
  const int64_t m = x.size(0), k_pad = x.size(1), n_pad = qweight.size(0) * NB, n_groups = scales.size(0);
  TORCH_CHECK(k_pad % 32 == 0 && n_pad % NB == 0 && group_size % 32 == 0, "K and group size must be multiples of 32");
  TORCH_CHECK(qweight.size(1) * 32 == k_pad * bits, "qweight rows do not match K and bits");
  TORCH_CHECK(n_out <= n_pad, "n_out larger than the packed width");
  // per-row group sums of x: the zero-point term
  auto xg = torch::zeros({m, n_groups}, x.options());
  {
    auto xa = x.accessor<float, 2>();
    auto ga = xg.accessor<float, 2>();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t k = 0; k < k_pad; ++k) ga[i][std::min(k / group_size, n_groups - 1)] += xa[i][k];
  }
  auto y = torch::empty({m, n_out}, x.options());
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const int64_t rpg = group_size / 32;
  switch (bits) {
    case 2: run<2>(x.data_ptr<float>(), m, k_pad, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), xg.data_ptr<float>(), n_groups, rpg, n_pad, y.data_ptr<float>(), n_out); break;
    case 3: run<3>(x.data_ptr<float>(), m, k_pad, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), xg.data_ptr<float>(), n_groups, rpg, n_pad, y.data_ptr<float>(), n_out); break;
    case 4: run<4>(x.data_ptr<float>(), m, k_pad, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), xg.data_ptr<float>(), n_groups, rpg, n_pad, y.data_ptr<float>(), n_out); break;
    case 8: run<8>(x.data_ptr<float>(), m, k_pad, qw, scales.data_ptr<float>(), zeros.data_ptr<float>(), xg.data_ptr<float>(), n_groups, rpg, n_pad, y.data_ptr<float>(), n_out); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8, got ", bits);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_gemm", &gptq_gemm, "GPTQ packed matmul for few rows (CPU, fp32)");
  m.def("gptq_dequant", &gptq_dequant, "GPTQ packed codes to a dense transposed weight (CPU, fp32 or bf16)");
}

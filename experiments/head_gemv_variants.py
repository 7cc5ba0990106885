"""The int8 LM head's decode GEMV (SmolLM2: 49152 × 576 int8 rows, 27 MiB) against ways to read it faster,
alternating rounds in one process: our kernel (`cpu_gemm.int8_row_gemv`), the same with every line of a row
prefetched, several rows per thread in flight, VNNI integer dots on activations rounded per 32 inputs (llama.cpp's
Q8_0 × Q8_0), and a plain read of the same bytes (the floor). "cold": a 256 MiB buffer is streamed between calls,
as the block linears evict the head between two decode steps.

    python experiments/head_gemv_variants.py --rounds 5
"""
import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

from lightning_gptq.kernels import cpu_gemm

SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline float dot_f(const int8_t* w, const float* x, int64_t k) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  auto widen = [](const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); };
  int64_t c = 0;
  for (; c + 64 <= k; c += 64)
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_fmadd_ps(widen(w + c + 16 * u), _mm512_loadu_ps(x + c + 16 * u), acc[u]);
  float t = hsum(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  for (; c < k; ++c) t += w[c] * x[c];
  return t;
}

// every line of the row `ahead` rows on prefetched
torch::Tensor prefetch_all(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t ahead) {
  const int64_t n = q.size(0), k = q.size(1);
  auto y = torch::empty({n}, x.options());
  const float* xp = x.data_ptr<float>(); const float* sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      const int8_t* row = qp + j * k;
      if (j + ahead < n1) for (int64_t c = 0; c < k; c += 64) __builtin_prefetch(row + ahead * k + c, 0, 0);
      yp[j] = dot_f(row, xp, k) * sp[j];
    }
  });
  return y;
}

// `streams` rows in flight per thread, each from its own contiguous stretch of the thread's range
torch::Tensor streams(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t ns) {
  const int64_t n = q.size(0), k = q.size(1);
  auto y = torch::empty({n}, x.options());
  const float* xp = x.data_ptr<float>(); const float* sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
    const int64_t len = (n1 - n0 + ns - 1) / ns;
    for (int64_t i = 0; i < len; ++i)
      for (int64_t t = 0; t < ns; ++t) {
        const int64_t j = n0 + t * len + i;
        if (j < n1) yp[j] = dot_f(qp + j * k, xp, k) * sp[j];
      }
  });
  return y;
}

// VNNI: x rounded per run of 32 to int8 (d = max|x| / 127), weight bytes + 128 as unsigned, so
// sum (w + 128) x = sum w x + 128 sum x; per 64 bytes one vpdpbusd, then int32 -> fp32 times the run scales.
torch::Tensor vnni(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(k % 64 == 0);
  const int64_t chunks = k / 64;
  std::vector<int8_t> xq(k);
  std::vector<float> d(k / 32), dv(chunks * 16), corr(1);
  const float* xp = x.data_ptr<float>();
  double c128 = 0;
  for (int64_t r = 0; r < k / 32; ++r) {
    float m = 0;
    for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xp[r * 32 + i]));
    d[r] = m > 0 ? m / 127 : 1.f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) { int v = (int)std::nearbyint(xp[r * 32 + i] / d[r]); xq[r * 32 + i] = (int8_t)v; sum += v; }
    c128 += 128.0 * sum * d[r];
  }
  for (int64_t c = 0; c < chunks; ++c) for (int l = 0; l < 16; ++l) dv[c * 16 + l] = d[2 * c + l / 8];
  auto y = torch::empty({n}, x.options());
  const float* sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const float corrf = (float)c128;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) {
      const int8_t* row = qp + j * k;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(row + 64 * c), flip);  // w + 128 as unsigned
        const __m512i xi = _mm512_loadu_si512(xq.data() + 64 * c);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xi);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(dv.data() + 16 * c), acc);
      }
      yp[j] = (hsum(acc) - corrf) * sp[j];
    }
  });
  return y;
}

// VNNI with `ns` rows in flight per thread (one from each of ns contiguous stretches), x as one int8 digit per
// input or two (x / d = hi + lo / 254: the rounding error of one digit, rounded again).
torch::Tensor vnni_streams(torch::Tensor x, torch::Tensor q, torch::Tensor s, int64_t ns, int64_t digits) {
  const int64_t n = q.size(0), k = q.size(1);
  TORCH_CHECK(k % 64 == 0 && ns <= 8);
  const int64_t chunks = k / 64;
  std::vector<int8_t> hi(k), lo(k);
  std::vector<float> dv(chunks * 16);
  const float* xp = x.data_ptr<float>();
  double c128 = 0;
  for (int64_t r = 0; r < k / 32; ++r) {
    float m = 0;
    for (int i = 0; i < 32; ++i) m = std::max(m, std::fabs(xp[r * 32 + i]));
    const float d = m > 0 ? m / 127 : 1.f;
    double sum = 0;
    for (int i = 0; i < 32; ++i) {
      const float v = xp[r * 32 + i] / d;
      const float h = std::nearbyint(v);
      hi[r * 32 + i] = (int8_t)h;
      const float l = digits == 2 ? std::nearbyint((v - h) * 254.f) : 0.f;
      lo[r * 32 + i] = (int8_t)l;
      sum += h + l / 254.0;
    }
    c128 += 128.0 * sum * d;
    for (int i = 0; i < 16; ++i) dv[(r / 2) * 16 + (r % 2) * 8 + i % 8] = d;
  }
  auto y = torch::empty({n}, x.options());
  const float* sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>(); float* yp = y.data_ptr<float>();
  const float corrf = (float)c128;
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const __m512 inv254 = _mm512_set1_ps(1.f / 254.f);
  at::parallel_for(0, n, 512, [&](int64_t n0, int64_t n1) {
    const int64_t len = (n1 - n0 + ns - 1) / ns;
    for (int64_t i = 0; i < len; ++i) {
      const int8_t* rows[8];
      int64_t js[8];
      int live = 0;
      for (int64_t t = 0; t < ns; ++t) {
        const int64_t j = n0 + t * len + i;
        if (j < n1) { js[live] = j; rows[live++] = qp + j * k; }
      }
      __m512 acc[8];
      for (int t = 0; t < live; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512i xh = _mm512_loadu_si512(hi.data() + 64 * c);
        const __m512 d = _mm512_loadu_ps(dv.data() + 16 * c);
        if (digits == 2) {
          const __m512i xl = _mm512_loadu_si512(lo.data() + 64 * c);
          for (int t = 0; t < live; ++t) {
            const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(rows[t] + 64 * c), flip);
            const __m512 ph = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xh));
            const __m512 pl = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xl));
            acc[t] = _mm512_fmadd_ps(_mm512_fmadd_ps(pl, inv254, ph), d, acc[t]);
          }
        } else {
          for (int t = 0; t < live; ++t) {
            const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(rows[t] + 64 * c), flip);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xh)), d, acc[t]);
          }
        }
      }
      for (int t = 0; t < live; ++t) yp[js[t]] = (hsum(acc[t]) - corrf) * sp[js[t]];
    }
  });
  return y;
}

// the floor: every byte loaded once (OR-reduced so the loads cannot be dropped)
int64_t plain_read(torch::Tensor q) {
  const int64_t bytes = q.numel();
  const int8_t* qp = q.data_ptr<int8_t>();
  std::vector<int64_t> part(at::get_num_threads() * 8, 0);
  at::parallel_for(0, bytes / 256, 64, [&](int64_t b0, int64_t b1) {
    __m512i a = _mm512_setzero_si512(), b = a, c = a, e = a;
    for (int64_t i = b0; i < b1; ++i) {
      const int8_t* p = qp + i * 256;
      a = _mm512_or_si512(a, _mm512_loadu_si512(p)); b = _mm512_or_si512(b, _mm512_loadu_si512(p + 64));
      c = _mm512_or_si512(c, _mm512_loadu_si512(p + 128)); e = _mm512_or_si512(e, _mm512_loadu_si512(p + 192));
    }
    part[at::get_thread_num() * 8] |= _mm512_reduce_or_epi64(_mm512_or_si512(_mm512_or_si512(a, b), _mm512_or_si512(c, e)));
  });
  int64_t r = 0; for (auto v : part) r |= v; return r;
}
"""

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--calls", type=int, default=20)
args = p.parse_args()
ext = load_inline("head_variants", cpp_sources=SRC, functions=["prefetch_all", "streams", "vnni", "vnni_streams", "plain_read"],
                  extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
                  extra_ldflags=["-fopenmp"], verbose=False)
torch.manual_seed(0)
N, K = 49152, 576
w = torch.randn(N, K) * 0.05
step = w.abs().amax(1) / 127
q = torch.round(w / step[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
x = torch.randn(K)
ref = (q.double() @ x.double()) * step.double()
evict = torch.ones(64 << 20)  # 256 MiB

variants = {
    "ours (int8_row_gemv)": lambda: cpu_gemm.int8_row_gemv(x[None], q, step)[0],
    "prefetch every line, 8 rows ahead": lambda: ext.prefetch_all(x, q, step, 8),
    "4 streams per thread": lambda: ext.streams(x, q, step, 4),
    "VNNI, x rounded per 32": lambda: ext.vnni(x, q, step),
    "8 streams per thread": lambda: ext.streams(x, q, step, 8),
    "VNNI, 4 streams": lambda: ext.vnni_streams(x, q, step, 4, 1),
    "VNNI, 8 streams": lambda: ext.vnni_streams(x, q, step, 8, 1),
    "VNNI two digits, 4 streams": lambda: ext.vnni_streams(x, q, step, 4, 2),
    "VNNI two digits, 8 streams": lambda: ext.vnni_streams(x, q, step, 8, 2),
    "plain read (floor)": lambda: ext.plain_read(q),
}
for name, f in variants.items():
    out = f()
    if isinstance(out, torch.Tensor):
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        print(f"{name}: max error / max |y| {err:.2e}", flush=True)

times = {(n, c): [] for n in variants for c in ("warm", "cold")}
for r in range(args.rounds):
    for name, f in variants.items():
        for mode in ("warm", "cold"):
            ts = []
            for _ in range(args.calls):
                if mode == "cold":
                    evict.add_(1)
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            times[(name, mode)].append(statistics.median(ts))
base = {c: min(times[("ours (int8_row_gemv)", c)]) for c in ("warm", "cold")}
mib = q.numel() / 2**20
print(f"\n{torch.get_num_threads()} threads, {args.rounds} rounds x {args.calls} calls, best round's median")
print("| variant | warm ms | cold ms | cold GB/s | cold vs ours |\n|---|---:|---:|---:|---:|")
for name in variants:
    w_, c_ = min(times[(name, "warm")]), min(times[(name, "cold")])
    print(f"| {name} | {w_ * 1e3:.3f} | {c_ * 1e3:.3f} | {q.numel() / c_ / 1e9:.1f} | {base['cold'] / c_:.2f}x |")

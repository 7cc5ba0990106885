"""The LM head's decode GEMV at one row, SmolLM2's shape (49152 x 576): our fp32 GEMV, our int8-row GEMV
(``cpu_gemm.int8_row_gemv``, a quarter of the bytes) and ``F.linear``, best of 50 calls, three times; and the
int8 GEMV's error against an fp64 product with the same int8 weights.

    python experiments/int8_head_gemv.py
"""
import time, torch
from lightning_gptq.kernels import cpu_gemm
from lightning_gptq.nn.head import int8_rows
torch.manual_seed(0)
w = torch.randn(49152, 576); q, s = int8_rows(w); x = torch.randn(1, 576)
cpu_gemm.unavailable()
def t(f, n=50):
    f(); st=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-st)/n*1e3
for _ in range(3):
    print("fp32 gemv %.2f ms  int8 gemv %.2f ms  F.linear %.2f ms" % (t(lambda: cpu_gemm.dense_gemv(x, w)), t(lambda: cpu_gemm.int8_row_gemv(x, q, s)), t(lambda: torch.nn.functional.linear(x, w))))
ref = (x.double() @ (q.double()*s.double()[:,None]).T)
print("max rel err", ((cpu_gemm.int8_row_gemv(x, q, s).double()-ref).abs().max()/ref.abs().max()).item())

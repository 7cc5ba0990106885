"""What one call of the one-row kernel costs beyond its work: ``gemm`` and ``int8x2`` at one row on SmolLM2's
block shapes (4-bit g128, weights cache-hot) on one and two threads, beside two trivial torch calls. A fixed cost
per call shows as time that does not scale with the layer's size.

    python experiments/kernel_call_overhead.py
"""
import time, torch
from lightning_gptq.nn import LayerSpec
from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear
from lightning_gptq.nn.timing import random_layer
from lightning_gptq.kernels import cpu_gemm
torch.set_grad_enabled(False)
def t(f, n=3000):
    for _ in range(300): f()
    s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e6
mod = cpu_gemm._load()
for k, n in ((576,192),(576,576),(576,1536)):
    layer = random_layer(CpuPackedQuantLinear, LayerSpec(k, n, 4, 128, False, False, False), seed=1)
    args = layer.__dict__["_matmul_args"]; x = torch.randn(1, 1, k)
    for th in (1,2):
        torch.set_num_threads(th)
        print(k, n, th, "threads", {name: round(min(t(lambda: cpu_gemm.matmul(x, *args, kid)) for _ in range(3)),1) for name, kid in (("gemm",0),("int8x2",2))})
torch.set_num_threads(2)
e = torch.empty(1)
print("torch.empty(1) us", min(t(lambda: torch.empty(1)) for _ in range(3)))
print("x.add(1)", min(t(lambda: x.add(1)) for _ in range(3)))

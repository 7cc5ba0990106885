import os

# No test may reach the Hugging Face hub; must be set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

# Triton kernels run on CPU only in the interpreter, which must be chosen before they are defined.
# The "triton" backend is never an `auto` candidate on CPU, so this changes nothing else. On a GPU they compile.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# auto's on-disk timing cache (nn/autotune_cache.py) off: every test times what it needs, whatever ran before.
# The tests of the cache switch it on in a temporary folder.
os.environ.setdefault("LIGHTNING_GPTQ_AUTOTUNE_CACHE", "0")


import pytest  # noqa: E402  (after the environment above)


def _process_state() -> dict:
    """Process-wide settings a test could change and forget to restore, each of which changes what later tests
    compute: the backend registry (``auto`` times every registered backend), torch's thread count and fp32
    matmul precision, and whether this thread is inside ``exact_kernels()``."""
    import torch

    from lightning_gptq.nn import backends, quant_linear

    return {"backends": backends(), "threads": torch.get_num_threads(),
            "matmul_precision": torch.get_float32_matmul_precision(), "exact_kernels": quant_linear.exact_depth()}


@pytest.fixture(autouse=True)
def _no_leaked_process_state(request):
    """Fail the test that leaves process-wide state changed, rather than a later one that computes differently
    (``tests/test_quant_linear.py`` once left a backend registered that later fits' ``auto`` picked)."""
    before = _process_state()
    yield
    after = _process_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, f"{request.node.nodeid} left process-wide state changed (before, after): {changed}"


def pytest_collection_finish(session):
    """Remember whether collecting built the C++ kernel (a minute on a fresh machine): it must not, tests that
    need it ask in their body (``tests/test_quant_linear.py::test_collecting_builds_no_kernel``)."""
    from lightning_gptq.kernels import cpu_gemm

    session.config.cpu_gemm_built_while_collecting = bool(cpu_gemm._built)

"""Keep the repository's ``kernels/`` folder from shadowing Hugging Face's ``kernels`` package.

``kernels/`` sits at the repository root (it installs as ``lightning_gptq.kernels``). ``python -m ...``
and ``python -m pytest`` put the working directory first on ``sys.path``, so from a source checkout a
plain ``import kernels`` (transformers >= 5.25 imports HF's ``kernels`` package, which it depends on)
would find our folder and fail. Importing HF's package once, with the checkout's root off the path,
puts the right module in ``sys.modules`` for everyone after.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def import_hf_kernels_first() -> None:
    root = Path(__file__).resolve().parent.parent
    if "kernels" in sys.modules or not (root / "kernels" / "cpu_gemm.cpp").is_file():
        return  # already imported, or not a source checkout (an installed wheel has no top-level kernels/)
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
        importlib.import_module("kernels")
    except ImportError:
        pass  # HF's package is not installed: transformers then does not look for it
    finally:
        sys.path[:] = saved

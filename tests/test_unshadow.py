"""From a source checkout, ``import kernels`` must give Hugging Face's package, not the repository's folder."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_repository_kernels_folder_does_not_shadow_hf_kernels(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("HF = True\n")
    # As `python -m` runs it from the checkout: the root first, the installed packages after it.
    code = ("import sys; sys.path[:0] = ['', %r]; import lightning_gptq, kernels; "
            "print(getattr(kernels, 'HF', False), kernels.__file__)" % str(tmp_path / "site"))
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "True", out.stdout

"""The README is a manual: its Python examples run as printed, and its command lines parse.

Each ```python block runs with only sizes and sources swapped for offline, tiny ones (a random LLaMA and the
character tokenizer for the hub id, ../shared text for "wikitext2", a few short windows); each
``python -m lightning_gptq`` line of its ```bash blocks is parsed with ``--print_config`` (nothing loaded).
A new example without a case here fails ``test_every_python_example_has_a_case``."""

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gptq.cli import main
from lightning_gptq.nn import QuantLinear
from tiny_lm import CALIBRATION_TEXT, WIKITEXT_TEST, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HUB_ID = "HuggingFaceTB/SmolLM2-135M"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def _example(marker: str) -> str:
    (block,) = [b for b in _blocks("python") if marker in b]
    return block


def _offline(code: str, swaps: dict[str, str]) -> str:
    """``code`` with each of ``swaps`` made (each must be found: the README example changed otherwise)."""
    for old, new in swaps.items():
        assert old in code, f"the README example no longer contains {old!r}; update this test's swaps"
        code = code.replace(old, new)
    assert "HuggingFaceTB/" not in code
    return code


def _run(code: str, namespace: dict | None = None) -> dict:
    namespace = dict(namespace or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny models warn (unreached layers, ragged groups); not what is tested
        exec(compile(code, "README.md", "exec"), namespace)
    return namespace


CASES = {"lg.quantize(", "trainer.fit(module, data)", "gptq_quantize(weight", "trainer.fit(my_module"}


def test_every_python_example_has_a_case():
    blocks = _blocks("python")
    assert len(blocks) == len(CASES)
    assert all(sum(case in b for case in CASES) == 1 for b in blocks)


def test_the_one_call_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = tiny_model_dir(tmp_path, "llama")
    code = _offline(_example("lg.quantize("), {
        f'"{HUB_ID}"': repr(str(model_dir)), '"wikitext2",': repr(str(CALIBRATION_TEXT)) + ",",
        "nsamples=128, seqlen=2048": "nsamples=4, seqlen=32", "group_size=128": "group_size=16"})
    ns = _run(code)
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert any(isinstance(m, QuantLinear) for m in ns["model"].modules())  # the model loaded back
    assert ns["tokenizer"]("ab").input_ids


def test_the_pieces_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = tiny_model_dir(tmp_path, "llama")
    code = _offline(_example("trainer.fit(module, data)"), {
        f'"{HUB_ID}"': repr(str(model_dir)),
        '"wikitext2", nsamples=128, seqlen=2048': f"{str(CALIBRATION_TEXT)!r}, nsamples=4, seqlen=32",
        'eval_datasets=["wikitext2"]': f'eval_datasets=["wikitext2"], eval_paths={{"wikitext2": {str(WIKITEXT_TEST)!r}}}, '
                                       "eval_seqlen=32, eval_max_windows=4",
        "QuantConfig(bits=4, group_size=128)": "QuantConfig(bits=4, group_size=16)",
        "Trainer(": "Trainer(enable_progress_bar=False, "})
    ns = _run(code)
    assert any(isinstance(m, QuantLinear) for m in ns["module"].lm.modules())
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert ns["module"].results["after"]["wikitext2"]["ppl"] < 1e3  # eval_after scored it (random tiny model: ~100)


def test_the_solver_example():
    torch.manual_seed(0)
    code = _offline(_example("gptq_quantize(weight"), {"group_size=128": "group_size=16"})
    ns = _run(code, {"in_features": 64, "activations": torch.randn(256, 64), "weight": torch.randn(32, 64)})
    qw = ns["qw"]
    assert qw.dequantize().shape == (32, 64) and qw.codes.shape == (32, 64)


class _ForeignModule(LightningModule):
    """A project of its own: a small MLP language model with a head called ``lm_head``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.lm_head = nn.Linear(16, 16)

    def forward(self, x):
        return self.lm_head(self.body(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return nn.functional.mse_loss(self(x), x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_the_foreign_project_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = _offline(_example("trainer.fit(my_module"), {
        "Trainer(max_steps=1000,": "Trainer(max_steps=40, logger=False, enable_checkpointing=False, "
                                   "enable_progress_bar=False,",
        "group_size=128": "group_size=16"})
    my_module = _ForeignModule()
    _run(code, {"my_module": my_module, "my_dataloader": DataLoader(TensorDataset(torch.randn(160, 16)), batch_size=8)})
    assert isinstance(my_module.body[0], QuantLinear) and isinstance(my_module.body[2], QuantLinear)
    assert type(my_module.lm_head) is nn.Linear  # excluded by the example's regex


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m lightning_gptq "):
                lines.append(line.split("  #")[0].split(" # ")[0].strip())
    return lines


COMMANDS = _command_lines()


def test_the_readme_shows_command_lines():
    assert len(COMMANDS) >= 10 and any(" validate " in c for c in COMMANDS) and any(" predict " in c for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS, ids=range(len(COMMANDS)))
def test_each_command_line_parses(line, monkeypatch, capsys):
    """Option names, values and configs as printed (placeholders such as ``<quantized folder>`` and ``N`` filled)."""
    monkeypatch.chdir(ROOT)  # the configs are named relative to the checkout
    line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)  # an optional part, shown in brackets
    line = re.sub(r"<[^>]*>", "runs/x", line).replace("=N", "=2").replace("=M", "=2")
    argv = shlex.split(line)[3:]
    if "--print_config" not in argv:
        argv.append("--print_config")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (None, 0), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "data", "gptq", "trainer"} <= set(printed)

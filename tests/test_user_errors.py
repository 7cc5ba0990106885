"""Bad input is one clear line: from the command line exit status 2 and one ``lightning-gptq: error:`` line (no
traceback), from Python an exception that names what is wrong. Each case from a user audit."""

import logging
import sys

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_gptq as lg
from lightning_gptq.cli import main
from lightning_gptq.data import CalibrationDataError
from lightning_gptq.data.calibration import mixed_calibration_windows
from lightning_gptq.export_gguf import main as export_main
from lightning_gptq.nn import QuantLinear
from tiny_lm import CALIBRATION_TEXT, SMOLLM2_GGUF, char_tokenizer, tiny_model_dir

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CONFIG = lg.QuantConfig(bits=4, group_size=16)


def cli_error(monkeypatch, capsys, *argv) -> str:
    """Run the command line as a user does; it must exit 2 with one error line and no traceback."""
    monkeypatch.setattr(sys, "argv", ["lightning-gptq", *map(str, argv)])
    log = logging.getLogger("lightning_gptq")  # main() gives it a handler on this test's (captured) stderr
    for attribute in ("handlers", "level", "propagate"):
        monkeypatch.setattr(log, attribute, [] if attribute == "handlers" else getattr(log, attribute))
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lightning-gptq: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fit_args(tmp_path, model, calibration=CALIBRATION_TEXT, *extra):
    return ["fit", f"--model.model={model}", f"--data.calibration={calibration}", "--data.nsamples=2",
            "--data.seqlen=8", "--data.eval_datasets=[]", "--gptq.method=rtn", "--model.latency=false",
            "--model.eval_after=false", "--model.save_quantized=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET, *extra]


@pytest.fixture(scope="module")
def no_tokenizer_folder(tmp_path_factory):
    """A quantized tiny llama saved without its tokenizer."""
    root = tmp_path_factory.mktemp("notok")
    model = lg.quantize(tiny_model_dir(root), torch.randint(4, 60, (2, 8)), CONFIG, method="rtn", accelerator="cpu")
    return lg.save_quantized(model, None, root / "quantized")


@pytest.mark.parametrize("option", ["dtype", "activation_dtype"])
def test_a_misspelt_dtype_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, option):
    line = cli_error(monkeypatch, capsys, *fit_args(tmp_path, tmp_path / "no-such-model", CALIBRATION_TEXT,
                                                    f"--model.{option}=float33"))
    assert f"GPTQModule.{option}: Unknown dtype 'float33'; use one of" in line and "'bf16'" in line


@pytest.mark.parametrize("case", ["empty folder", "binary file"])
def test_unreadable_calibration_text_is_one_line(tmp_path, monkeypatch, capsys, case):
    if case == "empty folder":
        source = tmp_path / "texts"
        source.mkdir()
        (source / "notes.md").write_text("not a .txt file")
    else:
        source = tmp_path / "model.safetensors"
        source.write_bytes(bytes([0xC8, 0x00, 0xFF, 0xFE]) * 64)
    line = cli_error(monkeypatch, capsys, *fit_args(tmp_path, tiny_model_dir(tmp_path), source))
    assert "CalibrationDataError:" in line and str(source) in line
    assert ("holds no .txt files" if case == "empty folder" else "is not UTF-8 text") in line


def test_a_truncated_gguf_is_a_model_load_error(tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "smol.gguf"
    with open(SMOLLM2_GGUF, "rb") as source:
        truncated.write_bytes(source.read(100_000))
    monkeypatch.setenv("LIGHTNING_GPTQ_CACHE", str(tmp_path / "cache"))
    line = cli_error(monkeypatch, capsys, *fit_args(tmp_path, truncated))
    assert f"ModelLoadError: Could not load model '{truncated}': GGUF file '{truncated}' is truncated" in line


def test_the_whole_gguf_passes_the_truncation_check():
    from lightning_gptq.models.loading import _check_gguf_whole

    _check_gguf_whole(str(SMOLLM2_GGUF), SMOLLM2_GGUF)  # (its last tensor ends at its last byte)


def test_a_folder_without_tokenizer_files_warns_on_load_and_says_so_in_validate_and_predict(
        no_tokenizer_folder, tmp_path, monkeypatch, capsys, caplog):
    log = logging.getLogger("lightning_gptq")  # (the CLI stops it propagating to the root logger caplog reads)
    log.addHandler(caplog.handler)
    try:
        model, tokenizer = lg.load_quantized(no_tokenizer_folder)
    finally:
        log.removeHandler(caplog.handler)
    assert tokenizer is None and "holds no tokenizer files" in caplog.text
    common = [f"--model.model={no_tokenizer_folder}", "--model.latency=false", "--data.eval_seqlen=16",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET]
    for command in (["validate"], ["predict", "--data.prompts=[hi]"]):
        line = cli_error(monkeypatch, capsys, command[0], *common, *command[1:])
        assert f"the model '{no_tokenizer_folder}' has no tokenizer: its folder holds no tokenizer files" in line
        assert "Copy them from the original model into the folder" in line


@pytest.mark.parametrize("name", ["fp16", "bf16", "auto"])
def test_load_quantized_takes_the_dtype_names_the_cli_takes(no_tokenizer_folder, name):
    model, _ = lg.load_quantized(no_tokenizer_folder, dtype=name)
    expected = {"fp16": torch.float16, "bf16": torch.bfloat16, "auto": torch.float32}[name]
    assert model.get_input_embeddings().weight.dtype == expected


def test_load_quantized_refuses_an_unknown_dtype_by_name(no_tokenizer_folder):
    with pytest.raises(ValueError, match=r"Unknown dtype 'float33'; use one of \[.*'fp16'"):
        lg.load_quantized(no_tokenizer_folder, dtype="float33")


def test_load_quantized_names_itself_for_a_misspelt_argument_and_casts_every_layout(no_tokenizer_folder, tmp_path):
    """A misspelt keyword was a ``TypeError`` naming ``load_gptq``; ``dtype`` was dropped for an interim folder."""
    from lightning_gptq.checkpoint import save_interim

    with pytest.raises(TypeError, match=r"load_quantized\(\) got an unexpected keyword argument 'dtyp'"):
        lg.load_quantized(no_tokenizer_folder, dtyp="bf16")
    model, _ = lg.load_quantized(no_tokenizer_folder, backend="torch")
    interim = save_interim(model, None, tmp_path / "interim")
    cast, _ = lg.load_quantized(interim, dtype="bf16")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = cast(ids).logits
    assert cast.get_input_embeddings().weight.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert all(m.scales.dtype == torch.bfloat16 for m in cast.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        assert torch.allclose(logits.float(), model(ids).logits, atol=0.1, rtol=0.05)


def test_a_backend_this_device_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, capsys, no_tokenizer_folder):
    """Found by a user audit: ``--gptq.backend=cuda-int4`` on a CPU calibrated every block, then failed with a traceback
    and saved nothing; ``validate --model.backend=triton`` on a CPU was a traceback."""
    line = cli_error(monkeypatch, capsys, *fit_args(tmp_path, tiny_model_dir(tmp_path), CALIBRATION_TEXT,
                                                    "--gptq.method=gptq", "--gptq.backend=cuda-int4",
                                                    "--trainer.accelerator=cpu"))
    assert "GPTQCallback.backend: backend 'cuda-int4' runs on cuda only, and this run computes on cpu" in line
    line = cli_error(monkeypatch, capsys, "validate", f"--model.model={no_tokenizer_folder}", "--model.backend=triton",
                     "--data.eval_datasets=[]", "--model.latency=false", "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}", *QUIET)
    assert "model.backend: backend 'triton' runs on cuda only, and this run computes on cpu" in line


def test_a_model_path_that_is_a_plain_file_says_so(tmp_path, monkeypatch, capsys):
    plain = tmp_path / "weights.bin"
    plain.write_text("x")
    line = cli_error(monkeypatch, capsys, *fit_args(tmp_path, plain))
    assert f"'{plain}' is a file that is neither a folder nor a .gguf file" in line and "does not exist" not in line


def test_export_gguf_of_a_missing_folder_says_no_such_folder(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "out.gguf")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such folder"


def test_save_quantized_to_the_current_folder(no_tokenizer_folder, tmp_path, monkeypatch):
    model, _ = lg.load_quantized(no_tokenizer_folder)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert lg.save_quantized(model, char_tokenizer(), ".") == here
    assert (here / "config.json").is_file() and (here / "tokenizer_config.json").is_file()
    assert not (tmp_path / "here.partial").exists()


def test_a_calibration_mix_names_the_source_that_is_too_short(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words.")
    with pytest.raises(CalibrationDataError, match=rf"calibration source '{short}' \(2 of the 4 windows\): .*tokens"):
        mixed_calibration_windows({str(CALIBRATION_TEXT): 1, str(short): 1}, char_tokenizer(), nsamples=4, seqlen=24)


def test_quantize_refuses_token_ids_beyond_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match=r"token id 500, but the model's embedding has 96 rows \(ids 0\.\.95\)"):
        lg.quantize(tiny_model_dir(tmp_path), torch.full((2, 8), 500), CONFIG, accelerator="cpu")


# -- the pieces (a second audit, of the Python API's parts) ---------------------------------------------------------

def _solved(cols=256, rows=64):
    from lightning_gptq import QuantConfig, rtn_quantize

    return torch.nn.Linear(cols, rows), rtn_quantize(torch.randn(rows, cols), QuantConfig())


@pytest.mark.parametrize("backend", ["torch", "cpu-packed"])
def test_a_quantized_layer_refuses_an_input_of_another_width(backend):
    """The reference kernel took ``in_features`` from the input: a ``[2, 128]`` input to a 256-wide layer gave a
    plausible ``[2, 64]`` computed from half the weight."""
    from lightning_gptq.nn import make_quant_linear

    linear, solved = _solved()
    layer = make_quant_linear(linear, solved, backend)
    assert layer(torch.randn(2, 256)).shape == (2, 64)
    for width in (128, 255, 300):
        with pytest.raises(ValueError, match=r"takes inputs \[\.\.\., 256\], got \(2, %d\)" % width):
            layer(torch.randn(2, width))


def test_a_solved_weight_must_fit_the_layer_it_stands_in_for():
    from lightning_gptq.nn import make_quant_linear

    _, solved = _solved()
    with pytest.raises(ValueError, match=r"the solved weight is \[64, 256\] \(out, in\), the layer it stands in for "
                                         r"\[32, 128\]"):
        make_quant_linear(torch.nn.Linear(128, 32), solved, "torch")


def test_an_empty_hessian_is_refused_and_a_zero_one_warned_about():
    """An accumulator nothing was added to gave a zero Hessian, and the solve zeroed the whole weight in silence."""
    from lightning_gptq import QuantConfig, gptq_quantize
    from lightning_gptq.quant import HessianAccumulator

    accumulator = HessianAccumulator(16)
    with pytest.raises(RuntimeError, match="has no samples"):
        accumulator.hessian
    accumulator.add(torch.randn(16))  # one token, as [..., in_features] allows
    assert accumulator.nsamples == 1 and accumulator.hessian.shape == (16, 16)
    with pytest.warns(UserWarning, match="the Hessian is zero"):
        result = gptq_quantize(torch.randn(8, 16), torch.zeros(16, 16), QuantConfig(group_size=-1))
    assert not result.dequantize().any()


def test_a_bad_exclude_pattern_names_the_option():
    from lightning_gptq import QuantConfig
    from lightning_gptq.lightning import GPTQCallback

    with pytest.raises(MisconfigurationException, match="GPTQCallback.exclude .* not a regular expression"):
        GPTQCallback(QuantConfig(), exclude=["(("])


def test_perplexity_refuses_what_the_model_cannot_score():
    """``seqlen=1`` scored ``nan``, ``0`` divided by zero, a window past the model's positions or ids past its
    embedding gave a bare ``IndexError`` (or, on LLaMA's rotary positions, a number)."""
    from lightning_gptq.data import perplexity
    from tiny_models import FACTORIES

    for arch in ("llama", "gpt2"):
        model = FACTORIES[arch]()
        limit = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
        vocab = model.get_input_embeddings().num_embeddings
        tokens = torch.randint(0, vocab, (1, 4 * limit))
        assert perplexity(model, tokens, seqlen=16, progress=False, max_windows=1).ppl > 1
        for kwargs, said in (({"seqlen": 1}, "seqlen must be >= 2"), ({"seqlen": 0}, "seqlen must be >= 2"),
                             ({"seqlen": 2 * limit}, f"longer than the {limit} positions"),
                             ({"seqlen": 16, "bos_token_id": vocab}, f"bos_token_id hold id {vocab}")):
            with pytest.raises(ValueError, match=said):
                perplexity(model, tokens, progress=False, **kwargs)
        with pytest.raises(ValueError, match=f"tokens hold id {vocab + 5}, but the model's embedding has {vocab} rows"):
            perplexity(model, torch.cat([tokens, torch.tensor([[vocab + 5]])], dim=1), seqlen=16, progress=False)

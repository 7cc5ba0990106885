"""``GPTQModule``'s settings checked before any heavy work: each bad value is one clear line."""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gptq.checkpoint.compressed_tensors import FORMAT as CT_FORMAT
from lightning_gptq.checkpoint.folders import why_not_writable
from lightning_gptq.checkpoint.names import SPELLINGS
from lightning_gptq.checkpoint.shards import parse_size
from lightning_gptq.models.decode import MODES
from lightning_gptq.models.inputs import max_positions
from lightning_gptq.models.loading import resolve_dtype
from lightning_gptq.nn import backend_unavailable_on, check_backend, int8_head_unsupported

from .hooks import run_report

__all__ = ["check_fit", "check_options", "max_positions"]


def check_options(hp) -> None:
    """The constructor's arguments on their own (``hp``: the module's hparams)."""
    try:
        check_backend(hp.backend)
    except ValueError as error:
        raise MisconfigurationException(f"GPTQModule.backend: {error}") from None
    if hp.checkpoint_format not in ("auto", "gptq", "gptq_v2", CT_FORMAT):
        raise MisconfigurationException(f"GPTQModule.checkpoint_format must be 'auto', 'gptq', 'gptq_v2' or "
                                        f"'compressed-tensors', got {hp.checkpoint_format!r}")
    if hp.checkpoint_names not in SPELLINGS:
        raise MisconfigurationException(f"GPTQModule.checkpoint_names must be 'files' (tensor names as transformers' "
                                        f"files spell them; vLLM reads these) or 'modules' (the model's module names; "
                                        f"GPTQModel 7 reads these), got {hp.checkpoint_names!r}")
    if hp.streaming and hp.checkpoint_format == CT_FORMAT:
        raise MisconfigurationException("streaming writes the GPTQ layout block by block; compressed-tensors is "
                                        "written from the whole model: drop streaming for it")
    try:
        parse_size(hp.max_shard_size)
    except ValueError as error:
        raise MisconfigurationException(f"GPTQModule.{error}") from None
    for name in ("dtype", "activation_dtype"):  # (a misspelt one would fail once the model is loaded)
        if getattr(hp, name, None) is not None:
            try:
                resolve_dtype(getattr(hp, name))
            except ValueError as error:
                raise MisconfigurationException(f"GPTQModule.{name}: {error}") from None
    if hp.activation_storage not in ("memory", "disk", "auto"):
        raise MisconfigurationException(f"GPTQModule.activation_storage must be 'memory', 'disk' or 'auto', "
                                        f"got {hp.activation_storage!r}")
    if hp.save_dtype is not None and hp.save_dtype not in ("float16", "bfloat16", "float32"):
        raise MisconfigurationException(f"GPTQModule.save_dtype must be float16, bfloat16 or float32, got {hp.save_dtype!r}")
    if hp.calibration_dtype not in (None, "auto", "float64", "float32", "bfloat16", "float16"):
        raise MisconfigurationException(f"GPTQModule.calibration_dtype must be null, 'auto', 'float64', 'float32', "
                                        f"'bfloat16' or 'float16', got {hp.calibration_dtype!r}")
    if hp.latency_decode not in MODES:
        raise MisconfigurationException(f"GPTQModule.latency_decode must be one of {MODES}, got {hp.latency_decode!r}")
    if hp.lm_head not in ("fp32", "int8"):
        raise MisconfigurationException(f"GPTQModule.lm_head must be 'fp32' or 'int8', got {hp.lm_head!r}")
    for name in ("latency_prompt_tokens", "latency_decode_tokens"):
        if getattr(hp, name) < 1:
            raise MisconfigurationException(f"GPTQModule.{name} must be >= 1")


def check_fit(module, stage: str, dm, limit: int | None, plain_ddp: bool) -> None:
    """What ``stage`` (``fit``/``validate``/...) needs of the module, the data and the Trainer."""
    hp = module.hparams
    scores = bool(getattr(dm, "eval_datasets", None)) and (stage in ("validate", "test") or (
        stage == "fit" and (hp.eval_before or hp.eval_after)))
    lengths = {"seqlen": getattr(dm, "seqlen", None) if stage == "fit" else None,
               "eval_seqlen": getattr(dm, "eval_seqlen", None) if scores else None}
    for field, value in lengths.items():
        if limit is not None and value is not None and value > limit:
            raise MisconfigurationException(
                f"data.{field}={value} is longer than the {limit} positions {type(module.lm).__name__} supports")
    if scores:
        for name in dm.eval_datasets:  # read now (kept for scoring): a missing or short text fails before calibrating
            try:
                total = dm.eval_windows(name)[1]
            except (OSError, ValueError) as error:
                raise MisconfigurationException(f"data.eval_datasets: {name}: {error}") from None
            if total == 0:
                raise MisconfigurationException(f"data.eval_datasets: {name}: The text has {dm.eval_tokens(name).numel()}"
                                                f" tokens, fewer than one window of data.eval_seqlen={dm.eval_seqlen}")
    if why := backend_unavailable_on(hp.backend, module.trainer.strategy.root_device.type):
        raise MisconfigurationException(f"model.backend: {why}")
    if hp.lm_head == "int8" and not hp.streaming and (why := int8_head_unsupported(module.lm, module.device)):
        raise MisconfigurationException(f"model.lm_head=int8: {why}")  # (else a fit would fail after calibrating)
    if stage != "fit":
        if hp.streaming and (hp.latency or stage == "predict"):
            raise MisconfigurationException("streaming scores perplexity block by block but never holds the whole "
                                            "model, which " + ("predict needs: set --model.streaming=false" if stage ==
                                            "predict" else "timing needs: set --model.latency=false"))
        return
    if plain_ddp:
        raise MisconfigurationException(
            "DDP wraps the model to average gradients, and calibration has none: run fit across processes "
            "with --trainer.strategy=gptq_ddp (or gptq_ddp_spawn), which keeps Lightning's launch and "
            "process group and sums the Hessians across processes instead.")
    if module.is_quantized:
        raise MisconfigurationException(f"{hp.model} is already quantized; fit needs a full-precision model")
    if module.trainer.limit_train_batches != 1.0 or isinstance(module.trainer.limit_train_batches, int):  # (int 1:
        # one batch) it would cut the windows the summary and checkpoint record
        raise MisconfigurationException(f"trainer.limit_train_batches={module.trainer.limit_train_batches}: fit calibrates "
                                        "on every window of the data; set data.nsamples to calibrate on fewer")
    if hp.save_quantized and (why := why_not_writable(module.output_dir() / "model")):
        raise MisconfigurationException(f"model.output_dir: {why}")  # (else found after calibrating)
    if hp.streaming and (hp.latency or not hp.save_quantized):
        raise MisconfigurationException(
            "streaming never holds the whole model, so it cannot time it (it scores it block by block), and the "
            "written folder is its only result: " + ("set --model.latency=false" if hp.latency
                                                     else "keep save_quantized=true") + ".")
    if "quant" not in run_report(module.trainer):
        raise MisconfigurationException("fit quantizes through GPTQCallback: add it to the Trainer's callbacks")

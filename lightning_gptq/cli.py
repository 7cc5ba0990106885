"""``python -m lightning_gptq fit|validate|test|predict --config configs/<model>.yaml``."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gptq.checkpoint import CheckpointError
from lightning_gptq.data import CalibrationDataError, DatasetUnavailableError
from lightning_gptq.models import ModelLoadError, UnsupportedArchitectureError
from lightning_gptq.quant import QuantConfigError

from lightning_gptq.lightning import (BlockCheckpoint, CalibrationDataModule, CompletionWriter, GGUFExport, GPTQCallback,
                                      GPTQModule, HessianCapture, ResumeError)
from lightning_gptq.lightning.resume import check_resume_file

def _has_tensorboard() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))


TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "max_epochs": -1,  # GPTQModule sets the number of stages itself
    "num_sanity_val_steps": 0,  # validation would score the model before it is quantized
    "enable_checkpointing": True,  # only BlockCheckpoint (under `resume:`): a resume point after every block
    "enable_model_summary": False,  # GPTQModule registers no parameters; summary.md describes the run
    "default_root_dir": "runs",
    # CSV always works; TensorBoard when it is installed (per-layer losses plot nicely there).
    "logger": {"class_path": f"lightning.pytorch.loggers.{'TensorBoardLogger' if _has_tensorboard() else 'CSVLogger'}",
               "init_args": {"save_dir": "runs"}},
}


# Warnings that describe GPTQModule's design, not a user mistake: calibration has no optimizer and
# validation is empty during fit (scoring happens after the last block); plus deprecations inside
# Lightning itself that users cannot act on, and its advice for a resume point not found (not ours).
EXPECTED_WARNINGS = (
    r".*configure_optimizers` returned `None`",
    r".*Total length of `.*` across ranks is zero",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*there is no last checkpoint available",  # (its hint is for ModelCheckpoint; BlockCheckpoint says it instead)
    r".*all_gather is deprecated",  # (inside Lightning's strategy.all_gather, once per block and process under DDP)
)


class GPTQCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always present, configured under `gptq:` (bits, group size, method...).
        parser.add_lightning_class_args(GPTQCallback, "gptq")
        # How the layer Hessians are gathered (attention-sink weighting), under `hessian:`.
        parser.add_lightning_class_args(HessianCapture, "hessian")
        # A resume checkpoint after every block (`fit --ckpt_path last` continues a killed run), under `resume:`.
        parser.add_lightning_class_args(BlockCheckpoint, "resume")
        # Where ``predict`` writes its completions, under `completions:`.
        parser.add_lightning_class_args(CompletionWriter, "completions")
        # The quantized model also as GGUF for llama.cpp (`--gguf.path=auto`), under `gguf:`.
        parser.add_lightning_class_args(GGUFExport, "gguf")

    def parse_arguments(self, parser, args) -> None:
        self._given = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, list) else [])]
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """``--trainer.default_root_dir=X`` on the command line takes the logger's folder along (the quantized model
        goes under the logger's version folder), unless the logger's own folder is given there too: else a run's
        resume points went to X and its model to the config's or default's ``runs``."""
        given = lambda option: any(a == option or a.startswith((option + "=", option + ".")) for a in self._given)
        trainer = (self.config[self.subcommand] if self.subcommand else self.config).get("trainer")
        logger = getattr(trainer, "logger", None) if trainer is not None else None
        init_args = getattr(logger, "init_args", None)
        if (given("--trainer.default_root_dir") and not given("--trainer.logger") and init_args is not None
                and "save_dir" in init_args and init_args.save_dir != trainer.default_root_dir):
            init_args.save_dir = trainer.default_root_dir


    def _parse_ckpt_path(self) -> None:
        """A resume checkpoint named by its path is checked as ``--ckpt_path=last``'s is (``check_resume_file``), and
        its settings are not read over the command line's, as LightningCLI does: the command line's are the run's, and
        the resume check refuses those that differ from the checkpoint's (a file path resumed another model's run)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path not in (None, "last", "best", "hpc") and Path(path).is_file():
            check_resume_file(path)


USER_ERRORS = (QuantConfigError, ModelLoadError, UnsupportedArchitectureError, CalibrationDataError,
               DatasetUnavailableError, CheckpointError, MisconfigurationException, ResumeError)


def main(args=None) -> GPTQCLI:
    """Run the CLI. Given ``args`` (in-process use), errors propagate; from the command line a user
    error prints one line and exits with status 2 instead of a traceback."""
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    _show_our_log()
    try:
        return GPTQCLI(
            GPTQModule,
            CalibrationDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},  # re-running in the same folder must not trip over config.yaml
            # from the command line a bad option raises (one line below) instead of printing the whole usage
            parser_kwargs={"prog": "lightning-gptq"} | ({"exit_on_error": False} if args is None else {}),
            args=args,
        )
    except ArgumentError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"lightning-gptq: error: {message} (options: lightning-gptq <fit|validate|test|predict> --help)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except USER_ERRORS as error:
        if args is not None:
            raise
        print(f"lightning-gptq: error: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _show_our_log() -> None:
    """Our INFO lines (which quantized-linear backend ``auto`` chose per layer shape, kernel builds)
    on stderr, like Lightning's own: from the first process only."""
    log = logging.getLogger("lightning_gptq")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        # every process of a distributed fit makes the same choices: one says them (warnings come from each)
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or getattr(rank_zero_only, "rank", 0) == 0)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


if __name__ == "__main__":
    main()

"""Calibration windows for ``fit`` and evaluation windows for ``validate``/``test``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

from lightning_gptq.data import (
    EVAL_DATASETS,
    calibration_windows,
    eval_tokens,
    mixed_calibration_windows,
    own_eval_tokens,
)
from lightning_gptq.data.text import read_own_text
from lightning_gptq.data.evaluation import with_bos

from .distributed import WindowShards, world_size
from .generation import PromptDataset, collate_prompts, read_prompts


def _no_tokenizer(module) -> str:
    """Why a module loaded without a tokenizer (a quantized folder saved without its files) cannot go on."""
    model = getattr(getattr(module, "hparams", None), "model", None)
    return (f"the model {model!r} has no tokenizer: its folder holds no tokenizer files (tokenizer_config.json, "
            "tokenizer.json, ...). Copy them from the original model into the folder, or save it with its tokenizer "
            "(save_quantized(model, tokenizer, folder))")


def parse_eval_datasets(entries: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(names in order, {own set name: path})`` from ``eval_datasets`` entries; every own text is
    checked to exist and hold text here, before any model work."""
    names, own = [], {}
    for entry in entries:
        if entry in EVAL_DATASETS:
            name = entry
        else:
            name, sep, path = entry.partition("=")
            if not sep:
                if not (os.sep in entry or Path(entry).suffix or Path(entry).expanduser().exists()):
                    raise MisconfigurationException(
                        f"unknown eval dataset {entry!r}: use one of {list(EVAL_DATASETS)}, a path to your own text, "
                        f"or name=path")
                path, name = entry, Path(entry.rstrip("/")).name.split(".")[0]
            name = name.strip()
            if not name or name in EVAL_DATASETS:
                raise MisconfigurationException(f"eval dataset {entry!r}: give your text a name of its own (name=path), "
                                                f"not one of {list(EVAL_DATASETS)}")
            try:
                text = read_own_text(Path(path).expanduser())
            except (OSError, ValueError, KeyError) as error:
                raise MisconfigurationException(f"eval dataset {name!r}: {error}") from None
            if not text.strip():
                raise MisconfigurationException(f"eval dataset {name!r}: {path!r} holds no text")
            own[name] = path
        if name in names:
            raise MisconfigurationException(f"eval dataset {name!r} is named twice in eval_datasets")
        names.append(name)
    return names, own


class WindowDataset(Dataset):
    """Rows of ``windows`` [n, seqlen] as ``{"input_ids": [seqlen], "index": int}`` (index -1: padding)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        if i == WindowShards.PAD:  # a step this process sits out (it has one window fewer than others)
            return {"input_ids": torch.zeros_like(self.windows[0]), "index": WindowShards.PAD}
        return {"input_ids": self.windows[i], "index": i}


class CalibrationDataModule(LightningDataModule):
    """Token windows cut from text with the module's tokenizer.

    Args:
        calibration: "c4", "wikitext2", "ptb" (hub) or a local text file / folder of .txt files; or a
            mix in stated shares, ``{source: share, ...}`` (e.g. ``{a.txt: 3, b.txt: 1}``: 3/4 and 1/4
            of ``nsamples``).
        nsamples: calibration windows (reference: 128).
        seqlen: tokens per calibration window (reference: 2048).
        seed: window choice (reference: 0).
        batch_size: calibration windows per step (results do not depend on it; memory does).
        eval_datasets: what validate/test (and fit's eval_before/eval_after) score: names from
            wikitext2, ptb, ptb-new, c4, c4-new, and your own texts as sets of their own: ``name=path``
            or a bare path (named after the file or folder). A path is a text file (scored as it
            is), a folder of .txt files or a JSON-lines file (``"text"`` fields), joined by blank lines.
        eval_paths: local files standing in for hub datasets, by name (e.g. {wikitext2: ../wiki.test.raw}).
        eval_seqlen: evaluation window length (the protocol: 2048).
        eval_max_windows: score only the first windows (quick checks; results then say PARTIAL).
        calibration_bos: put the tokenizer's BOS token first in every calibration window (its last
            token drops off), as models trained with BOS before every document see their text; the
            reference's windows have none.
        eval_bos: score every window with BOS put first (its last token is then only a target, and
            all ``eval_seqlen`` tokens are scored); reported as protocol ``gptq-paper+bos``. Default:
            the paper's protocol, no BOS.
        prompts: prompts for ``predict`` (config or command line).
        prompts_file: more prompts for ``predict``: one per line, or JSON lines with a "prompt" field (``.jsonl``).
    """

    def __init__(
        self,
        calibration: str | dict[str, float] = "c4",
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        batch_size: int = 1,
        eval_datasets: list[str] | None = None,
        eval_paths: dict[str, str] | None = None,
        eval_seqlen: int = 2048,
        eval_max_windows: int | None = None,
        calibration_bos: bool = False,
        eval_bos: bool = False,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
    ) -> None:
        super().__init__()
        for field, value, least in (("nsamples", nsamples, 1), ("seqlen", seqlen, 1), ("batch_size", batch_size, 1),
                                    ("eval_seqlen", eval_seqlen, 2), ("eval_max_windows", eval_max_windows, 1)):
            if value is not None and value < least:  # (a 1-token window predicts nothing: its perplexity is nan)
                raise MisconfigurationException(f"CalibrationDataModule.{field} must be >= {least}, got {value}")
        self.eval_datasets, self.own_texts = parse_eval_datasets(eval_datasets if eval_datasets is not None else ["wikitext2"])
        self.calibration, self.nsamples, self.seqlen, self.seed = calibration, nsamples, seqlen, seed
        self.batch_size = batch_size
        self.eval_paths = dict(eval_paths or {})
        self.eval_seqlen, self.eval_max_windows = eval_seqlen, eval_max_windows
        self.calibration_bos, self.eval_bos = calibration_bos, eval_bos
        self.prompts, self.prompts_file = prompts, prompts_file
        self._calibration: torch.Tensor | None = None
        self._eval: dict[str, torch.Tensor] = {}

    @classmethod
    def from_windows(cls, windows: torch.Tensor, **kwargs) -> "CalibrationDataModule":
        """Calibrate on ``windows`` ``[n, seqlen]`` (token ids) exactly as given; ``kwargs``: the
        evaluation settings and ``batch_size``."""
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
            raise MisconfigurationException("calibration windows must be an integer tensor [n, seqlen] of token ids, got "
                                            f"{type(windows).__name__} {tuple(getattr(windows, 'shape', ()))}")
        dm = cls(calibration="token windows", nsamples=windows.shape[0], seqlen=windows.shape[1], **kwargs)
        dm._calibration = windows.long()
        return dm

    def _tokenizer(self):
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None and hasattr(module, "tokenizer"):
            raise MisconfigurationException(_no_tokenizer(module))
        if tokenizer is None:
            raise MisconfigurationException("CalibrationDataModule needs a LightningModule with a `tokenizer` (GPTQModule)")
        return tokenizer

    def calibration_windows(self, tokenizer=None) -> torch.Tensor:
        """[nsamples, seqlen] token ids; cached after the first call."""
        if self._calibration is None:
            draw = mixed_calibration_windows if isinstance(self.calibration, dict) else calibration_windows
            tokenizer = tokenizer or self._tokenizer()
            windows = draw(self.calibration, tokenizer, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)
            if self.calibration_bos:
                windows = with_bos(windows, self._bos_token_id(tokenizer, "calibration_bos"))
            self._calibration = windows
        return self._calibration

    def eval_bos_token_id(self, tokenizer=None) -> int | None:
        """The token put before every evaluation window (``eval_bos``), else None."""
        return self._bos_token_id(tokenizer or self._tokenizer(), "eval_bos") if self.eval_bos else None

    @staticmethod
    def _bos_token_id(tokenizer, option: str) -> int:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise MisconfigurationException(f"data.{option}=true, but this model's tokenizer has no BOS token")
        return int(bos)

    def eval_tokens(self, name: str, tokenizer=None) -> torch.Tensor:
        """[1, N] tokens of evaluation set ``name``, joined by the protocol's rule."""
        if name not in self._eval and name in self.own_texts:
            self._eval[name] = own_eval_tokens(self.own_texts[name], tokenizer or self._tokenizer())
        elif name not in self._eval:
            self._eval[name] = eval_tokens(name, tokenizer or self._tokenizer(), path=self.eval_paths.get(name),
                                           seqlen=self.eval_seqlen)
        return self._eval[name]

    def eval_windows(self, name: str, tokenizer=None) -> tuple[torch.Tensor, int]:
        """``(windows [n, eval_seqlen], total)``: the protocol's windows (tail dropped), only the first
        ``eval_max_windows`` of the ``total`` when that is set."""
        tokens = self.eval_tokens(name, tokenizer).reshape(-1)
        total = tokens.numel() // self.eval_seqlen
        n = total if self.eval_max_windows is None else min(total, self.eval_max_windows)
        return tokens[: n * self.eval_seqlen].view(n, self.eval_seqlen), total

    def train_dataloader(self) -> DataLoader:
        # Not shuffled: calibration stages index the activation cache by batch position.
        dataset = WindowDataset(self.calibration_windows())
        world = world_size(self.trainer)
        if world > 1:  # each process calibrates on its own windows (Hessians are summed across processes)
            if len(dataset) < world:
                raise MisconfigurationException(f"data.nsamples={len(dataset)} windows cannot be shared among "
                                                f"{world} processes; use at least {world}.")
            sampler = WindowShards(dataset, world, self.trainer.global_rank)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> list[DataLoader]:
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []  # fit scores perplexity itself, once, after the last block
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def predict_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if hasattr(module, "tokenizer") and module.tokenizer is None:  # (else predict_step fails on its first prompt)
            raise MisconfigurationException(_no_tokenizer(module))
        prompts = read_prompts(self.prompts, self.prompts_file)
        return DataLoader(PromptDataset(prompts), batch_size=1, collate_fn=collate_prompts)

    def _eval_loaders(self) -> list[DataLoader]:
        return [DataLoader(WindowDataset(self.eval_windows(name)[0]), batch_size=1) for name in self.eval_datasets]

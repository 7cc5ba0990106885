"""Calibration windows: `nsamples` random `seqlen`-token windows, chosen as the GPTQ reference does.

Sources:

- `"c4"`: hub `allenai/c4`, shard `en/c4-train.00000-of-01024.json.gz`. Per sample, random
  documents are drawn until one has more than `seqlen` tokens, then a random window of it
  (`lightning_gptq.data.text.document_windows`).
- `"wikitext2"` (hub train split, rows joined with `"\\n\\n"`), `"ptb"` (hub train split,
  sentences joined with `"\\n\\n"`), or a local path: the text is tokenized once and `nsamples`
  window starts are drawn with `randint(0, numel - seqlen - 1)`.
- A local path: a `.txt` file or a folder of `.txt` files is split into documents at blank lines
  and the documents are joined with `"\\n\\n"` (so a blank-line separated file reads as itself); a
  `.json`/`.jsonl(.gz)` file (e.g. a downloaded C4 shard) uses the C4 per-document rule.

Randomness is `random.Random(seed)`, which draws exactly what the reference's
`random.seed(seed); random.randint(...)` draws, without touching Python's global generator.
"""

from __future__ import annotations

import os
import random

import torch

from lightning_gptq._hub import short_hash
from lightning_gptq.data.text import (
    CalibrationDataError,
    DatasetUnavailableError,
    cached_tensor,
    document_windows,
    file_fingerprint,
    hub_ptb_sentences,
    hub_wikitext2_rows,
    is_json_lines,
    load_hub_column,
    read_documents,
    tokenize_cached,
    tokenizer_fingerprint,
)

__all__ = ["CALIBRATION_SOURCES", "CalibrationDataError", "DatasetUnavailableError", "calibration_windows", "text_windows"]

CALIBRATION_SOURCES = ("c4", "wikitext2", "ptb")
C4_TRAIN_SHARD = "en/c4-train.00000-of-01024.json.gz"
_LOCAL_HINT = (
    "Use local text instead: pass a file or a folder of .txt files as the source, e.g. "
    "calibration_windows('../shared/data/calibration/wikipedia-vital-leads.txt', tokenizer) "
    "(also brown.txt there), or a local copy of the C4 shard " + C4_TRAIN_SHARD + "."
)


def text_windows(ids: torch.Tensor, *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`[nsamples, seqlen]` windows of the token stream `ids` `[N]` at `random.Random(seed)` starts.

    Start `s = rng.randint(0, N - seqlen - 1)` per sample, window `ids[s : s + seqlen]` (the
    reference's rule, which never uses the last token as a window start position).
    """
    ids = ids.reshape(-1)
    if ids.numel() < seqlen + 1:
        raise CalibrationDataError(
            f"The calibration text has {ids.numel()} tokens; windows of seqlen={seqlen} need at least "
            f"{seqlen + 1}. Use more text or a shorter seqlen."
        )
    if nsamples * seqlen > ids.numel():
        # Random windows may overlap, but asking for more tokens than the text holds means the
        # "calibration set" is mostly repeats of the same text: refuse rather than mislead.
        raise CalibrationDataError(
            f"{nsamples} calibration windows of {seqlen} tokens need {nsamples * seqlen:,} tokens; the text has only "
            f"{ids.numel():,}. Use more text, fewer samples (nsamples) or shorter windows (seqlen)."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).to(torch.long)


def calibration_windows(
    source: str,
    tokenizer,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """`[nsamples, seqlen]` long token windows for calibration; see the module docstring for sources.

    Tokenized text (and C4 draws) are cached under `$LIGHTNING_GPTQ_CACHE/`, keyed on the text's
    (or file's) hash and the tokenizer's hash, so a second call does not tokenize again.
    Raises `CalibrationDataError` for bad arguments or too little text, `DatasetUnavailableError`
    when a hub source cannot be loaded.
    """
    if not isinstance(nsamples, int) or nsamples <= 0:
        raise CalibrationDataError(f"nsamples must be a positive integer, got {nsamples!r}.")
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise CalibrationDataError(f"seqlen must be a positive integer, got {seqlen!r}.")
    source = os.fspath(source)
    name = source.lower()

    if name == "c4":
        key = short_hash("calib-c4-hub", C4_TRAIN_SHARD, tokenizer_fingerprint(tokenizer), nsamples, seqlen, seed)

        def build() -> torch.Tensor:
            documents = load_hub_column(
                f"C4 ({C4_TRAIN_SHARD})", "text", _LOCAL_HINT,
                "allenai/c4", data_files={"train": C4_TRAIN_SHARD}, split="train",
            )
            return document_windows(documents, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                    allow_exact_length=False, progress=True)

        return cached_tensor(key, build)

    if name == "wikitext2":
        text = "\n\n".join(hub_wikitext2_rows("train", _LOCAL_HINT))
    elif name == "ptb":
        text = "\n\n".join(hub_ptb_sentences("train", _LOCAL_HINT))
    elif os.path.exists(os.path.expanduser(source)):
        path = os.path.expanduser(source)
        if os.path.isfile(path) and is_json_lines(path):
            key = short_hash("calib-docs", file_fingerprint(path), tokenizer_fingerprint(tokenizer), nsamples, seqlen, seed)
            return cached_tensor(
                key,
                lambda: document_windows(_local_documents(source), tokenizer, nsamples=nsamples, seqlen=seqlen,
                                         seed=seed, allow_exact_length=False, progress=True),
            )
        text = "\n\n".join(_local_documents(source))
    else:
        raise CalibrationDataError(
            f"Unknown calibration source {source!r}: not one of {CALIBRATION_SOURCES} and no such file or folder."
        )

    if not text.strip():
        raise CalibrationDataError(f"The calibration source {source!r} holds no text.")
    return text_windows(tokenize_cached(text, tokenizer), nsamples=nsamples, seqlen=seqlen, seed=seed)


def _local_documents(source: str) -> list[str]:
    """``read_documents`` of a local source; what makes it unreadable (a folder without .txt files, bytes that are
    not UTF-8 text, a bad JSON line) is a ``CalibrationDataError``."""
    try:
        return read_documents(os.path.expanduser(source))
    except CalibrationDataError:
        raise
    except (OSError, ValueError) as error:
        raise CalibrationDataError(f"The calibration source {source!r} cannot be read: {error}") from None


def mixed_calibration_windows(
    sources: dict[str, float],
    tokenizer,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """`[nsamples, seqlen]` windows drawn from several sources in the stated proportions
    (``{source: share}``, shares > 0, normalised). Each source gives its share of `nsamples`
    (largest remainder, at least one window each) by `calibration_windows`; the windows are then
    shuffled together (seeded), so batches mix the sources."""
    if not sources:
        raise CalibrationDataError("a calibration mix needs at least one source")
    bad = {k: v for k, v in sources.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if bad:
        raise CalibrationDataError(f"calibration shares must be positive numbers, got {bad}")
    total = sum(sources.values())
    exact = [nsamples * share / total for share in sources.values()]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: nsamples - sum(counts)]:
        counts[i] += 1
    if min(counts) < 1:
        raise CalibrationDataError(
            f"nsamples={nsamples} is too few to give every calibration source a window at shares {dict(sources)}")
    parts = []
    for source, n in zip(sources, counts):
        try:
            parts.append(calibration_windows(source, tokenizer, nsamples=n, seqlen=seqlen, seed=seed))
        except CalibrationDataError as error:  # (which source of the mix: its own message may not say)
            raise CalibrationDataError(f"calibration source {source!r} ({n} of the {nsamples} windows): {error}") from None
    windows = torch.cat(parts)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order]

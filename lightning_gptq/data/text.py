"""Text sources shared by calibration and evaluation: hub datasets, local files, cached tokenization.

Local file rules (one place, used by both modules):

- `.txt` (or any non-JSON file): documents are separated by blank lines (lines holding only
  whitespace); a document's lines are joined with `"\\n"` (line endings normalised to LF). A
  folder means its `*.txt` files in sorted name order, their documents concatenated.
- `.json` / `.jsonl` (optionally `.gz`, e.g. a downloaded C4 shard): one JSON object a line, the
  document is its `"text"` field.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import torch

from lightning_gptq._hub import cache_root, hub_access, hub_reachable, short_hash

__all__ = [
    "CalibrationDataError",
    "DatasetUnavailableError",
    "load_hub_column",
    "read_documents",
    "read_lines",
    "tokenize_cached",
    "tokenizer_fingerprint",
    "file_fingerprint",
    "document_windows",
    "cached_tensor",
    "hub_ptb_sentences",
    "hub_wikitext2_rows",
    "is_json_lines",
]

_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")


class DatasetUnavailableError(RuntimeError):
    """A hub dataset could not be loaded (offline, unreachable, or gone); use a local file."""


class CalibrationDataError(ValueError):
    """Calibration data cannot produce the requested windows."""


def _read_text(path: Path) -> str:
    """The file's text, line endings normalised; ``ValueError`` naming the file when it is not UTF-8 text."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read().replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({error.reason}: a binary file?); give a text file, a folder "
                         "of .txt files or a JSON-lines file") from None


def is_json_lines(path: str | os.PathLike) -> bool:
    """True for `.json`, `.jsonl`, `.json.gz`, `.jsonl.gz` files (one JSON document a line)."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    return bool(set(suffixes[-2:]) & {".json", ".jsonl"})


def _files(path: str | os.PathLike) -> list[Path]:
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise FileNotFoundError(f"Folder {str(path)!r} holds no .txt files.")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"No such file or folder: {str(path)!r}.")
    return [path]


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a local file or folder, by the module's rules; empty documents are dropped."""
    documents: list[str] = []
    for file in _files(path):
        if is_json_lines(file):
            for line in _read_text(file).splitlines():
                if line.strip():
                    documents.append(json.loads(line)["text"])
        else:
            documents.extend(d.strip("\n") for d in _BLANK_LINE.split(_read_text(file)))
    return [d for d in documents if d.strip()]


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a local file (or folder of .txt files), line endings removed, none dropped."""
    lines: list[str] = []
    for file in _files(path):
        text = _read_text(file)
        lines.extend(text[:-1].split("\n") if text.endswith("\n") else text.split("\n"))
    return lines


def read_own_text(path: str | os.PathLike) -> str:
    """A user's evaluation text as one string: a text file as it is, a folder's ``.txt`` files or a
    JSON-lines file's ``"text"`` fields joined by a blank line."""
    parts = []
    for file in _files(path):
        if is_json_lines(file):
            parts += [json.loads(line)["text"] for line in _read_text(file).splitlines() if line.strip()]
        else:
            parts.append(_read_text(file).strip("\n"))
    return "\n\n".join(p for p in parts if p.strip())


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cache key for a local file or folder: resolved paths, sizes and modification times."""
    return short_hash(*[(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(path)])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash identifying how `tokenizer` maps text to ids: its class and full definition.

    For fast tokenizers the definition is the serialized `tokenizers` JSON (vocab, merges,
    normalizer, post-processor with its BOS/EOS rule); otherwise the sorted vocab and special tokens.
    Not its folder: the same tokenizer saved in two places maps text the same way (and shares the cache).
    """
    parts: list[object] = [type(tokenizer).__name__]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts.append(backend.to_str())
    else:
        parts.append(sorted(tokenizer.get_vocab().items()))
    for attribute in ("special_tokens_map", "add_bos_token", "add_eos_token"):
        parts.append(getattr(tokenizer, attribute, None))
    return short_hash(*parts)


def tokenize_cached(text: str, tokenizer, *, use_cache: bool = True) -> torch.Tensor:
    """`tokenizer(text)` ids as a `[N]` long tensor, cached on disk by text hash + tokenizer hash.

    Tokenizes as the reference does (`tokenizer(text, return_tensors="pt")`): the tokenizer's own
    special-token rule applies once to the whole text (e.g. one BOS at its start), never per window.
    """
    path = cache_root() / "tokens" / f"{short_hash(text.encode('utf-8'), tokenizer_fingerprint(tokenizer))}.pt"
    if use_cache and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated or foreign file is re-created below
            path.unlink(missing_ok=True)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].to(torch.long)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, staging)
        os.replace(staging, path)
    return ids


def load_hub_column(
    description: str,
    column: str,
    local_hint: str,
    *args,
    **kwargs,
) -> list[str]:
    """`datasets.load_dataset(*args, **kwargs)[column]` as a list, or `DatasetUnavailableError`.

    When the hub does not answer a 2-second probe the load runs in offline mode, so a copy in the
    HF cache still works and anything else fails at once (no retries). `local_hint` says how to
    use a local file instead.
    """
    import datasets

    reachable = hub_reachable()
    try:
        with hub_access():
            dataset = datasets.load_dataset(*args, **kwargs)
        return list(dataset[column])
    except Exception as error:  # noqa: BLE001 - datasets raises many types; ours must be the top message
        state = "reachable" if reachable else "unreachable (offline mode or no connection; only the local HF cache was tried)"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DatasetUnavailableError(
            f"Could not load {description} from the Hugging Face hub, which is {state}: "
            f"{type(error).__name__}: {first_line[:300]}. {local_hint}"
        ) from error


def document_windows(
    documents: list[str],
    tokenizer,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    allow_exact_length: bool,
    progress: bool = False,
) -> torch.Tensor:
    """The reference's C4 rule: `[nsamples, seqlen]` windows, each from a randomly drawn document.

    With `rng = random.Random(seed)` (the same stream as `random.seed(seed)` + `random.randint`):
    per sample, draw `rng.randint(0, len(documents) - 1)` until the document tokenizes to more
    than `seqlen` tokens (at least `seqlen` with `allow_exact_length`, the reference's rule for the
    C4 validation windows), then take `ids[s:s+seqlen]` with `s = rng.randint(0, len - seqlen - 1)`.
    A document of exactly `seqlen` tokens is used whole without a draw (the reference crashes on it).
    """
    import random

    if not documents:
        raise CalibrationDataError("No documents to draw windows from (the source is empty).")
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}
    max_failures = max(1000, 20 * len(documents))
    samples = range(nsamples)
    if progress:
        from tqdm.auto import tqdm

        samples = tqdm(samples, desc="drawing windows", unit="window", leave=False)
    windows = []
    for _ in samples:
        failures = 0
        while True:
            index = rng.randint(0, len(documents) - 1)
            if index not in tokenized:
                tokenized[index] = tokenizer(documents[index], return_tensors="pt", verbose=False).input_ids[0]
            ids = tokenized[index]
            if ids.numel() > seqlen or (allow_exact_length and ids.numel() == seqlen):
                break
            failures += 1
            if failures >= max_failures:
                raise CalibrationDataError(
                    f"Drew {failures} documents in a row with fewer than {seqlen + 1} tokens; the source's "
                    f"documents are too short for seqlen={seqlen}."
                )
        start = 0 if ids.numel() == seqlen else rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows).to(torch.long)


def cached_tensor(key: str, build) -> torch.Tensor:
    """`build()` cached on disk under `key` (used for results that need no source text to look up)."""
    path = cache_root() / "windows" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - re-created below
            path.unlink(missing_ok=True)
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(value, staging)
    os.replace(staging, path)
    return value


# The script-based `ptb_text_only` loader is refused by datasets >= 4; its parquet conversion is
# read directly (the `sentence` column holds the script's stripped lines).
PTB_PARQUET_URL = "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/{split}/0000.parquet"


def hub_ptb_sentences(split: str, local_hint: str) -> list[str]:
    """PTB sentences of `split` ("train", "validation", "test") from the hub's parquet conversion."""
    return load_hub_column(
        f"PTB ({split})", "sentence", local_hint,
        "parquet", data_files={split: PTB_PARQUET_URL.format(split=split)}, split=split,
    )


def hub_wikitext2_rows(split: str, local_hint: str) -> list[str]:
    """WikiText-2 raw rows of `split` (blank rows included, as the reference joins them)."""
    return load_hub_column(
        f"WikiText-2 ({split})", "text", local_hint, "Salesforce/wikitext", "wikitext-2-raw-v1", split=split
    )

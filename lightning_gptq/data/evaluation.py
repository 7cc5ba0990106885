"""Perplexity by the GPTQ paper's protocol (GPTQ-REFERENCE.md §3).

The evaluation text is tokenized once; the stream is cut into `numel // seqlen` non-overlapping
windows (tail dropped, no BOS added per window); each window scores the mean cross-entropy of its
`seqlen - 1` shifted positions times `seqlen`, and `ppl = exp(sum / (nsamples * seqlen))`.

Texts (`eval_tokens`), hub or local (`path=`):

| name | hub text | local file rule |
| --- | --- | --- |
| wikitext2 | test split rows joined `"\\n\\n"` | lines joined `"\\n"` (the shared copy has its blank lines stripped upstream, so this is the file as is) |
| ptb | validation sentences joined `"\\n\\n"` | lines stripped (as the hub loader does) joined `"\\n\\n"`; give `ptb.valid.txt` |
| ptb-new | test sentences joined `" "` | lines stripped joined `" "`; give `ptb.test.txt` |
| c4 | 256 random `seqlen` windows of validation shard `en/c4-validation.00000-of-00008.json.gz`, seed 0 | same rule over the file's documents (JSON lines `text`, or blank-line separated `.txt`) |
| c4-new | first 1,100 validation documents joined `" "`, truncated to `256 * seqlen` tokens | same over the file's documents |

Numbers from a local WikiText-2 copy without blank lines are not identical to the hub text's.

Your own text (``own_eval_tokens``): a text file as it is, a folder's ``.txt`` files or a JSON-lines
file's ``"text"`` fields joined by a blank line; one string, the same windows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from lightning_gptq._hub import short_hash
from lightning_gptq.data.text import (
    DatasetUnavailableError,
    cached_tensor,
    document_windows,
    file_fingerprint,
    hub_ptb_sentences,
    hub_wikitext2_rows,
    load_hub_column,
    read_documents,
    read_lines,
    read_own_text,
    tokenize_cached,
    tokenizer_fingerprint,
)
from lightning_gptq.models.adapters import ArchitectureAdapter, scale_logits, weight_out_in
from lightning_gptq.models.capture import capture_block_inputs, module_device_dtype, run_block
from lightning_gptq.models.inputs import check_token_ids, max_positions

__all__ = [
    "EVAL_DATASETS",
    "DatasetUnavailableError",
    "PerplexityResult",
    "eval_tokens",
    "own_eval_tokens",
    "perplexity",
    "perplexity_blockwise",
    "window_nll",
    "with_bos",
]

EVAL_DATASETS = ("wikitext2", "ptb", "ptb-new", "c4", "c4-new")
C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_WINDOWS = 256
C4_NEW_DOCUMENTS = 1100
PROTOCOL = "gptq-paper"
_PROTOCOL_TEXT = "non-overlapping windows, tail dropped, no per-window BOS, loss over seqlen-1 shifted positions"
_PROTOCOL_TEXT_BOS = ("non-overlapping windows, tail dropped, BOS put before each window (its last token then only a "
                      "target), loss over all seqlen positions")

_LOCAL_FILES = {
    "wikitext2": "'../shared/data/wikitext-2-raw/wiki.test.raw'",
    "ptb": "'../shared/data/ptb/ptb.valid.txt'",
    "ptb-new": "'../shared/data/ptb/ptb.test.txt'",
}


def _local_hint(name: str) -> str:
    if name in _LOCAL_FILES:
        path = _LOCAL_FILES[name].strip("'")
        return (
            f"Evaluate on a local copy instead: --data.eval_paths='{{{name}: {path}}}' on the command line, "
            f"eval_tokens({name!r}, tokenizer, path='{path}') in Python (the path on this project's machines)."
        )
    shard = f"/path/to/{C4_VALIDATION_SHARD.split('/')[-1]}"
    return (
        f"Evaluate on a local copy instead: --data.eval_paths='{{{name}: {shard}}}' on the command line, "
        f"eval_tokens({name!r}, tokenizer, path='{shard}') in Python (the C4 shard {C4_VALIDATION_SHARD}, or a .txt "
        "file of blank-line separated documents). C4 is not on this project's machines; use 'wikitext2' with its path "
        "'../shared/data/wikitext-2-raw/wiki.test.raw' there."
    )


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {"wikitext-2": "wikitext2", "wikitext": "wikitext2", "ptb-text-only": "ptb"}.get(key, key)
    if key not in EVAL_DATASETS:
        raise ValueError(f"Unknown evaluation dataset {name!r}; choose one of {EVAL_DATASETS}.")
    return key


def eval_tokens(name: str, tokenizer, *, path: str | None = None, seqlen: int = 2048) -> torch.Tensor:
    """The token stream `[1, N]` (long) of evaluation text `name`, by the rules in the module docstring.

    `path` switches from the hub to a local file with the same joining rules. Tokenized text is
    cached on disk. Raises `DatasetUnavailableError` (fast, naming the local option) when the hub
    cannot be reached.
    """
    name = _normalise_name(name)
    if path is not None:
        path = os.path.expanduser(os.fspath(path))
        if not os.path.exists(path):
            raise FileNotFoundError(f"Evaluation file {path!r} for {name!r} does not exist.")
    hint = _local_hint(name)

    if name == "wikitext2":
        text = "\n".join(read_lines(path)) if path else "\n\n".join(hub_wikitext2_rows("test", hint))
    elif name in ("ptb", "ptb-new"):
        separator = "\n\n" if name == "ptb" else " "
        if path:
            sentences = [line.strip() for line in read_lines(path)]
        else:
            sentences = hub_ptb_sentences("validation" if name == "ptb" else "test", hint)
        text = separator.join(sentences)
    elif name == "c4":
        source_key = file_fingerprint(path) if path else f"hub:allenai/c4:{C4_VALIDATION_SHARD}"
        key = short_hash("eval-c4", source_key, tokenizer_fingerprint(tokenizer), seqlen)

        def build() -> torch.Tensor:
            windows = document_windows(
                _c4_documents(path, hint), tokenizer, nsamples=C4_EVAL_WINDOWS, seqlen=seqlen, seed=0,
                allow_exact_length=True, progress=True,
            )
            return windows.reshape(1, -1)

        return cached_tensor(key, build)
    else:  # c4-new
        text = " ".join(_c4_documents(path, hint)[:C4_NEW_DOCUMENTS])
        return tokenize_cached(text, tokenizer)[: C4_EVAL_WINDOWS * seqlen].reshape(1, -1)

    if not text.strip():
        raise ValueError(f"The evaluation text for {name!r} is empty.")
    return tokenize_cached(text, tokenizer).reshape(1, -1)


def own_eval_tokens(path: str | os.PathLike, tokenizer) -> torch.Tensor:
    """``[1, N]`` tokens of a user's own evaluation text (``read_own_text``), tokenized once and cached;
    the paper's protocol then cuts it into non-overlapping windows, tail dropped."""
    text = read_own_text(os.path.expanduser(os.fspath(path)))
    if not text.strip():
        raise ValueError(f"The evaluation text {str(path)!r} is empty.")
    return tokenize_cached(text, tokenizer).reshape(1, -1)


def _c4_documents(path: str | None, hint: str) -> list[str]:
    if path:
        return read_documents(path)
    return load_hub_column(
        f"C4 ({C4_VALIDATION_SHARD})", "text", hint,
        "allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation",
    )


@dataclasses.dataclass
class PerplexityResult:
    """A perplexity and how it was measured.

    `nll_sum`: sum over windows of (mean shifted cross-entropy x seqlen), in nats.
    `nsamples`: windows scored; `n_tokens`: tokens in them (`nsamples * seqlen`).
    `total_windows`: windows the full text yields; `text_tokens`: tokens of the whole text.
    """

    ppl: float
    nll_sum: float
    nsamples: int
    seqlen: int
    n_tokens: int
    dataset: str
    protocol: str
    total_windows: int = 0
    text_tokens: int = 0
    evaluator: str = "whole-model"
    seconds: float = 0.0
    bos: bool = False

    @property
    def partial(self) -> bool:
        return self.nsamples < self.total_windows

    def __str__(self) -> str:
        coverage = (
            f"first {self.nsamples} of {self.total_windows} windows, PARTIAL"
            if self.partial
            else f"{self.nsamples} windows"
        )
        return (
            f"{self.dataset or 'text'} perplexity {self.ppl:.4f} "
            f"[protocol {self.protocol}: {protocol_text(self.bos)}; seqlen {self.seqlen}; {coverage}; "
            f"{self.n_tokens:,} of {self.text_tokens:,} tokens; {self.evaluator}]"
        )


def protocol_text(bos: bool = False) -> str:
    return _PROTOCOL_TEXT_BOS if bos else _PROTOCOL_TEXT


def with_bos(windows: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """The model's input for `windows` `[b, seqlen]`: themselves, or with `bos_token_id` put first
    and their last token dropped (it is only a target then; the input keeps `seqlen` tokens)."""
    if bos_token_id is None:
        return windows
    return torch.cat([torch.full_like(windows[:, :1], bos_token_id), windows[:, :-1]], dim=1)


def _targets(input_ids: torch.Tensor, bos: bool, device: torch.device) -> torch.Tensor:
    """What each position predicts (-100: nothing, the last one without BOS) for `input_ids` `[b, seqlen]`."""
    targets = torch.full(input_ids.shape, -100, dtype=torch.long, device=device)
    if bos:
        targets[:] = input_ids.to(device)
    else:
        targets[:, :-1] = input_ids[:, 1:].to(device)
    return targets


def _protocol_term(losses: torch.Tensor, bos: bool) -> torch.Tensor:
    """Per-position fp32 losses `[b, seqlen]` -> the window's protocol term `[b]`."""
    return (losses if bos else losses[:, :-1]).mean(dim=1) * losses.shape[1]


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, *, bos: bool = False) -> torch.Tensor:
    """Per-window protocol term `[b]`: mean fp32 cross-entropy of the `seqlen-1` shifted positions x `seqlen`.
    With `bos`, `logits` came from `with_bos(input_ids)`: position t predicts token t, and all `seqlen`
    positions are scored (mean x `seqlen`).

    `logits` `[b, seqlen, vocab]`, `input_ids` `[b, seqlen]`; position t predicts token t+1.
    """
    batch, seqlen = input_ids.shape
    # Score every position with the last one ignored instead of slicing logits[:, :-1], which
    # would copy the whole [b, seqlen, vocab] tensor to make it contiguous.
    targets = _targets(input_ids, bos, logits.device)
    losses = F.cross_entropy(
        logits.float().reshape(batch * seqlen, -1), targets.reshape(-1), reduction="none", ignore_index=-100
    ).view(batch, seqlen)
    return _protocol_term(losses, bos)


LOGITS_SLICE_BYTES = 64 * 2**20  # fp32 logits computed at a time by head_window_nll


def head_window_nll(head_logits, hidden: torch.Tensor, input_ids: torch.Tensor, *, vocab: int,
                    bos: bool = False) -> torch.Tensor:
    """`window_nll(head_logits(hidden), input_ids)` without holding the window's `[b, seqlen, vocab]` logits:
    `head_logits` (`[b, rows, hidden]` -> `[b, rows, vocab]`) runs on a slice of positions at a time (about
    `LOGITS_SLICE_BYTES` of fp32 logits). Each position's logits and loss are computed on their own either way.

    `hidden` `[b, seqlen, hidden]`: what the head reads; `input_ids` `[b, seqlen]` as for `window_nll`."""
    batch, seqlen = input_ids.shape
    targets = _targets(input_ids, bos, hidden.device)
    rows = max(1, LOGITS_SLICE_BYTES // (4 * vocab * batch))
    losses = torch.empty(batch, seqlen, dtype=torch.float32, device=hidden.device)
    for start in range(0, seqlen, rows):
        logits = head_logits(hidden[:, start:start + rows]).float()
        losses[:, start:start + rows] = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, start:start + rows].reshape(-1), reduction="none",
            ignore_index=-100).view(batch, -1)
    return _protocol_term(losses, bos)


_FULL_LOGITS_WARNED: set[str] = set()
_WHOLE_LOGITS: weakref.WeakSet = weakref.WeakSet()  # models whose one-position check failed


@torch.no_grad()
def model_window_nll(model: nn.Module, input_ids: torch.Tensor, *, bos_token_id: int | None = None) -> torch.Tensor:
    """`window_nll(model(with_bos(input_ids, bos_token_id)).logits, input_ids)` `[b]`, without the window's
    `[b, seqlen, vocab]` logits (for SmolLM2 at 2048 tokens 400 MB, and the log-softmax as much again).

    A pre-hook on the LM head keeps what it reads and lets only the last position through, so the model's own
    forward post-processes that one position's logits; they must equal ours (`scale_logits` on the same head
    call) for the head to then run a slice of positions at a time (`head_window_nll`). A model whose head is
    not called once that way, or whose logits differ, is scored from its full logits (warned once per type; that
    model's later windows skip the try)."""
    ids, bos = with_bos(input_ids, bos_token_id), bos_token_id is not None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and model not in _WHOLE_LOGITS:
        read = []

        def last_position_only(module, args):
            read.append(args[0])
            return (args[0][:, -1:], *args[1:])

        handle = head.register_forward_pre_hook(last_position_only)
        try:
            logits = model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()
        if len(read) == 1 and read[0].shape[:2] == ids.shape and logits.shape[:2] == (ids.shape[0], 1):
            hidden = read[0]
            if torch.equal(scale_logits(model, head(hidden[:, -1:])).to(logits.dtype), logits):
                return head_window_nll(lambda h: scale_logits(model, head(h)), hidden, input_ids,
                                       vocab=logits.shape[-1], bos=bos)
        _WHOLE_LOGITS.add(model)  # (its later windows skip the try: one forward each)
        name = type(model).__name__
        if name not in _FULL_LOGITS_WARNED:
            _FULL_LOGITS_WARNED.add(name)
            warnings.warn(f"{name}: scored from each window's whole logits (more memory, same numbers): its forward "
                          "does not call the LM head once on the window, or changes the head's output in a way "
                          "scale_logits does not", stacklevel=2)
    return window_nll(model(input_ids=ids, use_cache=False).logits, input_ids, bos=bos)


def _check_scorable(model: nn.Module, tokens: torch.Tensor, seqlen: int, bos_token_id: int | None) -> None:
    """``ValueError`` for what the model cannot score (else ``nan``, or torch's bare ``IndexError`` mid-way): windows
    of fewer than 2 or more positions than the model's config allows, token ids outside its embedding."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (a window scores each token from the ones before it), got {seqlen}")
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} is longer than the {limit} positions {type(model).__name__} supports")
    check_token_ids(tokens, model, "tokens hold id")
    check_token_ids(bos_token_id, model, "bos_token_id hold id")


def _windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    tokens = tokens.reshape(-1)
    total = tokens.numel() // seqlen
    if total == 0:
        raise ValueError(f"The text has {tokens.numel()} tokens, fewer than one window of seqlen={seqlen}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}.")
    count = total if max_windows is None else min(total, max_windows)
    return tokens[: count * seqlen].view(count, seqlen), total


def protocol_name(count: int, total: int, bos: bool = False) -> str:
    name = PROTOCOL + ("+bos" if bos else "")
    return name if count == total else f"{name}/first-{count}-of-{total}-windows"


def _result(nll_sum: float, count: int, total: int, seqlen: int, text_tokens: int, dataset: str,
            evaluator: str, seconds: float, bos: bool = False) -> PerplexityResult:
    return PerplexityResult(
        ppl=math.exp(nll_sum / (count * seqlen)), nll_sum=nll_sum, nsamples=count, seqlen=seqlen,
        n_tokens=count * seqlen, dataset=dataset, protocol=protocol_name(count, total, bos), total_windows=total,
        text_tokens=text_tokens, evaluator=evaluator, seconds=seconds, bos=bos,
    )


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seqlen: int = 2048,
    dataset: str = "",
    max_windows: int | None = None,
    progress: bool = True,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Protocol perplexity of the whole model (one window at a time) on `tokens` `[1, N]`.

    `max_windows` scores only the first windows (for tests); the result then says so.
    `bos_token_id`: put it before every window (`with_bos`; the protocol is then named `gptq-paper+bos`).
    """
    start_time = time.perf_counter()
    _check_scorable(model, tokens, seqlen, bos_token_id)
    windows, total = _windows(tokens, seqlen, max_windows)
    device = module_device_dtype(model)[0]
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    try:
        with torch.no_grad():
            for window in _progress(windows, progress, desc=f"perplexity {dataset}".strip(), unit="window"):
                ids = window.unsqueeze(0).to(device)
                nll_sum += float(model_window_nll(model, ids, bos_token_id=bos_token_id).sum())
    finally:
        model.train(was_training)
    return _result(nll_sum, windows.shape[0], total, seqlen, tokens.numel(), dataset, "whole-model",
                   time.perf_counter() - start_time, bos=bos_token_id is not None)


def perplexity_blockwise(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    tokens: torch.Tensor,
    *,
    seqlen: int = 2048,
    device: torch.device | str | None = None,
    dataset: str = "",
    max_windows: int | None = None,
    progress: bool = True,
    before_block=None,
    after_block=None,
    store=None,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Protocol perplexity computed embeddings -> block by block -> final stage, as the reference's eval.

    Only one block is on `device` at a time (moved there and back); the hidden states of all
    windows stay on `device`. Default device: where the embeddings are. `before_block(block)` and
    `after_block(block)` run around each block (e.g. to read its weights from disk and free them);
    `store(hidden)` keeps each window's hidden state after each block (e.g. in a file).
    """
    start_time = time.perf_counter()
    _check_scorable(model, tokens, seqlen, bos_token_id)
    windows, total = _windows(tokens, seqlen, max_windows)
    if device is None:
        device = module_device_dtype(adapter.embedding_modules(model)[0])[0]
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, adapter, with_bos(windows, bos_token_id), batch_size=1, device=device,
                                      progress=progress)
        hidden = []
        for j in range(len(inputs.hidden)):  # dropped from `inputs` one by one: never held twice
            h, inputs.hidden[j] = inputs.hidden[j].to(device), None
            hidden.append(h if store is None else store(h))
        blocks = adapter.blocks(model)
        for block_index in _progress(range(len(blocks)), progress, desc=f"blockwise {dataset}".strip(), unit="block"):
            block = blocks[block_index]
            if before_block is not None:
                before_block(block)
            home = module_device_dtype(block)[0]
            block.to(device)
            try:
                for j in range(len(hidden)):
                    out = run_block(block, hidden[j].to(device), inputs.kwargs_for(block_index, j))
                    hidden[j] = out if store is None else store(out)
            finally:
                block.to(home)
                if after_block is not None:
                    after_block(block)
        del inputs

        final_modules = adapter.final_modules(model)
        homes = [module_device_dtype(m)[0] for m in final_modules]
        nll_sum = 0.0
        try:
            for module in final_modules:
                module.to(device)
            head, vocab = final_modules[-1], int(weight_out_in(final_modules[-1]).shape[0])
            with torch.no_grad():
                for j, h in enumerate(_progress(hidden, progress, desc="final stage", unit="window", leave=False)):
                    h = h.to(device)
                    for module in final_modules[:-1]:  # (adapter.logits, the head a slice of positions at a time)
                        h = module(h)
                    nll_sum += float(head_window_nll(lambda x: scale_logits(model, head(x)), h,
                                                     windows[j : j + 1].to(device), vocab=vocab,
                                                     bos=bos_token_id is not None).sum())
        finally:
            for module, home in zip(final_modules, homes):
                module.to(home)
    finally:
        model.train(was_training)
    return _result(nll_sum, windows.shape[0], total, seqlen, tokens.numel(), dataset, "blockwise",
                   time.perf_counter() - start_time, bos=bos_token_id is not None)

"""``predict``: generate completions for prompts, so a user can see at once whether the model still talks.

``Generation`` holds the usual generation settings (``--model.generation.*``); prompts come from the
data module (``--data.prompts``, ``--data.prompts_file``); ``CompletionWriter`` (``--completions.*``)
writes what comes back as JSON lines and prints it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import Dataset

from lightning_gptq.models.decode import MODES, StaticDecoder, fused_unavailable, static_path


@dataclass
class Generation:
    """Generation settings for ``predict``.

    Args:
        max_new_tokens: tokens generated per prompt at most.
        do_sample: sample (with ``temperature``/``top_k``/``top_p``) instead of greedy decoding.
        temperature: softmax temperature when sampling.
        top_k: sample among the k most likely tokens (0: all).
        top_p: nucleus sampling mass (1: off).
        repetition_penalty: > 1 discourages repeating tokens.
        seed: sampling seed (each prompt is seeded with ``seed + its index``, so results do not
            depend on batching).
        chat_template: wrap each prompt as a user message with the tokenizer's chat template
            (instruction-tuned models); ``False`` continues the raw text.
        decode: greedy decoding's path: ``eager`` (transformers' ``generate``), ``compiled`` (a static KV
            cache and the one-token step compiled once, ``models/decode.py``: the same tokens), ``fused`` (the
            static cache and one C++ call per layer: LLaMA-family models on ``cpu-packed``), or ``auto`` (the
            first prompt eager, the second on ``fused`` where it runs, else ``compiled``; later prompts take the faster).
            Sampling and repetition penalties always go through ``generate``.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    chat_template: bool = False
    decode: str = "eager"

    def __post_init__(self) -> None:
        if self.decode not in MODES:
            raise MisconfigurationException(f"generation.decode must be one of {MODES}, got {self.decode!r}")
        if self.decode in ("compiled", "fused") and (self.do_sample or self.repetition_penalty != 1):
            raise MisconfigurationException(f"generation.decode={self.decode} decodes greedily: set do_sample=false and "
                                            "repetition_penalty=1, or decode=eager")
        if self.max_new_tokens < 1:
            raise MisconfigurationException(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise MisconfigurationException(
                f"generation settings out of range: temperature > 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0 "
                f"(got {self.temperature}, {self.top_p}, {self.top_k}, {self.repetition_penalty})")

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from the config/command line, then from ``prompts_file`` (one per non-blank line; or JSON lines
    with a ``"prompt"`` text field when the file ends in ``.jsonl``)."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise MisconfigurationException(f"data.prompts_file {str(path)!r} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            try:
                out += [json.loads(line)["prompt"] for line in lines]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise MisconfigurationException(f"{path}: each line must be a JSON object with a 'prompt' ({error})") from None
        else:
            out += lines
    if wrong := [p for p in out if not isinstance(p, str)]:
        raise MisconfigurationException(f"a prompt must be text, got {wrong[0]!r} ({type(wrong[0]).__name__})")
    if not out:
        raise MisconfigurationException("predict needs prompts: set data.prompts (config or command line) or data.prompts_file")
    return out


class PromptDataset(Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt": self.prompts[i]}


def collate_prompts(items: list[dict]) -> dict:
    return {"index": [it["index"] for it in items], "prompt": [it["prompt"] for it in items]}


class GreedyPaths:
    """Greedy decoding for ``predict`` on the path ``Generation.decode`` names; ``auto`` times the eager and
    the static path (``fused`` where the model takes it, else ``compiled``) on the first two prompts (per generated
    token, compile time apart) and keeps the faster."""

    def __init__(self, lm, settings: Generation):
        self.lm, self.settings = lm, settings
        self.decoder = None
        self.ms_per_token: dict[str, float] = {}
        self.static = static_path(lm) if settings.decode == "auto" else settings.decode
        if settings.decode == "fused" and (why := fused_unavailable(lm)):
            raise MisconfigurationException(f"generation.decode=fused: the fused step cannot run this model ({why}); "
                                            "'auto' takes the fastest path that runs")
        self.static_error: str | None = None  # why ``auto``'s static path failed (then eager from there on)

    def path(self) -> str:
        s = self.settings
        if s.decode != "auto" or s.do_sample or s.repetition_penalty != 1:
            return s.decode if s.decode in ("compiled", "fused") else "eager"
        if self.static_error is not None:
            return "eager"
        untimed = [p for p in ("eager", self.static) if p not in self.ms_per_token]  # eager first
        return untimed[0] if untimed else min(self.ms_per_token, key=self.ms_per_token.get)

    def generate(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(new token ids [n], seconds spent compiling) for prompt ``ids`` [1, T] by the compiled path; stops after
        an end-of-sequence token of the model's generation config, as ``generate`` does."""
        need = ids.shape[1] + self.settings.max_new_tokens + 1
        fresh = self.decoder is None or self.decoder.max_cache_len < need
        if fresh:  # (a longer prompt than any before: a bigger cache, compiled again)
            fused = self.static == "fused"
            self.decoder = StaticDecoder(self.lm, max(need, 256), compiled=not fused, fused=fused)
        eos = self.lm.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        out = self.decoder.greedy(ids, self.settings.max_new_tokens, eos)
        return torch.tensor(out, dtype=torch.long), self.decoder.compile_s if fresh else 0.0

    def failed(self, error: Exception) -> None:
        """``auto``'s static path raised ``error``: warn once and decode eagerly from here on."""
        self.static_error = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        self.decoder = None
        rank_zero_warn(f"predict: the {self.static} decode path failed ({self.static_error}); decoding eagerly")

    def record(self, path: str, seconds: float, tokens: int, compile_s: float) -> None:
        if self.settings.decode == "auto" and path not in self.ms_per_token and tokens > 1:
            self.ms_per_token[path] = 1000 * max(seconds - compile_s, 0.0) / tokens
            if len(self.ms_per_token) == 2:
                timed = ", ".join(f"{name} {ms:.2f}" for name, ms in self.ms_per_token.items())
                rank_zero_info(f"predict: greedy decoding {timed} ms/token; {self.path()} from here on")


@torch.no_grad()
def complete(lm, tokenizer, prompt: str, index: int, settings: Generation, device: torch.device,
             paths: GreedyPaths | None = None) -> dict:
    """One prompt → ``{"index", "prompt", "completion", "new_tokens", "seconds", "decode"}``."""
    if tokenizer is None:
        raise MisconfigurationException("predict needs the model's tokenizer, and this model was loaded without one "
                                        "(a folder without tokenizer files: copy them from the original model into it)")
    text = prompt
    if settings.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise MisconfigurationException("generation.chat_template is set but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not settings.chat_template).input_ids.to(device)
    kwargs = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
              "repetition_penalty": settings.repetition_penalty,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        torch.manual_seed(settings.seed + index)
    else:  # greedy: no sampling knobs (transformers warns about unused ones)
        kwargs.update(temperature=None, top_k=None, top_p=None)
    path, compile_s = paths.path() if paths is not None else "eager", 0.0
    start = time.perf_counter()
    if path in ("compiled", "fused"):
        try:
            new, compile_s = paths.generate(ids)
        except Exception as error:  # noqa: BLE001 - auto falls back to eager, whatever stopped the static path
            if settings.decode != "auto":
                raise
            paths.failed(error)
            path, start = "eager", time.perf_counter()
    if path == "eager":
        new = lm.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:]
    seconds = time.perf_counter() - start
    if paths is not None:
        paths.record(path, seconds, int(new.numel()), compile_s)
    return {"index": index, "prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "seconds": round(seconds - compile_s, 3), "decode": path,
            **({"compile_seconds": round(compile_s, 1)} if compile_s else {})}


class CompletionWriter(BasePredictionWriter):
    """Writes ``predict``'s completions to ``<output>`` as JSON lines (one per prompt, in prompt
    order) and prints each one.

    Args:
        output: file to write; default ``<the module's output_dir>/completions.jsonl``.
        echo: also print each prompt and completion.
    """

    def __init__(self, output: str | None = None, echo: bool = True) -> None:
        super().__init__(write_interval="epoch")
        self.output, self.echo = output, echo
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = sorted((row for batch in predictions for row in batch), key=lambda r: r["index"])
        default = Path(pl_module.output_dir()) / "completions.jsonl" if hasattr(pl_module, "output_dir") else Path("completions.jsonl")
        self.path = Path(self.output).expanduser() if self.output else default
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.echo:
            for row in rows:
                print(f"\n### prompt {row['index']}: {row['prompt']}\n{row['completion']}\n"
                      f"({row['new_tokens']} tokens, {row['seconds']:.2f} s)")
        rank_zero_info(f"{len(rows)} completions written to {self.path}")

"""Latency of a causal LM: prefill throughput and batch-1 greedy decode time per token.

Decode runs on one of three paths (``decode=``): ``eager``, transformers' own forward with its dynamic KV cache;
``compiled``, :class:`~lightning_gptq.models.decode.StaticDecoder` (a static cache and the one-token step compiled
once; the compile is timed apart as ``compile_s`` and never enters the per-token figure); ``fused``, the static
cache and one C++ call per layer (``models/fused_decode.py``). ``auto`` times eager and the static path
``static_path`` picks and reports the faster, with both numbers kept. Prefill is the prompt's forward pass up to the next
token's logits (``logits_to_keep=1`` where the model takes it, as ``generate`` runs it), without a KV cache."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .decode import MODES, StaticDecoder, cache_keyword, returned_cache, share_inputs, static_path

log = logging.getLogger("lightning_gptq")


@dataclass
class LatencyResult:
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    prompt_tokens: int
    decode_tokens: int
    device: str
    dtype: str
    threads: int
    model_mib: float = 0.0
    decode_path: str = "eager"  # the path decode_ms_per_token comes from
    eager_decode_ms_per_token: float | None = None
    compiled_decode_ms_per_token: float | None = None
    fused_decode_ms_per_token: float | None = None  # one C++ call per layer (models/fused_decode.py), nothing compiled
    compile_s: float | None = None  # the compiled path's first step (trace and compile), apart from the figures
    compile_error: str | None = None  # why ``auto`` fell back to eager, if it did

    def __str__(self) -> str:
        timed = {name: ms for name, ms in (("eager", self.eager_decode_ms_per_token),
                                           ("compiled", self.compiled_decode_ms_per_token),
                                           ("fused", self.fused_decode_ms_per_token)) if ms is not None}
        paths = "; " + ", ".join(f"{name} {ms:.2f}" for name, ms in timed.items()) + " ms/token" if len(timed) > 1 else ""
        if self.compile_s is not None:
            paths += f", compile {self.compile_s:.1f} s"
        if self.compile_error:
            paths += f"; compiled path unavailable: {self.compile_error}"
        return (f"prefill {self.prefill_tokens_per_s:.1f} tokens/s ({self.prompt_tokens}-token prompt, batch 1), "
                f"decode {self.decode_ms_per_token:.2f} ms/token ({self.decode_path}; batch 1, {self.decode_tokens} "
                f"tokens, KV cache{paths}) on {self.device}, {self.dtype}, {self.threads} threads; "
                f"model tensors {self.model_mib:.1f} MiB")

    def to_dict(self) -> dict:
        return asdict(self)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared tensors, e.g. tied embeddings, once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model: nn.Module, *, prompt_tokens: int = 128, decode_tokens: int = 32, repeats: int = 3,
                    seed: int = 0, decode: str = "eager", cpp_wrapper: bool = False) -> LatencyResult:
    """Best of ``repeats`` timings after one warm-up, on random token ids (fixed ``seed``). ``decode``: ``eager``,
    ``compiled``, ``fused`` or ``auto`` (eager and the static path :func:`static_path` picks; the faster counts);
    ``cpp_wrapper``: see ``StaticDecoder``. The model's linears that read one input are made to share it first
    (``share_inputs``: exact, and it stays so)."""
    if decode not in MODES:
        raise ValueError(f"decode must be one of {MODES}, got {decode!r}")
    param = next(model.parameters())
    device = param.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)
    # generation never reads the other rows' logits; a large vocabulary's head over every row is work no one waits for
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def prefill() -> float:
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, **last_only)
        _sync(device)
        return time.perf_counter() - start

    keyword = cache_keyword(model)

    def eager_decode() -> float:
        out = model(input_ids=ids, use_cache=True, **last_only)
        past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{keyword: past})
            past, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    def static_decode(decoder: StaticDecoder) -> float:
        logits = decoder.prefill(ids)
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            logits = decoder.step(logits.argmax())
        _sync(device)
        return time.perf_counter() - start

    share_inputs(model)  # (exact; both paths decode with it)
    was_training = model.training
    model.eval()
    per_token = {}
    compile_s = compile_error = None
    try:
        prefill()  # warm-up
        prefill_s = min(prefill() for _ in range(repeats))
        if decode in ("eager", "auto"):
            eager_decode()
            per_token["eager"] = min(eager_decode() for _ in range(repeats)) / decode_tokens
        if decode != "eager":
            path = static_path(model) if decode == "auto" else decode
            try:
                decoder = StaticDecoder(model, prompt_tokens + decode_tokens + 1, compiled=path == "compiled",
                                        fused=path == "fused", mode="reduce-overhead" if device.type == "cuda" else None,
                                        cpp_wrapper=cpp_wrapper)
                static_decode(decoder)  # the first step compiles
                compile_s = decoder.compile_s if path == "compiled" else None
                static_decode(decoder)
                per_token[path] = min(static_decode(decoder) for _ in range(repeats)) / decode_tokens
            except Exception as error:  # noqa: BLE001 - auto falls back to eager, whatever stopped the compiler
                if decode != "auto":
                    raise
                compile_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
                log.warning("%s decode unavailable, eager measured only: %s", path, compile_error)
    finally:
        model.train(was_training)
    path = min(per_token, key=per_token.get)
    ms = {k: 1000 * v for k, v in per_token.items()}
    return LatencyResult(
        prefill_tokens_per_s=prompt_tokens / prefill_s, decode_ms_per_token=ms[path],
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, device=str(device),
        dtype=str(param.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        model_mib=model_bytes(model) / 2**20, decode_path=path, eager_decode_ms_per_token=ms.get("eager"),
        compiled_decode_ms_per_token=ms.get("compiled"), fused_decode_ms_per_token=ms.get("fused"), compile_s=compile_s, compile_error=compile_error,
    )

"""Latency of a causal LM: prefill throughput and batch-1 greedy decode time per token."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


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

    def __str__(self) -> str:
        return (f"prefill {self.prefill_tokens_per_s:.1f} tokens/s ({self.prompt_tokens}-token prompt, batch 1), "
                f"decode {self.decode_ms_per_token:.2f} ms/token (batch 1, {self.decode_tokens} tokens, KV cache) "
                f"on {self.device}, {self.dtype}, {self.threads} threads; model tensors {self.model_mib:.1f} MiB")

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
                    seed: int = 0) -> LatencyResult:
    """Best of ``repeats`` timings after one warm-up, on random token ids (fixed ``seed``)."""
    param = next(model.parameters())
    device = param.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed)).to(device)

    def prefill() -> float:
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        return time.perf_counter() - start

    def decode() -> float:
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    was_training = model.training
    model.eval()
    try:
        prefill(), decode()  # warm-up
        prefill_s = min(prefill() for _ in range(repeats))
        decode_s = min(decode() for _ in range(repeats))
    finally:
        model.train(was_training)
    return LatencyResult(
        prefill_tokens_per_s=prompt_tokens / prefill_s, decode_ms_per_token=1000 * decode_s / decode_tokens,
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, device=str(device),
        dtype=str(param.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
        model_mib=model_bytes(model) / 2**20,
    )

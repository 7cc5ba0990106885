"""Batch-1 decoding over a static KV cache, with the one-token step compiled once (``torch.compile``).

transformers' eager forward spends most of a small model's decode step in Python: module calls, mask
building, cache concatenation. :class:`StaticDecoder` keeps the KV cache in tensors allocated once
(``StaticCache``) and compiles the step that reads one token and writes its keys and values, so the
per-token work is one call of generated code around the quantized kernels (C++ operators, see
``lightning_gptq.nn.ops``). The first compiled step traces and compiles (tens of seconds); later steps
of any prompt up to ``max_cache_len`` reuse it. The prompt runs eagerly through the same cache.

    decoder = StaticDecoder(model, max_cache_len=256, compiled=True)
    tokens = decoder.greedy(prompt_ids, 32)        # [32] token ids: eager greedy decoding's, but at near-ties
"""

from __future__ import annotations

import contextlib
import inspect
import time
import types

import torch
from torch import Tensor, nn

MODES = ("eager", "compiled", "fused", "auto")


def fused_unavailable(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the fused C++ decode step (asked after :func:`share_inputs`), or None when it can."""
    from .fused_decode import unavailable

    share_inputs(model)
    return unavailable(model)


def static_path(model: nn.Module) -> str:
    """The static-cache path ``auto`` takes for ``model``: ``fused`` where it runs (no compile), else ``compiled``."""
    return "fused" if fused_unavailable(model) is None else "compiled"


def cache_keyword(model: nn.Module) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` (transformers 5.x), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def share_inputs(model: nn.Module) -> int:
    """Let the ``cpu-packed`` linears that read one input (siblings in a module other than its output projection:
    q/k/v, gate/up) run as one kernel call at decode sizes, where they can (``SharedInput.join``). Exact: outputs
    are bit-identical to the members' own calls (a member whose one-row kernel differs from most members' takes
    theirs), and a member called with another input computes afresh. Returns how many groups share."""
    from lightning_gptq.nn.cpu_packed import CpuPackedQuantLinear, SharedInput

    from .adapters import is_output_projection

    siblings: dict[str, list[nn.Module]] = {}
    for name, module in model.named_modules():
        if type(module) is CpuPackedQuantLinear and not is_output_projection(name):
            siblings.setdefault(name.rpartition(".")[0], []).append(module)
    return sum(SharedInput.join(members) is not None for members in siblings.values())


class StaticDecoder:
    """One sequence at a time over a ``StaticCache`` of ``max_cache_len`` positions (the model's linears that
    read one input become one call: :func:`share_inputs`); ``compiled`` compiles the
    one-token step (inductor on CPU) the first time it runs. ``mode``: ``torch.compile``'s; ``cpp_wrapper``:
    inductor's C++ wrapper (no Python between kernels: faster steps, a first compile of minutes, cached on disk).
    ``attention``: the transformers attention implementation the compiled step is traced with: ``auto`` (default)
    our one-call C++ decode attention where it can run (CPU, fp32; ``decode_attention``), else ``eager`` (plain
    matmuls and softmax that inductor fuses, 1.15× faster steps than ``sdpa`` here); None: the model's own.
    ``fused``: instead, one C++ call per decoder layer (:mod:`.fused_decode`; LLaMA-family models on ``cpu-packed``
    linears, no compile; ``ValueError`` naming the reason where it cannot run).
    The compiled step keeps the model as it was when compiled: build a new decoder after changing the model."""

    def __init__(self, model: nn.Module, max_cache_len: int, *, compiled: bool = True, mode: str | None = None,
                 cpp_wrapper: bool = False, attention: str | None = "auto", fused: bool = False):
        from transformers.cache_utils import StaticCache

        self.model = model
        self.max_cache_len = max_cache_len
        share_inputs(model)
        param = next(model.parameters())
        self.device = param.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        _unslide(self.cache, max_cache_len)
        self.length = 0  # positions filled
        self._cache_kw = cache_keyword(model)
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self._fused = None
        if fused:
            from .fused_decode import FusedLlamaStep

            self._fused, compiled = FusedLlamaStep(model, max_cache_len), False
        self.compiled = compiled
        self.attention = _resolve_attention(attention, param) if compiled else None
        self.compile_s = 0.0  # time the first compiled step took (tracing and compiling included)
        self._first = compiled
        if compiled:
            # No guards: checking them (every parameter of every module) took 2.5 ms of a 17 ms step here, and the
            # step's inputs never change shape. Without guards dynamo would hand any later decoder the graph it
            # keeps for this code object, so each decoder steps through a code object of its own.
            # The wrapper built apart from the kernels: one build of minutes otherwise (500 s against 20 s here).
            # torch.compile takes a mode or options, not both: the mode goes in as the options it stands for
            from torch._inductor import list_mode_options

            options = {**(list_mode_options(mode, False) if mode else {}),
                       "guard_filter_fn": torch.compiler.skip_all_guards_unsafe, "cpp_wrapper": cpp_wrapper,
                       "cpp_wrapper_build_separate": cpp_wrapper}
            self._step = torch.compile(_own_code(self._forward), fullgraph=True, dynamic=False, options=options)
        else:
            self._step = self._forward

    def _forward(self, token: Tensor, position: Tensor) -> Tensor:
        # position ids given: OPT would derive them from the cache's filled length, a value a graph cannot hold
        out = self.model(input_ids=token, **{self._cache_kw: self.cache}, use_cache=True, cache_position=position,
                         **({"position_ids": position[None]} if self._takes_positions else {}))
        return out.logits[0, -1]

    def reset(self) -> None:
        self.cache.reset()
        self.length = 0

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """Run the prompt ``ids`` [1, T] (eagerly) into an emptied cache; the next token's logits [vocab]."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"StaticDecoder decodes one prompt at a time: ids must be [1, T] with T >= 1, got "
                             f"{list(ids.shape)}")
        self.reset()
        t = ids.shape[-1]
        if t + 1 > self.max_cache_len:
            raise ValueError(f"a {t}-token prompt leaves no room in a {self.max_cache_len}-position cache")
        out = self.model(input_ids=ids.to(self.device), **{self._cache_kw: self.cache}, use_cache=True,
                         cache_position=torch.arange(t, device=self.device), logits_to_keep=1)
        self.length = t
        return out.logits[0, -1]

    @torch.no_grad()
    def step(self, token: int | Tensor) -> Tensor:
        """Append one token; the next token's logits [vocab]."""
        if self.length >= self.max_cache_len:
            raise ValueError(f"the static cache is full ({self.max_cache_len} positions)")
        token = torch.as_tensor(token, device=self.device).reshape(1, 1)
        if self._fused is not None:
            logits = self._fused(token, self.length, self.cache)
            self.length += 1
            return logits
        position = torch.tensor([self.length], device=self.device)
        if self._first:
            start = time.perf_counter()
            with _attention(self.model, self.attention):  # what the traced graph computes attention with
                logits = self._step(token, position)
            self.compile_s = time.perf_counter() - start
            self._first = False
        else:
            logits = self._step(token, position)
        self.length += 1
        return logits

    @torch.no_grad()
    def greedy(self, ids: Tensor, new_tokens: int, eos: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Greedy continuation of ``ids`` [1, T]: ``new_tokens`` token ids, fewer when one in ``eos`` comes (it is kept)."""
        logits = self.prefill(ids)
        out = []
        for i in range(new_tokens):
            out.append(int(logits.argmax()))
            if out[-1] in eos or i + 1 == new_tokens:
                break
            logits = self.step(out[-1])
        return out

def _unslide(cache, max_cache_len: int) -> None:
    """Give ``cache``'s sliding-window layers all ``max_cache_len`` positions, as full-attention layers have.

    A sliding layer keeps only the last ``window`` positions and tracks how full it is in a Python integer, which a
    compiled step holds as the constant it saw when traced: every later step would then roll and mask as that first
    one did (logits off by 1e-3 to 1e-1 once a prompt passes the window). Over full-length layers the window is
    the mask's alone (``sliding_window_causal_mask_function``: the same last ``window`` positions attended)."""
    from transformers.cache_utils import StaticLayer

    for i, layer in enumerate(cache.layers):
        if getattr(layer, "is_sliding", False):
            cache.layers[i] = StaticLayer(max_cache_len=max_cache_len)


def _resolve_attention(attention: str | None, param: Tensor) -> str | None:
    if attention != "auto":
        return attention
    if param.device.type == "cpu" and param.dtype == torch.float32:
        from .decode_attention import register

        return register() or "eager"
    return "eager"


def _own_code(method):
    """``method`` (bound) through a function with a code object of its own (dynamo keeps compiled code per code object)."""
    fn = method.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(method.__self__):x}")
    return types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                            method.__self__)


@contextlib.contextmanager
def _attention(model: nn.Module, implementation: str | None):
    """``model`` set to another transformers attention implementation for the duration (None: unchanged)."""
    before = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation is None or before is None or before == implementation or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)

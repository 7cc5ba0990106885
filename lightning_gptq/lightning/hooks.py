"""The block-level hooks our callbacks implement, and how a driver fires them.

Lightning's ``Callback`` knows epochs and batches, not decoder blocks. A driver (``GPTQModule``, or
``GPTQCallback`` on a user's own module) calls ``fire_block_hook`` around each calibration step;
every callback that defines the hook gets it, in ascending ``block_hook_order`` (Hessians are
finished before anyone solves with them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class BlockContext:
    """One calibration step: the linears of one block (or of one true-sequential group of it).

    ``block`` is the module the calibration passes run through (a decoder block, or a whole user
    model); ``layers`` maps names relative to ``block`` to the linears to quantize in this step.
    Callbacks share results through ``hessians`` (name -> HessianAccumulator) and ``results``
    (name -> QuantizedWeight).
    """

    block_index: int
    num_blocks: int
    block: nn.Module
    layers: dict[str, nn.Module]
    group_index: int = 0
    num_groups: int = 1
    prefix: str = ""  # dotted path of ``block`` in the model, for names in logs and checkpoints
    hessians: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def describe(self) -> str:
        group = f" group {self.group_index + 1}/{self.num_groups}" if self.num_groups > 1 else ""
        return f"block {self.block_index + 1}/{self.num_blocks}{group}"


def fire_block_hook(trainer, pl_module, hook: str, ctx: BlockContext) -> None:
    """Call ``callback.<hook>(trainer, pl_module, ctx)`` on every callback that has it."""
    callbacks = [cb for cb in trainer.callbacks if callable(getattr(cb, hook, None))]
    for cb in sorted(callbacks, key=lambda cb: getattr(cb, "block_hook_order", 100)):
        getattr(cb, hook)(trainer, pl_module, ctx)

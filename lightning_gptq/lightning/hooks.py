"""The block-level hooks our callbacks implement, and how a driver fires them.

Lightning's ``Callback`` knows epochs and batches, not decoder blocks. ``GPTQModule`` runs a
``CalibrationDriver`` whose every block step fires these hooks on the Trainer's callbacks, in ascending
``block_hook_order`` (Hessians are finished before anyone solves with them):

    on_calibration_start(trainer, pl_module, driver)   fit is set up (also in a dry run)
    on_block_start(trainer, pl_module, ctx)            a block's calibration passes begin
    on_block_end(trainer, pl_module, ctx)              they ended: solve and swap
    on_block_propagated(trainer, pl_module, ctx)       the block's outputs are the next inputs
    on_calibration_end(trainer, pl_module, driver)     every block is done

``ctx`` is a ``BlockContext`` (``lightning_gptq.driver``): which block and layers, the activation
cache, the stage. ``driver`` is the ``CalibrationDriver`` (``model``, ``streams``, ``inputs``).
``GPTQCallback`` on a user's own module fires the block hooks itself around its one "block".
"""

from __future__ import annotations

from lightning_gptq.driver import BlockContext

__all__ = ["BlockContext", "BlockHooks", "drives_blocks", "fire_block_hook", "quantizes_layer", "run_report"]

HOOKS = ("on_calibration_start", "on_block_start", "on_block_end", "on_block_propagated", "on_calibration_end")


class BlockHooks:
    """Mixin for a callback that takes part in block-by-block calibration. Every hook is optional.

    ``needs_calibration``: whether the driver must run calibration passes (GPTQ reads Hessians;
    round to nearest reads nothing). ``report()``: what this callback contributes to the saved
    checkpoint's settings and the run summary (e.g. ``{"quant": QuantConfig, "method": "gptq"}``).
    ``quantizes(name)``: whether the linear of that full name is quantized in this run (``False``: it
    stays dense, and the driver neither captures its inputs nor waits for them).
    """

    block_hook_order = 100
    needs_calibration = False

    def report(self) -> dict:
        return {}

    def quantizes(self, name: str) -> bool:
        return True


def drives_blocks(pl_module) -> bool:
    """Whether ``pl_module`` runs a calibration driver that fires the block hooks (``GPTQModule``: its class sets
    ``drives_blocks``); else it is a user's own module, which ``GPTQCallback`` quantizes whole when training ends."""
    return bool(getattr(type(pl_module), "drives_blocks", False))


def fire_block_hook(trainer, pl_module, hook: str, ctx) -> None:
    """Call ``callback.<hook>(trainer, pl_module, ctx)`` on every callback that has it."""
    callbacks = [cb for cb in trainer.callbacks if callable(getattr(cb, hook, None))]
    for cb in sorted(callbacks, key=lambda cb: getattr(cb, "block_hook_order", 100)):
        getattr(cb, hook)(trainer, pl_module, ctx)


def quantizes_layer(trainer):
    """``quantizes(full_layer_name) -> bool``: every ``BlockHooks`` callback agrees that layer is quantized."""
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, BlockHooks)]
    return lambda name: all(cb.quantizes(name) for cb in callbacks)


def run_report(trainer) -> dict:
    """Every ``BlockHooks`` callback's ``report()``, merged in hook order."""
    report: dict = {}
    for cb in sorted((cb for cb in trainer.callbacks if isinstance(cb, BlockHooks)), key=lambda cb: cb.block_hook_order):
        report.update(cb.report())
    return report

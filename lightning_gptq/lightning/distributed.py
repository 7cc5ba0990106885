"""Calibration across processes: Lightning's DDP launch and process group, without the DDP wrapper.

``--trainer.strategy=gptq_ddp`` (or ``gptq_ddp_spawn``) with ``--trainer.devices=N`` /
``--trainer.num_nodes=M`` runs one process per device:

- each rank calibrates on its own share of the windows (``WindowShards``: window ``i`` goes to rank
  ``i mod world_size``, each window exactly once, no padding) and keeps only that share's
  activation cache;
- before each solve, ``HessianCapture`` all-reduces every layer's ``Σ xxᵀ`` (in fp64) and sample
  count, so every rank holds the Hessian of all windows;
- every rank then solves the same problem on the same software, and ``GPTQCallback`` checks that
  the ranks' quantized layers agree (a checksum per block) instead of broadcasting them;
- a decision a rank takes on its own windows (is input scaling an exact rewrite of this block?) is
  taken by all together (``all_agree``: made only where every rank's check holds).

Why not Lightning's ``ddp``: ``DistributedDataParallel`` exists to average gradients, and
calibration computes none; it refuses a module without trainable parameters, and putting the
Hugging Face model in the module tree to please it would have DDP broadcast and move the whole
model at start-up. ``CalibrationDDPStrategy`` keeps everything else of ``DDPStrategy`` (launchers,
cluster environments, process group, ``reduce``/``all_gather``/``barrier``).
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.utils.data import DistributedSampler

__all__ = ["CalibrationDDPStrategy", "WindowShards", "all_agree", "all_reduce_sum", "without_padding", "world_size"]


class CalibrationDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves the LightningModule unwrapped (see the module docstring)."""

    def configure_ddp(self) -> None:
        pass  # no DistributedDataParallel: there are no gradients to synchronise

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in (("gptq_ddp", "popen"), ("gptq_ddp_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"GPTQ calibration across processes (start method {start_method!r})",
                    start_method=start_method,
                )


CalibrationDDPStrategy.register_strategies(StrategyRegistry)


class WindowShards(DistributedSampler):
    """Rank ``r`` of ``W`` takes items ``r, r + W, r + 2W, ...`` in order: every item exactly once over
    the ranks (``DistributedSampler`` pads with repeats, which would count windows twice). Ranks with
    one item fewer get ``-1`` (``PAD``) at the end instead, so every rank runs the same number of steps
    (Lightning's loop holds a collective per step: unequal step counts would hang); the module skips it.
    """

    PAD = -1

    def __init__(self, dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [self.PAD] * (len(self) - len(own)))

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.num_replicas)


def without_padding(batch: dict) -> torch.Tensor:
    """A batch's ``input_ids`` without ``WindowShards``' padding rows (``index`` -1): maybe none."""
    ids, index = batch["input_ids"], batch.get("index")
    return ids if index is None or not bool((index < 0).any()) else ids[index >= 0]


def world_size(trainer) -> int:
    return 1 if trainer is None else int(getattr(trainer, "world_size", 1) or 1)


def all_reduce_sum(trainer, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (every rank gets the same result)."""
    return trainer.strategy.reduce(tensor, reduce_op="sum")


def all_agree(trainer) -> Callable[[bool], bool] | None:
    """None on one process; else a collective every process calls with its own verdict: True where all are
    (a decision each rank takes on its own windows, made once for all)."""
    if world_size(trainer) <= 1:
        return None

    def agree(verdict: bool) -> bool:
        votes = torch.tensor(float(bool(verdict)), dtype=torch.float64, device=trainer.strategy.root_device)
        return int(all_reduce_sum(trainer, votes).item()) == world_size(trainer)
    return agree

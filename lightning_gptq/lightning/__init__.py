"""Lightning glue: the calibration module, data module, callbacks and metric."""

from .callbacks import GPTQCallback, HessianCapture, LayerRecord
from .datamodule import CalibrationDataModule
from .distributed import CalibrationDDPStrategy, WindowShards
from .generation import CompletionWriter, Generation
from .gguf import GGUFExport
from .hooks import BlockContext, BlockHooks, fire_block_hook
from .metrics import ProtocolPerplexity
from .module import GPTQModule
from .resume import BlockCheckpoint, ResumeError

__all__ = [
    "BlockCheckpoint",
    "BlockContext",
    "BlockHooks",
    "CalibrationDDPStrategy",
    "CalibrationDataModule",
    "CompletionWriter",
    "GGUFExport",
    "Generation",
    "GPTQCallback",
    "GPTQModule",
    "HessianCapture",
    "LayerRecord",
    "ProtocolPerplexity",
    "ResumeError",
    "WindowShards",
    "fire_block_hook",
]

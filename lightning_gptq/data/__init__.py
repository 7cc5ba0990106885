"""Calibration windows and perplexity evaluation (GPTQ-REFERENCE.md §2-§3)."""

from lightning_gptq.data.calibration import CALIBRATION_SOURCES, calibration_windows, mixed_calibration_windows
from lightning_gptq.data.evaluation import (
    EVAL_DATASETS,
    PerplexityResult,
    eval_tokens,
    own_eval_tokens,
    perplexity,
    perplexity_blockwise,
    window_nll,
)
from lightning_gptq.data.text import CalibrationDataError, DatasetUnavailableError

__all__ = [
    "CALIBRATION_SOURCES",
    "EVAL_DATASETS",
    "CalibrationDataError",
    "DatasetUnavailableError",
    "PerplexityResult",
    "calibration_windows",
    "mixed_calibration_windows",
    "eval_tokens",
    "own_eval_tokens",
    "perplexity",
    "perplexity_blockwise",
    "window_nll",
]

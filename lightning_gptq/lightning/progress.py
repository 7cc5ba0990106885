"""The progress bar names the calibration stage it is in ("block 3/30: calibrate") instead of "Epoch N"."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def describe_progress(bar, text: str) -> None:
    """Name the current stage on the progress bar instead of "Epoch N"."""
    if isinstance(bar, TQDMProgressBar) and bar.train_progress_bar is not None:
        bar.train_progress_bar.set_description(text)
    elif isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
        bar.progress.update(bar.train_progress_bar_id, description=text)

"""Where a save writes: a staging folder beside the target (``<folder>.partial``), renamed over it once complete.

The target is replaced, so it may only be absent, empty, or a quantized checkpoint (a GPTQ, compressed-tensors
or interim folder, ours or another tool's): a save never deletes a folder of other files a user pointed it at. Of a
checkpoint it replaces, what a save writes (weights, configs, tokenizer) goes; other files a user put there (a model
card, a licence, notes) are moved into the new one, unless it has a file of that name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from .gptq_format import CheckpointError

log = logging.getLogger("lightning_gptq")

# what a checkpoint save (ours or another tool's) writes: replaced with the checkpoint, never carried over
WRITTEN_BY_A_SAVE = re.compile(
    r".*\.(safetensors|bin|pt|pth|gguf|index\.json|sha256)|(generation_|quantize_|quant_)?config\.json"
    r"|lightning_gptq\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|chat_template\..*|recipe\.yaml")


def why_not_writable(folder: str | os.PathLike) -> str | None:
    """Why a save may not write ``folder`` (``None``: it may): a file stands there, the folder holds files that are
    not a quantized checkpoint, or its parent cannot be written (the staging folder and the rename go there)."""
    folder = Path(os.path.abspath(os.path.expanduser(folder)))
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    from lightning_gptq.checkpoint import is_quantized_checkpoint  # (the package imports this module)

    if folder.is_dir() and not is_quantized_checkpoint(folder):
        others = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        if others:
            shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
            return (f"{folder} holds files that are not a quantized checkpoint ({shown}); a save replaces the whole "
                    "folder: choose another one, or empty it")
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {folder} cannot be made"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write in {ancestor} (for {folder})"
    return None


def staging_for(folder: Path) -> Path:
    """An empty ``<folder>.partial`` to write into (``publish`` renames it): a killed save never leaves a half folder.
    ``CheckpointError`` first when ``folder`` may not be written (``why_not_writable``)."""
    if (why := why_not_writable(folder)) is not None:
        raise CheckpointError(why)
    staging = folder.with_name(folder.name + ".partial")
    # a publish that stopped between moving a user's files in and renaming: those files are not ours to delete
    left = sorted(p.name for p in staging.iterdir()
                  if not WRITTEN_BY_A_SAVE.fullmatch(p.name)) if staging.is_dir() else []
    if left:
        raise CheckpointError(f"{staging} (an unfinished save) holds {', '.join(left)}, which no save writes: move them "
                              f"to {folder} (or elsewhere) and delete {staging}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, folder: Path) -> Path:
    """Rename the complete ``staging`` to ``folder``, replacing a checkpoint there (checked again: files may have
    appeared in it while the save ran; then the new checkpoint stays in ``staging``). The replaced checkpoint's files
    that no save writes (``WRITTEN_BY_A_SAVE``) and ``staging`` lacks are moved into it first."""
    if (why := why_not_writable(folder)) is not None:
        raise CheckpointError(f"{why} (the checkpoint was written to {staging})")
    if folder.exists():
        kept = sorted(p.name for p in folder.iterdir()
                      if not WRITTEN_BY_A_SAVE.fullmatch(p.name) and not (staging / p.name).exists())
        for name in kept:
            os.replace(folder / name, staging / name)
        if kept:
            log.info("kept %s from the checkpoint replaced in %s", ", ".join(kept), folder)
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return folder

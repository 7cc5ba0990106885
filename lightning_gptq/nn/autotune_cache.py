"""``auto``'s timings kept on disk, so that loading a model on a machine that has timed its layers before
does not time them again (SmolLM2: about 14 s of a load on the AVX2 EPYC).

One JSON file per machine fingerprint, ``$LIGHTNING_GPTQ_CACHE/autotune/<fingerprint>.json``. The
fingerprint covers what decides which kernel is fastest: the CPU's model and instruction-set flags (and
the GPU's name for CUDA layers), the thread count, torch's version, and the source of our kernels and
backends, so another machine, a changed kernel or another thread count times again. Inside a file each
entry is one layer spec, the backend asked for, and the candidate backends and kernels it was chosen from.

``LIGHTNING_GPTQ_AUTOTUNE_CACHE=0`` turns the cache off; deleting the folder makes everything be timed again.
An unreadable file or entry is reported once and timed again, never trusted.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger("lightning_gptq")

ENV = "LIGHTNING_GPTQ_AUTOTUNE_CACHE"
_files: dict[Path, dict] = {}  # what each file held when first read, plus what this process added
_warned: set[str] = set()


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def source_files() -> list[Path]:
    """Our kernels' and backends' source files (the kernels may live outside the package: an editable install
    maps ``lightning_gptq.kernels`` to the repository's ``kernels/``)."""
    from lightning_gptq import kernels

    folders = [Path(kernels.__file__).resolve().parent, Path(__file__).resolve().parent]
    return sorted(f for folder in folders for f in [*folder.glob("*.py"), *folder.glob("*.cpp")])


@functools.cache
def _sources() -> str:
    """A digest of the kernels' and backends' source: a change to either may change which kernel wins."""
    from lightning_gptq._hub import short_hash

    return short_hash(*[(f.name, f.read_bytes()) for f in source_files()])


@functools.cache
def _cpu() -> tuple[str, str]:
    model = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """This machine's CPU model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    return _cpu()[0]


def fingerprint(device: str) -> str:
    """The machine, as far as kernel speed goes (see the module docstring)."""
    from lightning_gptq._hub import short_hash

    parts = [*_cpu(), torch.__version__, torch.get_num_threads(), _sources()]
    if device == "cuda" and torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.version.cuda]
        try:
            import triton

            parts.append(triton.__version__)
        except ImportError:
            pass
    return short_hash(device, *parts)


def path(device: str) -> Path:
    from lightning_gptq._hub import cache_root

    return cache_root() / "autotune" / f"{fingerprint(device)}.json"


def entry_key(spec_dict: dict, backend: str, candidates: dict[str, tuple[str, ...]]) -> str:
    return json.dumps({"spec": spec_dict, "backend": backend, "candidates": {k: list(v) for k, v in
                                                                            sorted(candidates.items())}}, sort_keys=True)


def _read(file: Path) -> dict:
    if file not in _files:
        entries: dict = {}
        if file.exists():
            try:
                entries = json.loads(file.read_text())
                if not isinstance(entries, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as error:
                log.warning("auto: ignoring the unreadable timing cache %s (%s); timing again", file, error)
                entries = {}
        _files[file] = entries
    return _files[file]


def _file(device: str) -> Path | None:
    """This machine's file, or None when the cache is off or its folder cannot be made (reported)."""
    if not enabled():
        return None
    try:
        return path(device)
    except OSError as error:  # e.g. a read-only home: time in memory only
        if str(error) not in _warned:
            _warned.add(str(error))
            log.warning("auto: no timing cache (%s); layers are timed in every process", error)
        return None


def lookup(device: str, key: str) -> dict | None:
    """The stored record for ``key`` on this machine, or None (cache off, nothing stored)."""
    file = _file(device)
    return None if file is None else _read(file).get(key)


def forget(device: str, key: str, why: str) -> None:
    """Drop a stored record that cannot be used (it is timed again and replaced)."""
    file = _file(device)
    if file is not None:
        log.warning("auto: a stored timing in %s cannot be used (%s); timing again", file, why)
        _read(file).pop(key, None)


def store(device: str, key: str, record: dict) -> None:
    """Add ``record`` to this machine's file: merged with what another process may have written since, then
    written whole to a temporary file and renamed over it, so a reader never sees half a file."""
    file = _file(device)
    if file is None:
        return
    entries = _read(file)
    entries[key] = record
    try:
        on_disk = json.loads(file.read_text()) if file.exists() else {}
    except (OSError, ValueError):  # unreadable (reported when read): replaced by what this process holds
        on_disk = {}
    merged = {**(on_disk if isinstance(on_disk, dict) else {}), **entries}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(temporary, file)
    except OSError as error:
        log.warning("auto: could not write the timing cache %s (%s); the timing is kept for this process only",
                    file, error)

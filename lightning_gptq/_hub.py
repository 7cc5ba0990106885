"""Shared helpers for the on-disk cache and for failing fast when the Hugging Face hub is unreachable.

`huggingface_hub` retries a failed connection with back-off (about 25 s before it gives up), and
`datasets` does so once per file it probes. A two-second connection probe up front lets the
loaders fail in a second with our own message instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}
_PROBE_TIMEOUT_S = 2.0
_PROBE_TTL_S = 60.0
_probe_cache: dict[str, tuple[float, bool]] = {}


def cache_root() -> Path:
    """The project's cache folder: `$LIGHTNING_GPTQ_CACHE`, else `~/.cache/lightning_gptq` (created)."""
    root = os.environ.get("LIGHTNING_GPTQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_gptq")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def short_hash(*parts: object, length: int = 16) -> str:
    """A hex digest of the `repr` of `parts`, for cache keys."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def hub_offline() -> bool:
    """Whether the user switched the hub off (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE`, `HF_DATASETS_OFFLINE`)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in names):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False


def hub_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable() -> bool:
    """False when offline mode is on or a TCP connection to the hub endpoint fails within 2 s.

    Behind an HTTP(S) proxy a direct probe says nothing, so the hub is then assumed reachable and
    the libraries' own error handling applies. The answer is remembered for a minute.
    """
    if hub_offline():
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    key = f"{host}:{port}"
    cached = _probe_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_TTL_S:
        return cached[1]
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            reachable = True
    except OSError:
        reachable = False
    _probe_cache[key] = (time.monotonic(), reachable)
    return reachable


@contextlib.contextmanager
def forced_offline():
    """Switch `huggingface_hub` and `datasets` to offline mode for the block.

    Used when the hub is unreachable, so that copies already in the HF cache still load, and
    anything else fails at once instead of after the libraries' retries.
    """
    from huggingface_hub import constants

    saved_hub = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    datasets_config = None
    try:
        import datasets.config as datasets_config

        saved_datasets = datasets_config.HF_HUB_OFFLINE
        datasets_config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets_config = None
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_hub
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved_datasets


@contextlib.contextmanager
def hub_access():
    """Run hub-using code as is when the hub answers, in forced offline mode when it does not."""
    if hub_reachable():
        yield
    else:
        with forced_offline():
            yield

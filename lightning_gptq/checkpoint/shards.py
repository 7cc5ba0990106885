"""safetensors files, one or sharded with an index, with a sha256 per file (safetensors has no checksum)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .gptq_format import CheckpointError

PATTERN = "model{suffix}.safetensors"  # huggingface_hub's suffix: "" or "-00001-of-00003"
SINGLE = PATTERN.format(suffix="")
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"4GB"``, ``"500MiB"``, ``1000000`` → bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive size like '4GB' or '500MiB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# safetensors' dtype names and torch's
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
_CHUNK = 1 << 24  # bytes per read/write when streaming a tensor


def read_header(path: Path) -> tuple[dict, int]:
    """``(header, data start)`` of a safetensors file: ``header[name] = {dtype, shape, data_offsets}``."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _bytes_of(tensor: Tensor) -> memoryview:
    """The tensor's bytes without a copy (contiguous CPU tensors of any dtype, bf16 included)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], object]],
                   metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: ``entries`` are ``(name, dtype, shape, chunks)`` with
    ``chunks()`` yielding the tensor's bytes in order (so no tensor, let alone the file, need be in
    memory whole). The layout is the format's: 8-byte header length, JSON header, then the data."""
    header, offset = {}, 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, _, _, chunks in entries:
            written = 0
            for chunk in chunks():
                f.write(chunk)
                written += len(chunk)
            start, end = header[name]["data_offsets"]
            if written != end - start:
                raise RuntimeError(f"{path}: {name} wrote {written} bytes, expected {end - start}")


def _own_storage(tensor: Tensor) -> Tensor:
    """``tensor``, or a contiguous copy when it is a view into a larger storage: huggingface_hub sizes a tensor
    by its storage and keeps tensors sharing one together, which would misjudge views."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """``safetensors`` ``save_file``, readable as the process's other files are: safetensors 0.8 writes through a
    private (0600) temporary file, so a server running as another user could not read the weights."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    make_readable(path)


def make_readable(path: Path) -> None:
    """Give ``path`` the mode a new file gets under this process's umask (0644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write(tensors: dict[str, Tensor], folder: Path, max_shard_size: int | str) -> dict[str, str]:
    """Write ``tensors`` as ``model.safetensors``, or shards + index when larger than ``max_shard_size``.
    Returns ``{file name: sha256}``, which the index also records under ``metadata.sha256``.

    The split is ``huggingface_hub``'s: in key order, a new shard when the next tensor would pass the limit,
    a tensor larger than the limit in a shard of its own; files ``model-00001-of-0000N.safetensors``."""
    tensors = {name: _own_storage(t) for name, t in tensors.items()}
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=PATTERN, max_shard_size=parse_size(max_shard_size))
    digests = {}
    for file, names in split.filename_to_tensors.items():
        save_tensors({name: tensors[name] for name in names}, folder / file)
        digests[file] = sha256(folder / file)
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in tensors.values())  # bytes of tensor data, as before
        index = {"metadata": {"total_size": total, "sha256": digests}, "weight_map": dict(split.tensor_to_filename)}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    return digests


class Shards:
    """The safetensors files of a checkpoint folder, their headers read and checked, no data loaded.

    ``rename``: file tensor name -> the name used here (``names.model_names``); every mapping and method then
    speaks the model's names."""

    def __init__(self, folder: Path, rename: Callable[[str], str] | None = None):
        self.folder = folder
        self.index_sha256: dict[str, str] = {}
        if (folder / INDEX).is_file():
            try:
                index = json.loads((folder / INDEX).read_text())
                weight_map = index["weight_map"]
                self.index_sha256 = dict((index.get("metadata") or {}).get("sha256") or {})
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{folder / INDEX} is corrupt: {error}") from None
            self.files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).is_file():
            self.files, weight_map = [SINGLE], None
        elif len(others := sorted(p.name for p in folder.glob("*.safetensors"))) == 1:
            self.files, weight_map = others, None  # AutoGPTQ's own names, e.g. gptq_model-4bit-128g.safetensors
        else:
            found = f"several .safetensors files ({', '.join(others)}) and no index" if others else "no .safetensors file"
            raise CheckpointError(f"{folder} has no weights to load: neither {SINGLE} nor {INDEX}, and {found}")
        missing = [f for f in self.files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard file(s) {', '.join(missing)} named in {INDEX} are missing")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.file_of: dict[str, str] = {}
        for file in self.files:
            try:
                with safe_open(str(folder / file), "pt") as f:
                    for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                        piece = f.get_slice(name)
                        self.shapes[name], self.dtypes[name] = tuple(piece.get_shape()), piece.get_dtype()
                        self.file_of[name] = file
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(f"{folder / file} is not a readable safetensors file (truncated or corrupt?): "
                                      f"{error}") from None
        if weight_map is not None:
            wrong = [n for n, f in weight_map.items() if self.file_of.get(n) != f]
            if wrong:
                raise CheckpointError(f"{folder / INDEX} places {len(wrong)} tensors in files that do not hold them, "
                                      f"e.g. {wrong[0]!r} in {weight_map[wrong[0]]}")
        self._stored: dict[str, str] = {}  # name here -> name in the file, where they differ
        if rename is not None:
            for stored in list(self.shapes):
                name = rename(stored)
                if name != stored:
                    if name in self.shapes:
                        raise CheckpointError(f"{folder}: {stored!r} and {name!r} are the same tensor spelt two ways")
                    self._stored[name] = stored
                    for table in (self.shapes, self.dtypes, self.file_of):
                        table[name] = table.pop(stored)
        self._open: dict[str, object] = {}

    def verify(self, expected: dict[str, str]) -> None:
        """Compare each file's sha256 with ``expected`` (file → hex digest)."""
        for file in self.files:
            if file not in expected:
                raise CheckpointError(f"{self.folder / file}: no sha256 recorded for it (the checkpoint's file list "
                                      f"does not match its record)")
            if sha256(self.folder / file) != expected[file]:
                raise CheckpointError(f"{self.folder / file} is corrupt: its sha256 differs from the one recorded when "
                                      f"it was written (pass verify=False to load it anyway)")

    def get(self, name: str) -> Tensor:
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), "pt")
        try:
            return self._open[file].get_tensor(self._stored.get(name, name))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{self.folder / file}: tensor {name!r} could not be read: {error}") from None

    def close(self) -> None:
        self._open.clear()

    def _locate(self, name: str) -> tuple[Path, dict, int]:
        file = self.file_of[name]
        if not hasattr(self, "_headers"):
            self._headers: dict[str, tuple[dict, int]] = {}
        if file not in self._headers:
            self._headers[file] = read_header(self.folder / file)
        header, start = self._headers[file]
        return self.folder / file, header[self._stored.get(name, name)], start

    def read(self, name: str) -> Tensor:
        """``name`` read with plain file I/O into a new tensor: unlike ``get`` (a memory map), the pages
        read are not counted in this process's resident memory, and nothing else is kept."""
        path, entry, start = self._locate(name)
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        view = _bytes_of(tensor) if tensor.numel() else memoryview(b"")
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(view) != end - begin:
                raise CheckpointError(f"{path}: tensor {name!r} is cut short (file truncated?)")
        return tensor

    def chunks(self, name: str, dtype: torch.dtype | None = None):
        """``name``'s bytes in pieces of about 16 MB, converted to ``dtype`` on the way when given."""
        path, entry, start = self._locate(name)
        source = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        item = torch.empty((), dtype=source).element_size()
        step = max(item, _CHUNK // item * item)
        with open(path, "rb") as f:
            f.seek(start + begin)
            remaining = end - begin
            while remaining:
                piece = bytearray(f.read(min(step, remaining)))
                if not piece:
                    raise CheckpointError(f"{path}: tensor {name!r} is cut short (file truncated?)")
                remaining -= len(piece)
                if dtype is None or dtype == source:
                    yield bytes(piece)
                else:
                    values = torch.frombuffer(piece, dtype=source).to(dtype)
                    yield _bytes_of(values).tobytes()

    def dtype_of(self, name: str) -> torch.dtype:
        return _DTYPES[self._locate(name)[1]["dtype"]]

    @property
    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


def dtype_of(code: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(code, torch.float32)

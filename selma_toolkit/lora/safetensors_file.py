"""Reading safetensors files defensively: pickles refused, headers checked against the file size.

safetensors validates files too, but its errors name neither the file nor the fault in words a
user can act on ("incomplete metadata, file not fully covered"); the checks here do: the header
against the file's size before the data is touched, and safetensors' rule that the tensors'
offsets tile the data exactly before any tensor is returned.

A file is mapped once, copy-on-write, and its tensors are views into the mapping (little-endian
hosts; elsewhere safetensors' own reader), as safetensors' ``load_file`` does; the sha256 a merge
records is computed from the same mapped bytes (:func:`read_safetensors_with_sha256`, or later,
on another thread, :func:`read_safetensors_hashing_later`) instead of reading the file a second
time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import sha256_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file, after checking its header against its
    size, so that a broken file gets a message that says what is wrong with it."""
    tensors, metadata, _ = read_safetensors_hashing_later(path)
    return tensors, metadata


def read_safetensors_with_sha256(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """As :func:`read_safetensors`, plus the hex sha256 of the file's bytes, hashed from the buffer
    the tensors are read from (equal to ``selma_toolkit.io.sha256_file(path)``, one read instead of two)."""
    tensors, metadata, sha256 = read_safetensors_hashing_later(path)
    return tensors, metadata, sha256()


def read_safetensors_hashing_later(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, str], Callable[[], str]]:
    """As :func:`read_safetensors_with_sha256`, with the sha256 as a function that hashes the same mapped
    bytes when called: another thread can hash while this one uses the tensors (hashlib releases the
    GIL on large buffers), as ``merge_files`` does while the merge runs."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: {path.suffix} files are Python pickles and loading one can run arbitrary code, so "
            "selma-toolkit reads LoRAs only from .safetensors. Ask the author for a .safetensors file, or "
            "convert it once with a tool you trust"
        )
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file; expected a LoRA .safetensors file")
    header, metadata, header_size = _check_header(path)
    if sys.byteorder != "little":  # safetensors stores little-endian values and byte-swaps for such hosts
        return _read_with_safetensors(path), metadata, lambda: sha256_file(path)
    try:
        data = _map_whole(path)
    except (OSError, RuntimeError) as exc:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return (
        _tensors_from_buffer(path, data, header, 8 + header_size),
        metadata,
        lambda: hashlib.sha256(memoryview(data.numpy())).hexdigest(),
    )


def _map_whole(path: Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor [size], mapped copy-on-write (torch.from_file, shared=False:
    pages come from the page cache as they are touched, writes stay private, no descriptor is kept),
    as safetensors' own ``load_file`` maps a file."""
    size = path.stat().st_size
    return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)


def _tensors_from_buffer(
    path: Path, data: torch.Tensor, header: dict[str, Any], data_start: int
) -> dict[str, torch.Tensor]:
    """The header's tensors as views into ``data`` (uint8 [file size]), in the order of their data
    (as safetensors' ``load_file`` returns them); offsets must tile the data exactly, as
    safetensors requires."""
    entries = sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"]))
    data_size = data.numel() - data_start
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for key, entry in entries:
        begin, end = entry["data_offsets"]
        if begin != position:
            raise LoraFormatError(
                f"{path}: not a readable safetensors file: the data of tensor {key!r} starts at byte {begin} but the "
                f"tensors before it end at {position} ({'overlapping' if begin < position else 'a gap between'} "
                "tensors); the file is damaged"
            )
        position = end
        dtype, shape = _TORCH_DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
        raw = data[data_start + begin : data_start + end]
        if end == begin:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif (data_start + begin) % dtype.itemsize:  # an unaligned view is refused: copy it aligned
            tensors[key] = raw.clone().view(dtype).reshape(shape)
        else:
            tensors[key] = raw.view(dtype).reshape(shape)
    if position != data_size:
        raise LoraFormatError(
            f"{path}: not a readable safetensors file: {data_size - position} bytes after the last tensor's data "
            "belong to no tensor (the header does not cover the file); the file is damaged"
        )
    return tensors


def _read_with_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({exc})") from None


def _check_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """The tensor entries of the header, its ``__metadata__`` and its length, checked against the
    file's size (only the header is read)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        # A safetensors header is JSON right after its 8-byte length; torch.save writes a zip
        # ("PK\x03\x04") or a pickle (0x80, protocol 2-5).
        looks_pickled = head[:4] == b"PK\x03\x04" or (
            head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
        )
        if head[8:9] != b"{" and looks_pickled:
            raise LoraFormatError(
                f"{path}: this is a PyTorch pickle/zip file named {path.suffix}, not safetensors; it is "
                "refused because unpickling can run arbitrary code"
            )
        if len(head) < 9:
            raise LoraFormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated or empty)")
        (header_size,) = struct.unpack("<Q", head[:8])
        handle.seek(8)
        if header_size > min(size - 8, _MAX_HEADER_BYTES):
            raise LoraFormatError(
                f"{path}: not a safetensors file, or truncated: its first 8 bytes announce a {header_size}-byte "
                f"header but the file has {size} bytes"
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraFormatError(
            f"{path}: the safetensors header is not valid JSON; the file is damaged or not safetensors"
        ) from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise LoraFormatError(f"{path}: the safetensors __metadata__ is not a JSON object of strings")
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise LoraFormatError(f"{path}: __metadata__ values must be strings; {bad[0]!r} is not")
    data_size = size - 8 - header_size
    needed = 0
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int)):
                raise TypeError(entry)
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            expected = count * _DTYPE_SIZES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraFormatError(f"{path}: header entry for tensor {key!r} is malformed ({entry!r})") from None
        if end - begin != expected or begin < 0:
            raise LoraFormatError(
                f"{path}: header lies about tensor {key!r}: shape {entry['shape']} of {entry['dtype']} needs "
                f"{expected} bytes but its offsets span {end - begin}; the file is damaged"
            )
        needed = max(needed, end)
    if needed > data_size:
        raise LoraFormatError(
            f"{path}: truncated: the header needs {needed} bytes of tensor data but only {data_size} follow "
            "(an interrupted download or copy?); fetch the file again"
        )
    return header, dict(metadata), header_size


def safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """The tensor entries of a safetensors file's header (``dtype``, ``shape``, ``data_offsets``),
    its ``__metadata__`` and the byte where the tensor data starts, checked against the file's
    size as :func:`read_safetensors` checks it; no tensor is read."""
    header, metadata, header_size = _check_header(Path(path))
    return header, metadata, 8 + header_size


def read_tensor(handle: BinaryIO, entry: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor of an open safetensors file, by its header ``entry``, read with positioned reads
    into memory of its own.

    Not safetensors' ``safe_open``: it maps the whole file, and every page a tensor is read from
    stays resident in the process until the file is closed (reading all tensors of a 1 GB file
    that way peaks at about 1.3 GB RSS, against 0.3 GB for positioned reads); a model extraction
    reads two models of several GB tensor by tensor and should hold about one tensor pair."""
    begin, end = entry["data_offsets"]
    dtype = _TORCH_DTYPES[entry["dtype"]]
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    while done < len(view):  # a positioned read may return less than asked (above 2 GB on Linux)
        count = os.preadv(handle.fileno(), [view[done:]], data_start + begin + done)
        if count == 0:
            raise LoraFormatError(f"{handle.name}: ends inside a tensor's data; it was truncated or changed while read")
        done += count
    if sys.byteorder != "little" and dtype.itemsize > 1:  # stored little-endian: reverse each value's bytes
        buffer = buffer.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
    return buffer.view(dtype).reshape([int(d) for d in entry["shape"]])

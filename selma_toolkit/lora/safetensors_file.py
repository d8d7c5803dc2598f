"""Reading safetensors files defensively: pickles refused, headers checked against the file size.

safetensors validates files too, but its errors name neither the file nor the fault in words a
user can act on ("incomplete metadata, file not fully covered"); the checks here do, before the
library reads the tensors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from selma_toolkit.errors import LoraFormatError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a safetensors file, after checking its header against its
    size, so that a broken file gets a message that says what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path}: {path.suffix} files are Python pickles and loading one can run arbitrary code, so "
            "selma-toolkit reads LoRAs only from .safetensors. Ask the author for a .safetensors file, or "
            "convert it once with a tool you trust"
        )
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such file; expected a LoRA .safetensors file")
    _check_header(path)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        # A safetensors header is JSON right after its 8-byte length; torch.save writes a zip
        # ("PK\x03\x04") or a pickle (0x80, protocol 2-5).
        looks_pickled = head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
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
        raise LoraFormatError(f"{path}: the safetensors header is not valid JSON; the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise LoraFormatError(f"{path}: __metadata__ values must be strings; {bad[0]!r} is not")
    data_size = size - 8 - header_size
    needed = 0
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
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

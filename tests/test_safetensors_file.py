"""selma_toolkit.lora.safetensors_file: one mapping per file, tensors as views, sha256 from the same bytes.

The reference is safetensors' own ``load_file`` and ``selma_toolkit.io.sha256_file``; the broken
files that must be refused in words are in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora.safetensors_file import read_safetensors, read_safetensors_with_sha256

TENSORS = {
    "half": torch.randn(3, 5).half(),
    "double": torch.randn(7, dtype=torch.float64),
    "scalar": torch.tensor(2.0),
    "empty": torch.zeros(0, 4),
    "bytes": torch.arange(5, dtype=torch.uint8),
    "bf16_conv": torch.randn(2, 3, 1, 1).bfloat16(),
    "flags": torch.tensor([True, False]),
    "long": torch.arange(3, dtype=torch.int64),
}


def with_header(path: Path, out: Path, edit, *, odd: bool = False) -> Path:
    """``path`` with its JSON header edited by ``edit(header) -> header``; ``odd``: padded so that the
    tensor data starts at an odd byte (safetensors itself pads to 8)."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    encoded = json.dumps(edit(json.loads(raw[8 : 8 + size]))).encode()
    if odd and len(encoded) % 2 == 0:
        encoded += b" "
    out.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])
    return out


def test_read_gives_what_safetensors_load_file_gives_for_every_dtype_in_the_same_order(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path), metadata={"selma.skill": "count"})
    tensors, metadata = read_safetensors(path)
    reference = load_file(path)
    assert list(tensors) == list(reference) and metadata == {"selma.skill": "count"}
    for key, value in reference.items():
        assert (
            tensors[key].dtype == value.dtype and tensors[key].shape == value.shape and torch.equal(tensors[key], value)
        ), key


def test_unaligned_tensor_data_is_read_exactly(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path))
    odd = with_header(path, tmp_path / "odd.safetensors", lambda header: header, odd=True)
    assert (8 + struct.unpack("<Q", odd.read_bytes()[:8])[0]) % 2 == 1  # no tensor wider than a byte is aligned
    tensors, _ = read_safetensors(odd)
    for key, value in TENSORS.items():
        assert torch.equal(tensors[key], value), key


def test_sha256_comes_from_the_bytes_read_and_equals_sha256_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path))
    tensors, _, digest = read_safetensors_with_sha256(path)
    assert digest == sha256_file(path) and torch.equal(tensors["half"], TENSORS["half"])


def test_tensors_read_are_writable_and_writing_them_leaves_the_file_alone(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(TENSORS, str(path))
    before = path.read_bytes()
    tensors, _ = read_safetensors(path)
    tensors["half"].add_(1)
    assert path.read_bytes() == before
    assert torch.equal(read_safetensors(path)[0]["half"], TENSORS["half"])


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            lambda h: {
                **h,
                "b": {**h["b"], "data_offsets": [h["a"]["data_offsets"][0], h["a"]["data_offsets"][0] + 8]},
            },
            "overlapping tensors",
        ),
        (lambda h: {"a": h["a"]}, "bytes after the last tensor's data belong to no tensor"),
    ],
)
def test_offsets_that_overlap_or_leave_bytes_over_are_refused_naming_the_file(tmp_path, edit, fragment):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(path))  # 8 bytes each
    broken = with_header(path, tmp_path / "broken.safetensors", edit)
    with pytest.raises(LoraFormatError, match=fragment) as raised:
        read_safetensors(broken)
    assert str(raised.value).startswith(f"{broken}: not a readable safetensors file")

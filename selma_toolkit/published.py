"""The real-size models of the families, from their published denoiser configs (``Family.published_denoiser``):
built on the meta device (names and shapes, no memory, nothing downloaded), and, for the DiT
families, a table of their layers that tells a LoRA's family from its module names and shapes.

* :func:`published_layer_shapes` ``(family)``: ``{canonical module name: weight shape}`` of every
  Linear and Conv2d of the real-size denoiser (the expert fit check of a real model, and this table).
* :func:`dit_layer_table`: per DiT family, its layer names with the block index written ``N``
  (``transformer_blocks.N.attn.to_q``) and their weight shapes, and how many blocks each block
  container has. It ships as ``published_layers.json`` beside this module, read without torch
  (``lora.metadata.guess_architecture`` runs inside ComfyUI); ``python -m selma_toolkit.published``
  writes it again from the configs, and tests/test_published.py checks that it is current.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES, Family

TABLE_FILE = Path(__file__).with_name("published_layers.json")


def published_layer_shapes(family: Family) -> dict[str, tuple[int, ...]]:
    """``{canonical module name: weight shape}`` of every Linear / Conv2d of the family's real-size
    denoiser, built from its published config on the meta device (once per process)."""
    return dict(_published_shapes(family.name))


@cache
def _published_shapes(name: str) -> dict[str, tuple[int, ...]]:
    import diffusers
    import torch

    family = FAMILIES[name]
    model_class = getattr(diffusers, family.denoiser_class)
    with torch.device("meta"):
        model = model_class.from_config(dict(family.published_denoiser))
    return {
        f"{family.denoiser}.{path}": tuple(int(d) for d in layer.weight.shape)
        for path, layer in model.named_modules()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
    }


def _pattern(family: Family, path: str) -> tuple[str, tuple[str, int] | None]:
    """A module path with its block index written N, and (container, index) when it is in a block."""
    for container in family.block_groups:
        match = re.match(rf"^{re.escape(container)}\.(\d+)\.", path)
        if match:
            return f"{container}.N.{path[match.end() :]}", (container, int(match.group(1)))
    return path, None


def build_dit_layer_table() -> dict[str, Any]:
    """The table :func:`dit_layer_table` reads, built from the published configs (needs diffusers)."""
    table: dict[str, Any] = {}
    for name in FAMILY_NAMES:
        family = FAMILIES[name]
        if family.denoiser == "unet":
            continue
        layers: dict[str, list[int]] = {}
        counts: dict[str, int] = {}
        for module, shape in published_layer_shapes(family).items():
            pattern, block = _pattern(family, module.split(".", 1)[1])
            layers.setdefault(pattern, list(shape))
            if block is not None:
                counts[block[0]] = max(counts.get(block[0], 0), block[1] + 1)
        table[name] = {"model": family.published_model, "counts": counts, "layers": dict(sorted(layers.items()))}
    return table


@cache
def dit_layer_table() -> dict[str, Any]:
    """The shipped table (module docstring): ``{family: {"model", "counts", "layers"}}``."""
    return json.loads(TABLE_FILE.read_text(encoding="utf-8"))


def dit_families_with(path: str, shape: tuple[int, ...] | None = None) -> set[str]:
    """The DiT families whose real-size denoiser has the module ``path`` (a transformer path without
    the component), within its block count, and, given ``shape``, with that weight shape."""
    found = set()
    for name, entry in dit_layer_table().items():
        pattern, block = _pattern(FAMILIES[name], path)
        if pattern not in entry["layers"] or (block is not None and block[1] >= entry["counts"].get(block[0], 0)):
            continue
        if shape is None or tuple(entry["layers"][pattern]) == tuple(shape):
            found.add(name)
    return found


if __name__ == "__main__":
    TABLE_FILE.write_text(json.dumps(build_dit_layer_table(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {TABLE_FILE}")

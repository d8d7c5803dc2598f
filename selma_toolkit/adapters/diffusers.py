"""Attach SELMA experts to a diffusers pipeline.

``load_experts`` merges the experts with :func:`selma_toolkit.lora.merge_experts` (never a formula
of its own) and loads the result as one diffusers adapter, optionally fused into the weights; or,
with ``method="runtime"``, loads every expert as its own adapter and weights them with
``set_adapters`` (the way the authors' script combines them), for comparison.

An expert is a LoRA file, or any reference ``selma_toolkit.hub.resolve_expert`` understands (a
catalog name, a Hub repo id), or a ``LoraWeights`` already in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from selma_toolkit.experts import resolve_expert_file
from selma_toolkit.lora import LoraModule, LoraWeights, load_lora, lora_to_state_dict, merge_experts, metadata_value
from selma_toolkit.lora.blocks import parse_block_weights
from selma_toolkit.lora.merge import MERGE_METHODS, apply_block_weights, expert_weights

logger = logging.getLogger(__name__)

ExpertRef = str | os.PathLike[str] | LoraWeights
AdapterMethod = Literal[(*MERGE_METHODS, "runtime")]  # type: ignore[valid-type]  # the merge methods, and runtime adapters


def read_expert(expert: ExpertRef, position: int = 0) -> tuple[str, LoraWeights]:
    """(a name for messages, the LoRA) for one expert reference.

    References become files in one place, ``selma_toolkit.experts``: local files as they are,
    catalog names and Hub repo ids downloaded.
    """
    if isinstance(expert, LoraWeights):
        return metadata_value(expert, "skill") or f"expert {position + 1}", expert

    path = resolve_expert_file(expert).path
    return path.name, load_lora(path)


def load_experts(
    pipe: Any,
    experts: Sequence[ExpertRef],
    method: AdapterMethod = "selma",
    weights: Sequence[float] | None = None,
    fuse: bool = False,
    adapter_name: str = "selma",
    *,
    rank: int | None = None,
    density: float = 0.5,
    seed: int = 0,
    normalize: bool = False,
    block_weights: Mapping[str, float] | str | None = None,
) -> list[str]:
    """Load ``experts`` into ``pipe`` (a diffusers SD 1.x / 2.x / XL pipeline); return the adapter names.

    ``method`` is a merge method of :func:`selma_toolkit.lora.merge_experts` (default: the paper's
    ``selma``), which gives one adapter called ``adapter_name``; or ``"runtime"``, which loads each
    expert as adapter ``{adapter_name}_{i}`` and activates them together with ``set_adapters`` and
    the weights (default 1/T: the same update as ``delta``, at T adapters' inference cost).
    ``fuse=True`` folds the active adapters into the model weights (``pipe.fuse_lora``).

    ``block_weights`` ({"in": 1, "mid": 0.5, "out": 1, "te": 0}, or the string
    ``"in=1,mid=0.5,out=1,te=0"``; groups in :mod:`selma_toolkit.lora.blocks`) multiply each
    module's merged update by its group's weight g: B_m <- g * B_m after the merge method's formula
    (:func:`selma_toolkit.lora.merge_experts`). With ``"runtime"``, each expert's B is scaled by g
    before loading (:func:`~selma_toolkit.lora.merge.apply_block_weights`), so set_adapters'
    sum_t w_t dW_t becomes g * sum_t w_t dW_t per module, the ``delta`` merge with the same block
    weights. (diffusers' own per-block ``set_adapters`` scales are not used: their groups and
    indices are another scheme.)
    """
    if isinstance(block_weights, str):
        block_weights = parse_block_weights(block_weights)
    named = [read_expert(expert, position) for position, expert in enumerate(experts)]
    names = [name for name, _ in named]
    loras = [lora for _, lora in named]
    if method == "runtime":
        effective = expert_weights(weights, len(loras), normalize=normalize, method="delta")
        adapter_names = [f"{adapter_name}_{i}" for i in range(len(loras))]
        for name, lora, adapter in zip(names, loras, adapter_names):
            logger.info("loading %s as adapter %s", name, adapter)
            pipe.load_lora_weights(_diffusers_tensors(apply_block_weights(lora, block_weights)), adapter_name=adapter)
        # Loading an adapter activates only that one: activate them all, with their weights, at the end.
        pipe.set_adapters(adapter_names, adapter_weights=effective)
    else:
        merged = merge_experts(
            loras,
            method,
            weights,
            rank,
            density=density,
            seed=seed,
            names=names,
            normalize=normalize,
            block_weights=block_weights,
        )
        adapter_names = [adapter_name]
        pipe.load_lora_weights(_diffusers_tensors(merged), adapter_name=adapter_name)
        pipe.set_adapters(adapter_names)
    if fuse:
        pipe.fuse_lora(adapter_names=adapter_names)
    return adapter_names


def _diffusers_tensors(lora: LoraWeights) -> dict[str, Any]:
    """The LoRA as a peft-layout state dict with each scale folded into B (alpha = rank), so the
    tensors alone say everything: diffusers reads a dict's alphas only from file metadata, and its
    kohya reader rejects text-encoder LoRAs without out_proj ("Could not automatically infer state
    dict type", diffusers 0.42)."""
    folded = {
        name: module
        if module.scale == 1.0
        else LoraModule(down=module.down, up=module.up * module.scale, alpha=float(module.rank))
        for name, module in lora.modules.items()
    }
    tensors, _ = lora_to_state_dict(LoraWeights(modules=folded, metadata=lora.metadata), "peft")
    return tensors

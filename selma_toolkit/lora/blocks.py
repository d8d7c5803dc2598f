"""Per-block merge weights (what kohya LoRA Block Weight and LoRA Power-Merger users set): which
block group a module belongs to, the ``in=1,mid=0.5,out=1,te=0`` spelling, and the check of a
mapping of them against the modules of a merge.

A block weight g multiplies one module's merged update after the merge method's formula (applied
by each formula of :mod:`selma_toolkit.lora.merging.formulas`, which
:func:`selma_toolkit.lora.merge.merge_experts` calls, the one place that computes merges):

    B_m <- g * B_m   [out, r_m],   A_m unchanged   =>   dW_m = g * (B_m @ A_m)   [out, in]

with g the weight of the module's most specific listed group, 1 where no group of it is listed.
g = 0 makes the module's update exactly zero; its keys stay in the file (B = 0), so that the merge
can still be extended exactly from its own factors (lora/incremental.py).

Groups (module names are the canonical diffusers names of :mod:`selma_toolkit.lora.core`), most
specific first:

=========================  ==========================================================
module                      groups
=========================  ==========================================================
``unet.down_blocks.N.*``    ``in.N``, ``in``, ``unet``  (LDM / kohya: input_blocks 3N+1 .. 3N+3)
``unet.mid_block.*``        ``mid``, ``unet``           (LDM: middle_block)
``unet.up_blocks.N.*``      ``out.N``, ``out``, ``unet`` (LDM: output_blocks 3N .. 3N+2)
other ``unet.*``            ``unet``  (conv_in, time / add embeddings, conv_out)
``text_encoder.*``          ``te1``, ``te``  (CLIP-L; SD 1.x / 2.x's only text encoder)
``text_encoder_2.*``        ``te2``, ``te``  (SDXL's OpenCLIP-G)
=========================  ==========================================================

Block indices are diffusers' (``down_blocks.N``: SD 1.x / 2.x have N = 0..3, SDXL 0..2). Needs no
torch: the scaling itself is done by the merge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from selma_toolkit.errors import LoraFormatError

BlockWeights = Mapping[str, float]
GROUP_NAMES: tuple[str, ...] = ("te", "te1", "te2", "unet", "in", "in.N", "mid", "out", "out.N")
EXAMPLE = "in=1,mid=0.5,out=1,te=0"
_GROUP = re.compile(r"^(te|te1|te2|unet|in|mid|out|(in|out)\.(0|[1-9][0-9]*))$")
_UNET_BLOCK = re.compile(r"^unet\.(down_blocks|up_blocks)\.(\d+)\.")
_BLOCK_GROUP = {"down_blocks": "in", "up_blocks": "out"}


def module_groups(module_name: str) -> tuple[str, ...]:
    """The block groups of a canonical module name, most specific first (see the module's table):
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ("in.1", "in", "unet")."""
    if module_name.startswith("text_encoder_2."):
        return ("te2", "te")
    if module_name.startswith("text_encoder."):
        return ("te1", "te")
    match = _UNET_BLOCK.match(module_name)
    if match:
        group = _BLOCK_GROUP[match.group(1)]
        return (f"{group}.{int(match.group(2))}", group, "unet")
    if module_name.startswith("unet.mid_block."):
        return ("mid", "unet")
    return ("unet",)


def module_block_weight(module_name: str, block_weights: BlockWeights | None) -> float:
    """g for one module: the weight of its most specific group in ``block_weights``, else 1."""
    if block_weights:
        for group in module_groups(module_name):
            if group in block_weights:
                return float(block_weights[group])
    return 1.0


def parse_block_weights(text: str | None) -> dict[str, float] | None:
    """``"in=1,mid=0.5,out=1,te=0"`` -> {"in": 1.0, "mid": 0.5, "out": 1.0, "te": 0.0}; None for an
    empty string. Pairs are GROUP=WEIGHT separated by commas (spaces ignored); each group once."""
    if text is None or not text.strip():
        return None
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        group, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not group or not value:
            raise LoraFormatError(
                f"block weights {text!r}: {item!r} is not GROUP=WEIGHT; expected pairs separated by commas, e.g. {EXAMPLE}"
            )
        try:
            number = float(value)
        except ValueError:
            raise LoraFormatError(f"block weights {text!r}: {value!r} (for {group}) is not a number; e.g. {EXAMPLE}") from None
        if group in weights:
            raise LoraFormatError(f"block weights {text!r}: group {group!r} is given twice; give each group once")
        weights[group] = number
    return check_block_weights(weights)


def check_block_weights(block_weights: BlockWeights | None, module_names: Iterable[str] | None = None
                        ) -> dict[str, float] | None:
    """``block_weights`` checked (group names, finite numbers) and copied as {group: float}; None for
    none. Raises :class:`LoraFormatError` naming an unknown group and listing the valid ones (and,
    given ``module_names``, the groups those modules are in)."""
    if not block_weights:
        return None
    present = sorted({g for name in module_names for g in module_groups(name)}, key=_group_order) if module_names is not None else None
    checked: dict[str, float] = {}
    for group, value in block_weights.items():
        if not isinstance(group, str) or not _GROUP.match(group):
            adapted = f"; the experts' modules are in {', '.join(present)}" if present else ""
            raise LoraFormatError(
                f"block weight group {group!r} is not a group; valid groups: {', '.join(GROUP_NAMES)} "
                f"(N: a diffusers block index, e.g. in.0 for down_blocks.0){adapted}. E.g. {EXAMPLE}"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LoraFormatError(f"block weight {group}={value!r}: expected a number") from None
        if not math.isfinite(number):
            raise LoraFormatError(f"block weight {group}={value!r}: expected a finite number")
        checked[group] = number
    return checked


def unused_groups(block_weights: BlockWeights, module_names: Iterable[str]) -> list[str]:
    """The listed groups that no module is in (a preset for another model, or a typo such as out.9)."""
    present = {g for name in module_names for g in module_groups(name)}
    return [group for group in block_weights if group not in present]


def _group_order(group: str) -> tuple[int, int]:
    head, _, index = group.partition(".")
    order = ("te", "te1", "te2", "unet", "in", "mid", "out")
    return order.index(head), int(index) if index else -1

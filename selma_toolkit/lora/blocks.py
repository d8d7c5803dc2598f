"""Per-block merge weights (what kohya LoRA Block Weight, the ComfyUI Inspire pack's LoRA Block
Weight and LoRA Power-Merger users set): which block group a module belongs to, the
``in=1,mid=0.5,out=1,te=0`` spelling, Inspire's weight vectors, and their checks.

A block weight g multiplies one module's merged update after the merge method's formula (applied
by each formula of :mod:`selma_toolkit.lora.merging.formulas`, which
:func:`selma_toolkit.lora.merge.merge_experts` calls, the one place that computes merges):

    B_m <- g * B_m   [out, r_m],   A_m unchanged   =>   dW_m = g * (B_m @ A_m)   [out, in]

with g the weight of the module's most specific listed group, 1 where no group of it is listed.
g = 0 makes the module's update exactly zero; its keys stay in the file (B = 0), so that the merge
can still be extended exactly from its own factors (lora/incremental.py).

Groups (module names are the canonical diffusers names of :mod:`selma_toolkit.lora.core`), most
specific first; each family names its denoiser's blocks in its record (``Family.block_groups``):

=====================================  ===============================================================
module                                  groups
=====================================  ===============================================================
``unet.down_blocks.N.*``                ``in.N``, ``in``, ``unet``  (LDM / kohya: input_blocks 3N+1 .. 3N+3)
``unet.mid_block.*``                    ``mid``, ``unet``           (LDM: middle_block)
``unet.up_blocks.N.*``                  ``out.N``, ``out``, ``unet`` (LDM: output_blocks 3N .. 3N+2)
other ``unet.*``                        ``unet``  (conv_in, time / add embeddings, conv_out)
``transformer.transformer_blocks.N.*``  Flux, Chroma, FLUX.2: ``double.N``, ``double`` (BFL's double_blocks);
                                        SD 3, Qwen-Image: ``transformer_blocks.N``, ``transformer_blocks``
``transformer.single_transformer_blocks.N.*``  ``single.N``, ``single`` (Flux-type single_blocks; FLUX.2's
                                        fused ``attn.to_qkv_mlp_proj`` and ``attn.to_out`` included)
``transformer.layers.N.*`` (Z-Image)    ``layers.N``, ``layers``; ``noise_refiner(.N)``, ``context_refiner(.N)``
every ``transformer.*``                 then ``transformer``, ``unet`` (the whole denoiser)
``text_encoder.*``                      ``te1``, ``te``  (CLIP-L; SD 1.x / 2.x's only text encoder)
``text_encoder_2.*``                    ``te2``, ``te``  (SDXL's OpenCLIP-G)
=====================================  ===============================================================

Block indices are diffusers' (``down_blocks.N``: SD 1.x / 2.x have N = 0..3, SDXL 0..2). When a
LoRA's family is unknown, a transformer block is in the groups of every family's spelling.

**LoRA Block Weight vectors** (the Inspire pack's ``block_vector``, e.g. ``1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1``,
optionally after ``NAME:``) are read as the pack reads them: the first number (BASE) weighs every
module outside the blocks (text encoders, embeddings, the final layers), then one number per block
the LoRA has, in the pack's order: the UNet's input blocks, middle block parts and output blocks by
their original (LDM) index, Flux-type double then single blocks by index; blocks after the last
number keep the last one. Only families with that convention take a vector (the UNet families and
Flux-type: ``Family.block_vector``); the others take groups. A vector is kept as the groups
``lbw.0`` (BASE), ``lbw.1``, ... and resolved against the modules of the merge. The pack's own node
asks for at least 12 numbers; any count is read here. Needs no torch: the scaling itself is done by
the merge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES, Family
from selma_toolkit.errors import LoraFormatError

BlockWeights = Mapping[str, float]
# Every family's block group names, the UNet's first (in / mid / out), then the DiT families'
# (transformer_blocks, Flux-type double / single, Z-Image's layers and refiners).
_BLOCK_GROUPS = tuple(dict.fromkeys(group for name in FAMILY_NAMES for group in FAMILIES[name].block_groups.values()))
_UNET_GROUPS = tuple(
    dict.fromkeys(g for f in FAMILIES.values() if f.denoiser == "unet" for g in f.block_groups.values())
)
_INDEXED = tuple(group for group in _BLOCK_GROUPS if group != "mid")
_HEADS = (
    "te",
    "te1",
    "te2",
    "unet",
    *_UNET_GROUPS,
    "transformer",
    *(group for group in _BLOCK_GROUPS if group not in _UNET_GROUPS),
)
GROUP_NAMES: tuple[str, ...] = tuple(
    name for head in _HEADS for name in ((head, f"{head}.N") if head in _INDEXED else (head,))
)
EXAMPLE = "in=1,mid=0.5,out=1,te=0"
DIT_EXAMPLE = "double=1,single.0=0.5"
_GROUP = re.compile(
    rf"^(te|te1|te2|unet|transformer|{'|'.join(map(re.escape, _BLOCK_GROUPS))}"
    rf"|({'|'.join(map(re.escape, _INDEXED))})\.(0|[1-9][0-9]*))$"
)
_VECTOR_KEY = re.compile(r"^lbw\.(0|[1-9][0-9]*)$")
_BLOCK = re.compile(r"^(unet|transformer)\.([A-Za-z_]+)\.(\d+)\.")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def module_groups(module_name: str, family: Family | None = None) -> tuple[str, ...]:
    """The block groups of a canonical module name, most specific first (see the module's table):
    ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> ("in.1", "in", "unet");
    ``transformer.transformer_blocks.3.attn.to_q`` of a Flux LoRA -> ("double.3", "double", "transformer", "unet")."""
    if module_name.startswith("text_encoder_2."):
        return ("te2", "te")
    if module_name.startswith("text_encoder"):
        return ("te1", "te")
    component = module_name.split(".", 1)[0]
    whole = ("unet",) if component == "unet" else ("transformer", "unet")
    if module_name.startswith("unet.mid_block."):
        return ("mid", "unet")
    match = _BLOCK.match(module_name)
    if match is None:
        return whole
    families = [family] if family is not None else [f for f in FAMILIES.values() if f.denoiser == component]
    names = list(dict.fromkeys(f.block_groups[match.group(2)] for f in families if match.group(2) in f.block_groups))
    index = int(match.group(3))
    return (*(f"{name}.{index}" for name in names), *names, *whole)


def module_block_weight(module_name: str, block_weights: BlockWeights | None, family: Family | None = None) -> float:
    """g for one module: the weight of its most specific group in ``block_weights``, else 1 (groups
    only: a vector is resolved against all the modules by :func:`block_weight_of`)."""
    if block_weights:
        for group in module_groups(module_name, family):
            if group in block_weights:
                return float(block_weights[group])
    return 1.0


def block_weight_of(
    module_names: Iterable[str], block_weights: BlockWeights | None, family: Family | None = None
) -> dict[str, float]:
    """g for each module of a LoRA or merge (checked ``block_weights``: groups or an ``lbw.*`` vector)."""
    names = list(module_names)
    if not block_weights:
        return dict.fromkeys(names, 1.0)
    if not any(_VECTOR_KEY.match(key) for key in block_weights):
        return {name: module_block_weight(name, block_weights, family) for name in names}
    vector = [float(block_weights[f"lbw.{i}"]) for i in range(len(block_weights))]
    blocks = {name: _vector_block(name, family) for name in names}
    order = sorted({block for block in blocks.values() if block is not None})
    weights, ratio = {}, 1.0
    for position, block in enumerate(order, start=1):
        if position < len(vector):
            ratio = vector[position]
        weights[block] = ratio
    return {name: vector[0] if blocks[name] is None else weights[blocks[name]] for name in names}


# The Inspire pack's block order and the original (LDM) UNet index of a diffusers UNet module
# (layers_per_block 2, as every SD 1.x / 2.x / XL: input block 3N + 1 + layer, 3N + 3 the
# downsampler; output block 3N + layer, the upsampler with the last layer).
_KINDS = {"input": 0, "middle": 1, "output": 2, "double": 3, "single": 4}
_UNET_PART = re.compile(r"^unet\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MID_PART = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}


def _vector_block(module_name: str, family: Family | None) -> tuple[int, int] | None:
    """(kind, index) of the Inspire block a module is in, in the pack's order; None: BASE."""
    if module_name == "unet.conv_in":
        return (_KINDS["input"], 0)
    match = _UNET_PART.match(module_name)
    if match:
        container, block, part, layer = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if container == "down_blocks":
            return (_KINDS["input"], 3 * block + (3 if part == "downsamplers" else 1 + layer))
        return (_KINDS["output"], 3 * block + (2 if part == "upsamplers" else layer))
    if module_name.startswith("unet.mid_block."):
        part = ".".join(module_name.split(".")[2:4])
        return (_KINDS["middle"], _MID_PART.get(part, 1))
    match = _BLOCK.match(module_name)
    if match and match.group(1) == "transformer":
        groups = family.block_groups if family is not None else FAMILIES["flux"].block_groups
        kind = groups.get(match.group(2))
        if kind in _KINDS:
            return (_KINDS[kind], int(match.group(3)))
    return None


def parse_block_weights(text: str | None) -> dict[str, float] | None:
    """``"in=1,mid=0.5,out=1,te=0"`` -> {"in": 1.0, "mid": 0.5, "out": 1.0, "te": 0.0}; a LoRA Block
    Weight vector ``"1,0,0.5,..."`` (or ``"NAME:1,0,0.5,..."``) -> {"lbw.0": 1.0, "lbw.1": 0.0, ...};
    None for an empty string. Pairs are GROUP=WEIGHT separated by commas (spaces ignored); each group once."""
    if text is None or not text.strip():
        return None
    if "=" not in text:
        return _parse_vector(text)
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        group, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not group or not value:
            raise LoraFormatError(
                f"block weights {text!r}: {item!r} is not GROUP=WEIGHT; expected pairs separated by commas, e.g. "
                f"{EXAMPLE} (or a LoRA Block Weight vector of numbers, BASE first)"
            )
        try:
            number = float(value)
        except ValueError:
            raise LoraFormatError(
                f"block weights {text!r}: {value!r} (for {group}) is not a number; e.g. {EXAMPLE}"
            ) from None
        if group in weights:
            raise LoraFormatError(f"block weights {text!r}: group {group!r} is given twice; give each group once")
        weights[group] = number
    return check_block_weights(weights)


def _parse_vector(text: str) -> dict[str, float]:
    body = text.split(":", 1)[1] if ":" in text else text
    values = [part.strip() for part in body.split(",")]
    bad = [value for value in values if not _NUMBER.match(value)]
    if bad:
        raise LoraFormatError(
            f"block weights {text!r}: {bad[0]!r} is not a number; a LoRA Block Weight vector is numbers separated by "
            f"commas, BASE first (e.g. 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1), or give GROUP=WEIGHT pairs, e.g. {EXAMPLE}"
        )
    return check_block_weights({f"lbw.{i}": float(value) for i, value in enumerate(values)})


def check_block_weights(
    block_weights: BlockWeights | None, module_names: Iterable[str] | None = None, family: Family | None = None
) -> dict[str, float] | None:
    """``block_weights`` checked (group names or a whole ``lbw.*`` vector, finite numbers) and copied
    as {group: float}; None for none. Raises :class:`LoraFormatError` naming an unknown group and
    listing the valid ones (and, given ``module_names``, the groups those modules are in), or a
    vector for a family whose blocks have no vector convention."""
    if not block_weights:
        return None
    names = list(module_names) if module_names is not None else None
    vector = [key for key in block_weights if isinstance(key, str) and _VECTOR_KEY.match(key)]
    if vector and (len(vector) != len(block_weights) or set(vector) != {f"lbw.{i}" for i in range(len(vector))}):
        raise LoraFormatError(
            f"block weights {dict(block_weights)}: a LoRA Block Weight vector (lbw.0, lbw.1, ...) "
            "is given whole and alone; give either the vector or GROUP=WEIGHT pairs"
        )
    if vector and names is not None:
        _check_vector_family(names, family)
    checked: dict[str, float] = {}
    for group, value in block_weights.items():
        if not isinstance(group, str) or not (_GROUP.match(group) or group in vector):
            present = (
                sorted({g for name in names for g in module_groups(name, family)}, key=_group_order) if names else None
            )
            adapted = f"; the experts' modules are in {', '.join(present)}" if present else ""
            raise LoraFormatError(
                f"block weight group {group!r} is not a group; valid groups: {', '.join(GROUP_NAMES)} "
                f"(N: a diffusers block index, e.g. in.0 for down_blocks.0, double.3 for transformer_blocks.3)"
                f"{adapted}. "
                f"E.g. {EXAMPLE} or {DIT_EXAMPLE}"
            )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LoraFormatError(f"block weight {group}={value!r}: expected a number") from None
        if not math.isfinite(number):
            raise LoraFormatError(f"block weight {group}={value!r}: expected a finite number")
        checked[group] = number
    return checked


def _check_vector_family(module_names: list[str], family: Family | None) -> None:
    dit = any(name.startswith("transformer.") for name in module_names)
    if (family is not None and not family.block_vector) or (family is None and dit):
        who = family.title if family is not None else "a transformer LoRA of an unknown family"
        groups = sorted({g for name in module_names for g in module_groups(name, family)}, key=_group_order)
        raise LoraFormatError(
            f"block weights: the Inspire pack's LoRA Block Weight vectors have no convention for {who} (only the "
            f"UNet families and Flux-type double / single blocks); give GROUP=WEIGHT pairs of {', '.join(groups)}"
        )


def unused_groups(block_weights: BlockWeights, module_names: Iterable[str], family: Family | None = None) -> list[str]:
    """The listed groups that no module is in (a preset for another model, or a typo such as out.9)."""
    if any(_VECTOR_KEY.match(key) for key in block_weights):
        return []
    present = {g for name in module_names for g in module_groups(name, family)}
    return [group for group in block_weights if group not in present]


def _group_order(group: str) -> tuple[int, int]:
    head, _, index = group.partition(".")
    return _HEADS.index(head) if head in _HEADS else len(_HEADS), int(index) if index.isdigit() else -1

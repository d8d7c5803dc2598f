"""Single-file checkpoints in the original (LDM / sgm) layout, as A1111 and ComfyUI save SD 1.x,
SD 2.x and SDXL: each weight key mapped to this package's canonical module name, one key at a time.

diffusers' single-file loaders convert a checkpoint as a whole (``load_single_file_checkpoint``
reads every tensor first); mapping names per key instead lets an extraction read one tensor at a
time. The rules are diffusers' (``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``), written as name maps:

* UNet: ``model.diffusion_model.<LDM path>`` -> ``unet.<diffusers path>`` (``keys.ldm_to_diffusers_unet_path``);
* CLIP-L (SD 1.x ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``):
  transformers' own names under the prefix;
* OpenCLIP (SD 2.x ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``):
  ``transformer.resblocks.N`` -> ``text_model.encoder.layers.N``, the fused ``attn.in_proj_weight``
  [3d, d] split into q / k / v rows, ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``,
  SDXL's ``text_projection`` (applied as x @ P) transposed into the Linear ``text_projection``.
  SD 2.x's last block (23) and projection are dropped, as diffusers' CLIPTextModel has neither.

Names only: no tensor is read here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from selma_toolkit.lora.core import canonical_module_name
from selma_toolkit.lora.keys import ldm_to_diffusers_unet_path

UNET_PREFIX = "model.diffusion_model."
# prefix -> (component, naming): "hf" for transformers' CLIP names, "openclip" for OpenCLIP's.
TEXT_PREFIXES: dict[str, tuple[str, str]] = {
    "cond_stage_model.transformer.": ("text_encoder", "hf"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "hf"),
    "cond_stage_model.model.": ("text_encoder", "openclip"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "openclip"),
}
_SD2_DROPPED_BLOCK = "transformer.resblocks.23."  # diffusers keeps SD 2.x's penultimate layer as the last
_OPENCLIP_LAYERS = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_DOWNSAMPLER = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight$")
# Layouts of other model families' single files (BFL Flux, SD 3 MMDiT): not mapped here.
_OTHER_LAYOUTS = (
    "double_blocks.",
    "model.diffusion_model.double_blocks.",
    "joint_blocks.",
    "model.diffusion_model.joint_blocks.",
)


@dataclass(frozen=True)
class MappedWeight:
    """Where one layer's weight lies in a single-file checkpoint: ``key``, optionally only the
    rows ``rows`` (q / k / v of a fused projection), optionally transposed."""

    module: str  # canonical module name: unet.<path>, text_encoder.text_model.<path>
    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


def single_file_family(keys: Collection[str]) -> str | None:
    """sd1 / sd2 / sdxl from the text encoders' names in a checkpoint (the UNet's shapes tell the
    rest: ``unet_family``); None for a file with no text encoder."""
    if any(key.startswith("conditioner.embedders.1.model.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return "sd1"
    return None


def other_layout(keys: Collection[str]) -> bool:
    """Whether the checkpoint is an SD 3 / Flux single file (MMDiT / BFL names), which is not mapped here."""
    return any(key.startswith(_OTHER_LAYOUTS) for key in keys)


def layers_per_block(keys: Collection[str]) -> int:
    """The UNet's layers per block from where its first downsampler sits: input block L+1 (2 in
    every SD 1.x / 2.x / XL model; the tiny test models have 1)."""
    found = [int(match.group(1)) for key in keys if (match := _DOWNSAMPLER.match(key))]
    return min(found) - 1 if found else 2


def map_single_file_key(key: str, shape: tuple[int, ...], unet_layers_per_block: int = 2) -> list[MappedWeight]:
    """The layer weights one checkpoint key holds (three for a fused q/k/v projection), or [] for
    a key that is no Linear / Conv weight of the UNet or a text encoder (VAE, EMA copies, norms,
    embeddings, biases). ``shape`` is the stored tensor's shape."""
    if key.startswith(UNET_PREFIX):
        if not key.endswith(".weight"):
            return []
        try:
            path = ldm_to_diffusers_unet_path(key[len(UNET_PREFIX) : -len(".weight")], unet_layers_per_block)
        except ValueError:
            return []
        return [MappedWeight(f"unet.{path}", key)]
    for prefix, (component, naming) in TEXT_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if naming == "hf":
                return (
                    [MappedWeight(canonical_module_name(component, rest[: -len(".weight")]), key)]
                    if rest.endswith(".weight")
                    else []
                )
            return _openclip(component, prefix, rest, key, shape)
    return []


def _openclip(component: str, prefix: str, rest: str, key: str, shape: tuple[int, ...]) -> list[MappedWeight]:
    sd2 = prefix == "cond_stage_model.model."
    if rest == "text_projection":
        return [] if sd2 else [MappedWeight(f"{component}.text_projection", key, transpose=True)]
    match = _RESBLOCK.match(rest)
    if match is None or (sd2 and rest.startswith(_SD2_DROPPED_BLOCK)):
        return []
    layer, inner = f"text_model.encoder.layers.{match.group(1)}", match.group(2)
    if inner == "attn.in_proj_weight":
        width = shape[0] // 3
        return [
            MappedWeight(
                canonical_module_name(component, f"{layer}.self_attn.{name}_proj"),
                key,
                (index * width, (index + 1) * width),
            )
            for index, name in enumerate("qkv")
        ]
    if inner.endswith(".weight") and inner[: -len(".weight")] in _OPENCLIP_LAYERS:
        return [
            MappedWeight(canonical_module_name(component, f"{layer}.{_OPENCLIP_LAYERS[inner[: -len('.weight')]]}"), key)
        ]
    return []

"""kohya's Flux LoRA files, written with the original (BFL) module names, read as diffusers' modules.

kohya's sd-scripts (and the tools that copy its layout) name Flux layers as Black Forest Labs'
reference code does: ``lora_unet_double_blocks_N_img_attn_qkv``, ``lora_unet_single_blocks_N_linear1``...
Those layers are fused where diffusers' FluxTransformer2DModel has one Linear per projection:
``img_attn.qkv`` is ``attn.to_q`` / ``to_k`` / ``to_v`` stacked on the output dimension, and a
single block's ``linear1`` is ``to_q`` / ``to_k`` / ``to_v`` / ``proj_mlp``. A LoRA on a fused layer,
update s * B @ A with B [sum of outputs, r], is exactly one LoRA per part: the same A, the rows of
B that belong to that part, the same alpha. The final layer's modulation is (shift, scale) in BFL's
order and (scale, shift) in diffusers', so the two halves of its B swap.

:func:`split_bfl_flux` rewrites such a state dict into OneTrainer's ``lora_transformer_<diffusers
path>`` spelling, which :mod:`selma_toolkit.lora.keys` reads; tensors are sliced, never changed.
Needs only torch (ComfyUI imports this package).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# ComfyUI's own trainer writes the same BFL names as ``diffusion_model.double_blocks.0.img_attn.qkv``.
_COMFY_BFL = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.", "diffusion_model.final_layer.")
BFL_PREFIXES = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_img_in", "lora_unet_txt_in",
                "lora_unet_time_in_", "lora_unet_vector_in_", "lora_unet_guidance_in_", "lora_unet_final_layer_")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# BFL name inside a double block -> diffusers names of the parts its output stacks (one: no split).
_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # 3 x hidden + mlp (4 x hidden)
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
_OTHER = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_BLOCK = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(.+)$")
_MLP_RATIO = 4  # Flux's single blocks: linear1's output is 3 x hidden (q, k, v) + 4 x hidden (the MLP)


def is_bfl_flux(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict has kohya (or ComfyUI) keys with Flux's original (BFL) names."""
    return any(key.startswith(BFL_PREFIXES + _COMFY_BFL) for key in state_dict)


def _kohya_spelling(key: str) -> str:
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`` -> kohya's ``lora_unet_double_blocks_0_...``."""
    if not key.startswith(_COMFY_BFL):
        return key
    suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return key
    return "lora_unet_" + key[len("diffusion_model."): -len(suffix)].replace(".", "_") + suffix


def _parts(module: str) -> tuple[tuple[str, ...], str] | None:
    """BFL module (without suffix) -> (diffusers paths of the stacked parts, how to split), or None."""
    match = _BLOCK.match(module)
    if match:
        kind, index, name = match.groups()
        table = _DOUBLE if kind == "double" else _SINGLE
        if name not in table:
            return None
        prefix = f"transformer_blocks.{index}." if kind == "double" else f"single_transformer_blocks.{index}."
        split = "single" if (kind, name) == ("single", "linear1") else "even"
        return tuple(prefix + part for part in table[name]), split
    name = module[len("lora_unet_"):]
    if name in _OTHER:
        return (_OTHER[name],), "swap" if name == "final_layer_adaLN_modulation_1" else "even"
    return None


def _split_rows(up: torch.Tensor, count: int, split: str) -> list[torch.Tensor]:
    rows = up.shape[0]
    if split == "single":  # q, k, v of `hidden` rows each, then the MLP's 4 x hidden
        hidden = rows // (3 + _MLP_RATIO)
        return list(torch.split(up, [hidden, hidden, hidden, rows - 3 * hidden]))
    if split == "swap":
        shift, scale = torch.chunk(up, 2)
        return [torch.cat([scale, shift])]
    return list(torch.chunk(up, count)) if count > 1 else [up]


def split_bfl_flux(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every BFL-named Flux module (kohya's ``lora_unet_double_blocks_N_...``
    or ComfyUI's ``diffusion_model.double_blocks.N...``) replaced by its diffusers parts, spelled
    ``lora_transformer_<path>`` (down and alpha shared, up split by rows); other keys unchanged.
    A BFL module this table does not know keeps its key (and is reported by the reader)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        key = _kohya_spelling(key)
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        found = _parts(key[: -len(suffix)]) if suffix and key.startswith(BFL_PREFIXES) else None
        if found is None:
            out[key] = tensor
            continue
        paths, split = found
        names = ["lora_transformer_" + path.replace(".", "_") for path in paths]
        if suffix == ".lora_up.weight":
            pieces = _split_rows(tensor, len(paths), split)
        else:
            pieces = [tensor] * len(paths)
        for name, piece in zip(names, pieces):
            out[name + suffix] = piece
    return out

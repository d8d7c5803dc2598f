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

FLUX.2 (its [klein] models too) has BFL names in ComfyUI and in the LoRAs ai-toolkit writes,
``diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight``: :func:`split_bfl_flux2` reads them
(the same fused q/k/v; its single blocks' ``linear1`` is diffusers' fused ``to_qkv_mlp_proj`` whole)
and :func:`fuse_flux2` writes them, three q/k/v LoRAs as one exact LoRA of their summed rank.
Needs only torch (ComfyUI imports this package).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# ComfyUI's own trainer writes the same BFL names as ``diffusion_model.double_blocks.0.img_attn.qkv``.
_COMFY_BFL = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.", "diffusion_model.final_layer.")
BFL_PREFIXES = (
    "lora_unet_double_blocks_",
    "lora_unet_single_blocks_",
    "lora_unet_img_in",
    "lora_unet_txt_in",
    "lora_unet_time_in_",
    "lora_unet_vector_in_",
    "lora_unet_guidance_in_",
    "lora_unet_final_layer_",
)
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
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
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
    return "lora_unet_" + key[len("diffusion_model.") : -len(suffix)].replace(".", "_") + suffix


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
    name = module[len("lora_unet_") :]
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
        pieces = _split_rows(tensor, len(paths), split) if suffix == ".lora_up.weight" else [tensor] * len(paths)
        for name, piece in zip(names, pieces):
            out[name + suffix] = piece
    return out


# ------------------------------------------------------------------------------------- FLUX.2

# FLUX.2 in BFL's names (ComfyUI's model, ai-toolkit's LoRAs: ``diffusion_model.<path>.lora_A/B``)
# -> diffusers' Flux2Transformer2DModel. The double blocks' q/k/v are fused as in FLUX.1; the single
# blocks' linear1 is diffusers' to_qkv_mlp_proj whole (diffusers fuses it too), linear2 its attn.to_out.
_FLUX2_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
_FLUX2_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_FLUX2_OTHER = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
}
_FLUX2_PREFIX = "diffusion_model."
_AB = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up"}
_FLUX2_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)$")


def _diffusers_names_flux2() -> dict[str, tuple[str, ...]]:
    """diffusers' module path (block index as ``{}``) -> BFL path, for writing."""
    table = {f"transformer_blocks.{{}}.{d}": f"double_blocks.{{}}.{b}" for b, ds in _FLUX2_DOUBLE.items() for d in ds}
    table |= {f"single_transformer_blocks.{{}}.{d}": f"single_blocks.{{}}.{b}" for b, d in _FLUX2_SINGLE.items()}
    return table | dict((d, b) for b, d in _FLUX2_OTHER.items())


def is_bfl_flux2(state_dict: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> bool:
    """Whether a state dict holds FLUX.2 modules in BFL's names: ``diffusion_model.double_blocks`` /
    ``single_blocks`` keys of a file its metadata says is FLUX.2, or with FLUX.2's shared modulation."""
    keys = [key for key in state_dict if key.startswith(_FLUX2_PREFIX)]
    if not any(
        key[len(_FLUX2_PREFIX) :].startswith(
            ("double_blocks.", "single_blocks.", "double_stream_modulation", "single_stream_modulation")
        )
        for key in keys
    ):
        return False
    said = " ".join(
        (metadata or {}).get(k, "") for k in ("selma.architecture", "modelspec.architecture", "ss_base_model_version")
    )
    return "flux2" in said or "flux-2" in said or any("_stream_modulation" in key for key in keys)


def _flux2_parts(path: str) -> tuple[str, ...] | None:
    """A BFL module path (no prefix) -> the diffusers paths its output rows stack, or None."""
    match = _FLUX2_BLOCK.match(path)
    if match:
        kind, index, name = match.groups()
        if kind == "double" and name in _FLUX2_DOUBLE:
            return tuple(f"transformer_blocks.{index}.{part}" for part in _FLUX2_DOUBLE[name])
        if kind == "single" and name in _FLUX2_SINGLE:
            return (f"single_transformer_blocks.{index}.{_FLUX2_SINGLE[name]}",)
        return None
    return (_FLUX2_OTHER[path],) if path in _FLUX2_OTHER else None


def _split_fused(down: torch.Tensor, up: torch.Tensor, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA on ``count`` stacked outputs -> one per part. When B is block-diagonal over A's rows
    split in ``count`` (what :func:`fuse_flux2` writes), each part gets its own rows of A and its
    block of B (the rank it had); otherwise every part shares A and gets its rows of B (exact too)."""
    if count == 1:
        return [(down, up)]
    rows = torch.chunk(up, count)
    if down.shape[0] % count == 0:
        rank = down.shape[0] // count
        blocks = [row[:, i * rank : (i + 1) * rank] for i, row in enumerate(rows)]
        if all(int(torch.count_nonzero(row)) == int(torch.count_nonzero(block)) for row, block in zip(rows, blocks)):
            return [(down[i * rank : (i + 1) * rank], block) for i, block in enumerate(blocks)]
    return [(down, row) for row in rows]


def split_bfl_flux2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every FLUX.2 module in BFL's names (``diffusion_model.<BFL path>``)
    replaced by its diffusers parts as ``diffusion_model.<diffusers path>`` (the ai-toolkit spelling
    :mod:`selma_toolkit.lora.keys` reads): fused q/k/v split (:func:`_split_fused`), the final
    modulation's (shift, scale) halves swapped to diffusers' (scale, shift); alpha kept per part."""
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in (*_AB, ".alpha") if key.endswith(s)), None)
        path = key[len(_FLUX2_PREFIX) : -len(suffix)] if suffix and key.startswith(_FLUX2_PREFIX) else None
        if path is None or _flux2_parts(path) is None:
            out[key] = tensor
            continue
        grouped.setdefault(path, {})[_AB.get(suffix, "alpha")] = (suffix, tensor)
    for path, roles in grouped.items():
        parts = _flux2_parts(path)
        if "down" not in roles or "up" not in roles:  # incomplete: left for the reader to report
            out.update({_FLUX2_PREFIX + path + suffix: tensor for suffix, tensor in roles.values()})
            continue
        (down_suffix, down), (up_suffix, up) = roles["down"], roles["up"]
        if path == "final_layer.adaLN_modulation.1":
            shift, scale = torch.chunk(up, 2)
            up = torch.cat([scale, shift])
        for part, (part_down, part_up) in zip(parts, _split_fused(down, up, len(parts))):
            if len(parts) > 1 and not part_down.any() and not part_up.any():
                continue  # the zero factors fuse_flux2 fills a part the LoRA lacks with
            out[f"{_FLUX2_PREFIX}{part}{down_suffix}"] = part_down
            out[f"{_FLUX2_PREFIX}{part}{up_suffix}"] = part_up
            if "alpha" in roles:
                out[f"{_FLUX2_PREFIX}{part}.alpha"] = roles["alpha"][1]
    return out


def fuse_flux2(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers' FLUX.2 modules ({path without component: (A, B)}, scale already folded into B) ->
    BFL's ({BFL path: (A, B)}). Three LoRAs on q, k and v become one on the fused qkv, exactly:
    A = [A_q; A_k; A_v] [r_q + r_k + r_v, in], B = blockdiag(B_q, B_k, B_v); a part the LoRA lacks
    adds zero factors of the others' rank, so every fused layer has all three (the reader leaves out
    a part whose A and B are both zero: a trained LoRA's A is never all zero)."""
    table = _diffusers_names_flux2()
    patterns = [(re.compile("^" + re.escape(d).replace(r"\{\}", r"(\d+)") + "$"), b) for d, b in table.items()]
    fused: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    for path, (down, up) in modules.items():
        for pattern, bfl in patterns:
            match = pattern.match(path)
            if match:
                target = bfl.format(*match.groups())
                break
        else:
            raise ValueError(f"{path}: no FLUX.2 module of that name in BFL's layout")
        parts = _flux2_parts(target)
        position = parts.index(path)
        if target == "final_layer.adaLN_modulation.1":
            scale, shift = torch.chunk(up, 2)
            up = torch.cat([shift, scale])
        fused.setdefault(target, []).append((position, down, up))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target, pieces in fused.items():
        count = len(_flux2_parts(target))
        if count == 1:
            out[target] = pieces[0][1:]
            continue
        given = {position: (down, up) for position, down, up in pieces}
        rank = max(down.shape[0] for _, down, _ in pieces)
        width, rows = pieces[0][1].shape[1], pieces[0][2].shape[0]
        factors = [
            given.get(
                i,
                (torch.zeros(rank, width, dtype=pieces[0][1].dtype), torch.zeros(rows, rank, dtype=pieces[0][2].dtype)),
            )
            for i in range(count)
        ]
        out[target] = (torch.cat([down for down, _ in factors]), torch.block_diag(*[up for _, up in factors]))
    return out

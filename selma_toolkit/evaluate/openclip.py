"""Read an open_clip / OpenAI-CLIP state dict into transformers' CLIPModel key layout.

HPS v2 publishes its reward model as an open_clip ViT-H-14 state dict. transformers ships its CLIP
converter only as a script that imports the OpenAI ``clip`` package, and open_clip itself needs
torchvision, so the key mapping is written here (it is fixed by the two architectures):

| open_clip | transformers CLIPModel |
| --- | --- |
| ``token_embedding.weight``, ``positional_embedding`` | ``text_model.embeddings.{token,position}_embedding.weight`` |
| ``transformer.resblocks.N.*`` / ``visual.transformer.resblocks.N.*`` | ``{text,vision}_model.encoder.layers.N.*`` |
| ``attn.in_proj_{weight,bias}`` (q, k, v stacked) | ``self_attn.{q,k,v}_proj.{weight,bias}`` |
| ``attn.out_proj``, ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj`` | ``self_attn.out_proj``, ``layer_norm1``, ``layer_norm2``, ``mlp.fc1``, ``mlp.fc2`` |
| ``ln_final`` | ``text_model.final_layer_norm`` |
| ``visual.conv1.weight``, ``visual.class_embedding``, ``visual.positional_embedding`` | ``vision_model.embeddings.{patch_embedding.weight, class_embedding, position_embedding.weight}`` |
| ``visual.ln_pre``, ``visual.ln_post`` | ``vision_model.pre_layrnorm``, ``vision_model.post_layernorm`` |
| ``visual.proj`` [width, dim], ``text_projection`` [width, dim] | ``visual_projection.weight``, ``text_projection.weight`` (transposed) |
| ``logit_scale`` | ``logit_scale`` |
"""

from __future__ import annotations

import re
from typing import Any

from selma_toolkit.errors import ModelError

_BLOCK_PARTS = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_SINGLE = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# "...resblocks.N.ln_1.weight", and "...resblocks.N.attn.in_proj_weight" (nn.MultiheadAttention's spelling).
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")


def clip_state_dict_from_open_clip(state_dict: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Map an open_clip CLIP state dict (``module.`` prefixes allowed) to CLIPModel keys.

    Keys that are not part of the CLIP towers (``attn_mask`` buffers) are dropped; any other
    unknown key is an error naming it, so a checkpoint of another architecture is not half-loaded.
    """
    out: dict[str, Any] = {}
    unknown = []
    for raw_key, tensor in state_dict.items():
        key = raw_key.removeprefix("module.")
        if key.endswith("attn_mask"):
            continue
        if key in _SINGLE:
            out[_SINGLE[key]] = tensor
        elif key == "visual.proj":
            out["visual_projection.weight"] = tensor.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()
        elif match := _BLOCK.match(key):
            visual, index, part, kind = match.groups()
            prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{index}"
            if part == "attn.in_proj":
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[f"{prefix}.{_BLOCK_PARTS[part]}.{kind}"] = tensor
            else:
                unknown.append(raw_key)
        else:
            unknown.append(raw_key)
    if unknown:
        raise ModelError(
            f"{source}: not an open_clip CLIP state dict; unknown keys {unknown[:5]}"
            f"{' and more' if len(unknown) > 5 else ''}"
        )
    return out

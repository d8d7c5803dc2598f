"""The internal form of a LoRA, which every layout is read into and written from.

A LoRA adapts a layer with weight W [out, in] (or a conv weight [out, in, kh, kw]) as

    W' = W + scale * B @ A,   scale = alpha / r

with A = ``down`` [r, in] (conv: [r, in, kh, kw]) and B = ``up`` [out, r] (conv: [out, r, 1, 1]).

Modules are keyed by diffusers module names with the component first:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``transformer.transformer_blocks.0.attn.add_q_proj`` (SD 3 / Flux),
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.text_model...``.
Text-encoder names always carry ``text_model.`` (as files on the Hub and ComfyUI spell them),
although transformers 5 ``CLIPTextModel`` module paths lack it: see ``canonical_module_name``.

This module needs only torch: it is imported inside ComfyUI, which may lack diffusers and peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selma_toolkit.architectures import COMPONENTS  # every family's model parts (the registry)


@dataclass
class LoraModule:
    """One adapted layer. Shapes: down (A) [r, in] or [r, in, kh, kw]; up (B) [out, r] or [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"rank mismatch: down (A) {tuple(self.down.shape)} vs up (B) {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight update scale * B @ A, shaped like the layer's weight."""
        down = self.down.to(dtype)
        up = self.up.to(dtype)
        if not self.is_conv:
            return self.scale * (up @ down)
        # conv: B is a 1x1 conv after A; the product is A's kernel mixed by B.
        update = up.flatten(1) @ down.flatten(1)  # [out, in*kh*kw]
        return self.scale * update.reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraWeights:
    """A whole LoRA: modules keyed by canonical diffusers module name, and string metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> set[str]:
        """Which model parts the LoRA touches: a subset of unet, text_encoder, text_encoder_2."""
        return {name.split(".", 1)[0] for name in self.modules}

    def ranks(self) -> set[int]:
        return {module.rank for module in self.modules.values()}


_NOT_UNDER_TEXT_MODEL = ("text_model.", "text_projection", "encoder.block.", "encoder.final_layer_norm", "shared")


def canonical_module_name(component: str, module_path: str) -> str:
    """``component`` + a model's own module path -> the canonical key of this package.

    transformers 5 ``CLIPTextModel`` names its layers ``encoder.layers.N...`` (no ``text_model.``),
    while files on the Hub, kohya and ComfyUI spell them ``text_model.encoder.layers.N...``; keys
    here always carry ``text_model.`` so that every file written from them loads in ComfyUI.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    # text_projection sits beside text_model in CLIPTextModelWithProjection (SDXL's second encoder);
    # a T5EncoderModel (SD 3, Flux) has no text_model at all: encoder.block.N..., shared.
    if component.startswith("text_encoder") and not module_path.startswith(_NOT_UNDER_TEXT_MODEL):
        module_path = "text_model." + module_path
    return f"{component}.{module_path}"

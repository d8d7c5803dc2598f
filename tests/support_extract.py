"""Builders for the extraction tests: known random LoRAs fused into the tiny models with diffusers'
own ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` (as the SELMA authors fused theirs),
saved in fp32 or fp16, and single-file checkpoints in the original (LDM) layout written from a
diffusers folder by the naming rules of the original code (independent of the toolkit's reader).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from support_lora import diffusers_to_ldm, text_encoders

from selma_toolkit.architectures import get_family
from selma_toolkit.lora import LoraModule, LoraWeights, canonical_module_name, save_lora


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def known_lora(
    pipe, family: str, *, rank: int, seed: int, relative: float = 1e-2, targets=None, text_targets: tuple[str, ...] = ()
) -> LoraWeights:
    """A random LoRA on the denoiser's ``targets`` (default: the family's LoRA targets) and the text
    encoders' ``text_targets``, each module's update scaled to ``relative`` x the layer's weight
    norm (a LoRA fused at SELMA's strength changes a layer by about 1e-3 to 1e-2 of it)."""
    generator = torch.Generator().manual_seed(seed)
    component = get_family(family).denoiser
    parts = {component: (denoiser(pipe), tuple(targets or get_family(family).lora_targets))}
    parts.update(
        {name: (encoder, text_targets) for name, encoder in text_encoders(pipe).items()} if text_targets else {}
    )
    modules = {}
    for name, (model, wanted) in parts.items():
        for path, layer in model.named_modules():
            if not any(path == t or path.endswith("." + t) for t in wanted) or not isinstance(
                layer, torch.nn.Linear | torch.nn.Conv2d
            ):
                continue
            weight = layer.weight.detach().double()
            down = torch.randn(rank, *weight.shape[1:], generator=generator, dtype=torch.float64)
            up = torch.randn(
                weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []), generator=generator, dtype=torch.float64
            )
            module = LoraModule(down, up, float(rank))
            up = up * (relative * weight.norm() / module.delta(torch.float64).norm())
            modules[canonical_module_name(name, path)] = LoraModule(down.float(), up.float(), float(rank))
    return LoraWeights(modules=modules)


def total_update(loras: list[LoraWeights], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_t w_t scale_t B_t A_t per module, in float64: the dense update set_adapters applies."""
    updates: dict[str, torch.Tensor] = {}
    for lora, weight in zip(loras, weights, strict=True):
        for name, module in lora.modules.items():
            updates[name] = updates.get(name, 0) + weight * module.delta(torch.float64)
    return updates


def fused_model(
    base: Path,
    loras: list[LoraWeights],
    out: Path,
    *,
    weights: list[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """``base`` with ``loras`` loaded as diffusers adapters, weighted by ``weights`` with
    set_adapters, fused into the weights, unloaded, and saved in ``dtype`` to ``out``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    names = []
    for index, lora in enumerate(loras):
        file = out.parent / f".{out.name}-lora-{index}.safetensors"
        save_lora(lora, file, format="peft")  # diffusers' kohya reader needs out_proj among text-encoder layers
        pipe.load_lora_weights(str(file), adapter_name=f"e{index}")
        names.append(f"e{index}")
        file.unlink()
    pipe.set_adapters(names, adapter_weights=weights or [1.0] * len(loras))
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    pipe.to(dtype).save_pretrained(out)
    return out


def saved_as(base: Path, out: Path, dtype: torch.dtype) -> Path:
    """``base`` saved again in ``dtype`` (the fp16 copy a model is often published as)."""
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(base).to(dtype).save_pretrained(out)
    return out


# --------------------------------------------------------------- single files in the original layout

_OPENCLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
}


def single_file(folder: Path, out: Path, family: str) -> Path:
    """The diffusers ``folder`` as one checkpoint in the original layout (``model.diffusion_model.``
    UNet; SD 1.x CLIP under ``cond_stage_model.transformer.``; SD 2.x OpenCLIP under
    ``cond_stage_model.model.`` with q / k / v fused into ``attn.in_proj_weight``; SDXL's two under
    ``conditioner.embedders.0.transformer.`` / ``.1.model.``, the projection applied as x @ P), plus
    a VAE key the reader must skip. Written from the original code's naming, not with the toolkit's
    mapper."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "unet" / "config.json").read_text())
    up_attention = {i: kind.startswith("CrossAttn") for i, kind in enumerate(config["up_block_types"])}
    tensors = {"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        module, _, leaf = key.rpartition(".")
        tensors[
            f"model.diffusion_model.{diffusers_to_ldm(module, config['layers_per_block'], up_attention)}.{leaf}"
        ] = value
    text = _clip(folder / "text_encoder")
    if family == "sd1":
        tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    elif family == "sd2":
        tensors.update(_openclip(text, "cond_stage_model.model."))
    else:  # SDXL: CLIP-L under embedders.0 with transformers' names, OpenCLIP-G under embedders.1
        tensors.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        text_2 = _clip(folder / "text_encoder_2")
        tensors.update(_openclip(text_2, "conditioner.embedders.1.model."))
        tensors["conditioner.embedders.1.model.text_projection"] = text_2["text_projection.weight"].T.contiguous()
    save_file(tensors, out)
    return out


def _clip(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
        for k, v in load_file(folder / "model.safetensors").items()
    }


def _openclip(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {
        f"{prefix}token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": text["text_model.embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": text["text_model.final_layer_norm.weight"],
        f"{prefix}ln_final.bias": text["text_model.final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers.")})
    for layer in layers:
        source, target = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat([text[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for name, original in _OPENCLIP.items():
                out[f"{target}{original}.{kind}"] = text[f"{source}{name}.{kind}"]
    return out


def full_size_pair(arch: str, root: Path) -> tuple[Path, Path]:
    """Two UNet + text-encoder folders of the full-size ``arch`` model (SD 1.5 or SDXL layers, names
    and shapes from the meta device): a base of zeros and a model with a random rank-1 update in
    every Linear / Conv layer of the UNet and in every CLIP layer ComfyUI maps, written in fp16 shards
    of about 1 GB (names are what ComfyUI's key maps are tested on; the values do not matter)."""
    from support_comfyui import full_size_models
    from support_lora import COMFY_CLIP_LAYERS, FULL_SIZE_UNET

    unet, text = full_size_models(arch)
    generator = torch.Generator().manual_seed(0)
    pipeline = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    writers = {name: _ShardWriter(root / name) for name in ("base", "model")}
    index = {
        "_class_name": pipeline,
        "unet": ["diffusers", "UNet2DConditionModel"],
        **{component: ["transformers", type(model).__name__] for component, model in text.items()},
    }
    for name in writers:
        (root / name).mkdir(parents=True)
        (root / name / "model_index.json").write_text(json.dumps(index))
    parts = {"unet": (unet, None), **{component: (model, COMFY_CLIP_LAYERS) for component, model in text.items()}}
    for component, (model, layers) in parts.items():
        for path, layer in model.named_modules():
            if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or (layers and not path.endswith(layers)):
                continue
            shape = tuple(layer.weight.shape)
            down = torch.randn(math.prod(shape[1:]), generator=generator)
            update = torch.outer(torch.randn(shape[0], generator=generator), down) * 1e-2
            unprefixed = component != "unet" and not path.startswith("text_model.")
            key = f"text_model.{path}.weight" if unprefixed else f"{path}.weight"
            writers["base"].add(component, key, torch.zeros(shape, dtype=torch.float16))
            writers["model"].add(component, key, update.reshape(shape).half())
    for name, writer in writers.items():
        writer.close()
        (root / name / "unet" / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **FULL_SIZE_UNET[arch]})
        )
    return root / "base", root / "model"


class _ShardWriter:
    """Tensors written into ``<component>/`` as safetensors shards of about 1 GB with a diffusers index."""

    def __init__(self, folder: Path):
        self.folder, self.shards, self.pending, self.size = folder, {}, {}, 0

    def add(self, component: str, key: str, tensor: torch.Tensor) -> None:
        if self.pending and (self.size + tensor.nbytes > 1 << 30 or next(iter(self.pending))[0] != component):
            self._flush()
        self.pending[(component, key)] = tensor
        self.size += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        component = next(iter(self.pending))[0]
        stem = "diffusion_pytorch_model" if component == "unet" else "model"
        shards = self.shards.setdefault(component, {})
        file = f"{stem}-{len(set(shards.values())) + 1:05d}.safetensors"
        (self.folder / component).mkdir(parents=True, exist_ok=True)
        save_file({key: tensor for (_, key), tensor in self.pending.items()}, self.folder / component / file)
        shards.update({key: file for _, key in self.pending})
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        for component, weight_map in self.shards.items():
            stem = "diffusion_pytorch_model" if component == "unet" else "model"
            index = self.folder / component / f"{stem}.safetensors.index.json"
            index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

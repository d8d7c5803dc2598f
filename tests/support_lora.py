"""Builders for LoRA tests (formats, merge, ComfyUI): random LoRAs on the tiny pipelines made with
the real peft layers, files saved by diffusers' own save_lora_weights, the key names ComfyUI
accepts (derived here from the diffusers modules by the kohya naming rule), and the original (LDM)
UNet names, checked against diffusers' own LDM converter in the tests.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from selma_toolkit.architectures import FAMILIES
from selma_toolkit.lora import LoraModule, LoraWeights, canonical_module_name

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Every kind of layer an SD UNet has that LoRA / LoCon trainers adapt: attention, projections,
# feed-forward, resnet convs (LoCon), time embeddings, samplers, in/out convs.
UNET_ALL = [
    *UNET_ATTENTION,
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "conv_in",
    "conv_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "add_embedding.linear_1",
    "add_embedding.linear_2",
]
TEXT_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# The CLIP layers ComfyUI's key map knows (comfy.lora.LORA_CLIP_MAP), written down from its docs.
COMFY_CLIP_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's text encoders by component name."""
    found = {"text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        found["text_encoder_2"] = pipe.text_encoder_2
    return found


def add_peft_lora(
    pipe,
    *,
    rank=4,
    alpha=8,
    unet_targets=UNET_ATTENTION,
    text_targets=(),
    text_rank=None,
    text_alpha=None,
    rank_pattern=None,
    alpha_pattern=None,
    seed=0,
) -> dict:
    """Give ``pipe`` a random peft LoRA ("default" adapter, both factors random so the update is
    non-zero). Text encoders get theirs with ``inject_adapter_in_model`` (``add_adapter`` fails
    with transformers 5 + peft 0.21). Returns the LoraConfig of each adapted component."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    configs = {}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(unet_targets),
        init_lora_weights=False,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    pipe.unet.add_adapter(config)
    configs["unet"] = config
    if text_targets:
        for component, encoder in text_encoders(pipe).items():
            text_config = LoraConfig(
                r=text_rank or rank,
                lora_alpha=text_alpha or alpha,
                target_modules=list(text_targets),
                init_lora_weights=False,
            )
            inject_adapter_in_model(text_config, encoder)
            configs[component] = text_config
    return configs


def save_peft_lora_with_diffusers(pipe, configs: dict, folder: Path, weight_name="lora.safetensors") -> Path:
    """The peft-layout source of truth: diffusers' own ``save_lora_weights`` of the pipeline's
    adapters, with its ``lora_adapter_metadata``."""
    from peft import get_peft_model_state_dict

    layers, metadata = {}, {}
    parts = {"unet": pipe.unet, **text_encoders(pipe)}
    for component, config in configs.items():
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(parts[component])
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, weight_name=weight_name, **layers, **metadata)
    return Path(folder) / weight_name


def peft_updates(pipe) -> dict[str, torch.Tensor]:
    """Each adapted layer's dense update scale * B @ A (float32), read from the live peft layers of
    the pipeline's one adapter, by canonical module name: what a LoRA file must reproduce."""
    from peft.tuners.lora import LoraLayer

    updates = {}
    for component, model in {"unet": pipe.unet, **text_encoders(pipe)}.items():
        for path, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and layer.lora_A:
                (adapter,) = layer.lora_A.keys()
                down = layer.lora_A[adapter].weight.detach().float()
                up = layer.lora_B[adapter].weight.detach().float()
                product = up.flatten(1) @ down.flatten(1)
                shape = (up.shape[0], *down.shape[1:])
                updates[canonical_module_name(component, path)] = layer.scaling[adapter] * product.reshape(shape)
    return updates


def random_lora(
    pipe, *, rank=4, alpha=8.0, unet_targets=UNET_ATTENTION, text_targets=(), seed=0, dtype=torch.float32
) -> LoraWeights:
    """A random LoraWeights for ``pipe`` built straight from its layer shapes (no peft), for tests
    that need many LoRAs fast (merge, ComfyUI). Conv layers get conv factors (LoCon)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    parts = {"unet": (pipe.unet, unet_targets)}
    parts.update({name: (encoder, text_targets) for name, encoder in text_encoders(pipe).items()})
    for component, (model, targets) in parts.items():
        for path, layer in model.named_modules():
            if not targets or not any(path == t or path.endswith("." + t) for t in targets):
                continue
            if isinstance(layer, torch.nn.Linear):
                down = torch.randn(rank, layer.in_features, generator=generator)
                up = torch.randn(layer.out_features, rank, generator=generator)
            elif isinstance(layer, torch.nn.Conv2d):
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
            else:
                continue
            modules[canonical_module_name(component, path)] = LoraModule(
                down.to(dtype) * 0.1, up.to(dtype) * 0.1, alpha
            )
    return LoraWeights(modules=modules)


def comfyui_accepted_keys(pipe, arch: str) -> set[str]:
    """The kohya key names ComfyUI's LoraLoader maps for this pipeline, derived from the diffusers
    modules: ``lora_unet_`` + the UNet module path with "." -> "_" (every Linear / Conv2d), and for
    the text encoders ``lora_te_`` / ``lora_te1_`` (``lora_te2_`` for SDXL's second) + ``text_model_``
    + the layer path, for the CLIP layers ComfyUI knows."""
    names = set()
    for path, layer in pipe.unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            names.add("lora_unet_" + path.replace(".", "_"))
    prefixes = {"text_encoder": ["lora_te_", "lora_te1_"], "text_encoder_2": ["lora_te2_"]}
    for component, encoder in text_encoders(pipe).items():
        for path, layer in encoder.named_modules():
            if isinstance(layer, torch.nn.Linear) and path.endswith(COMFY_CLIP_LAYERS) and ".layers." in path:
                full = path if path.startswith("text_model.") else "text_model." + path
                for prefix in prefixes[component]:
                    names.add(prefix + full.replace(".", "_"))
    return {f"{name}.{suffix}" for name in names for suffix in ("lora_down.weight", "lora_up.weight", "alpha")}


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_BASIC_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def diffusers_to_ldm(path: str, layers_per_block: int, up_has_attention: dict[int, bool]) -> str:
    """A diffusers UNet module path in the original (LDM / sgm) naming, written from the layout of
    the original UNet (input / middle / output blocks); the tests check it against diffusers'
    ``convert_ldm_unet_checkpoint``. ``up_has_attention[i]``: up block i has attentions."""
    for name, ldm in _BASIC_TO_LDM.items():
        if path == name or path.startswith(name + "."):
            return ldm + path[len(name) :]
    parts = path.split(".")
    step = layers_per_block + 1
    kind, block = parts[0], int(parts[1]) if parts[0] != "mid_block" else 0
    if kind == "mid_block":
        group, index, rest = parts[1], int(parts[2]), parts[3:]
        if group == "attentions":
            return ".".join(["middle_block.1", *rest])
        return f"middle_block.{2 * index}." + _RESNET_TO_LDM[".".join(rest)]
    group = parts[2]
    if kind == "down_blocks":
        if group == "downsamplers":
            return f"input_blocks.{1 + block * step + layers_per_block}.0.op"
        index, rest = int(parts[3]), parts[4:]
        number = 1 + block * step + index
    else:
        if group == "upsamplers":
            return f"output_blocks.{block * step + layers_per_block}.{2 if up_has_attention[block] else 1}.conv"
        index, rest = int(parts[3]), parts[4:]
        number = block * step + index
    if group == "attentions":
        return ".".join([f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{number}.1", *rest])
    return f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{number}.0." + _RESNET_TO_LDM[".".join(rest)]


# Full-size configs of the real models (public config.json values), for name tests on the meta
# device: no weights are allocated.
FULL_SIZE_UNET = {
    "sd1": dict(FAMILIES["sd1"].published_denoiser),
    "sd2": dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(FAMILIES["sdxl"].published_denoiser),
}
# CLIP-L (SD 1.x, SDXL's first), OpenCLIP-H (SD 2.x, 23 layers as shipped), OpenCLIP-bigG (SDXL's second).
FULL_SIZE_TEXT = {
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "clip_h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
    "clip_g": dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
    ),
}


def meta_unet(arch: str):
    """A full-size UNet of ``arch`` on the meta device (shapes and names, no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**FULL_SIZE_UNET[arch])


def meta_text_encoder(name: str):
    """A full-size CLIP text encoder on the meta device (clip_g with its projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**FULL_SIZE_TEXT[name])
    with torch.device("meta"):
        return CLIPTextModelWithProjection(config) if name == "clip_g" else CLIPTextModel(config)


def lora_like(unet=None, text: dict | None = None, *, rank=2, alpha=1.0) -> LoraWeights:
    """A LoRA on every Linear / Conv2d of the given (meta-device) models: names and shapes only
    matter, so the factors are zero-size-cheap empty tensors on the meta device."""
    modules = {}
    parts = ({"unet": unet} if unet is not None else {}) | dict(text or {})
    for component, model in parts.items():
        for path, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear):
                down, up = (
                    torch.empty(rank, layer.in_features, device="meta"),
                    torch.empty(layer.out_features, rank, device="meta"),
                )
            elif isinstance(layer, torch.nn.Conv2d):
                down = torch.empty(rank, layer.in_channels, *layer.kernel_size, device="meta")
                up = torch.empty(layer.out_channels, rank, 1, 1, device="meta")
            else:
                continue
            modules[canonical_module_name(component, path)] = LoraModule(down, up, alpha)
    return LoraWeights(modules=modules)


@contextlib.contextmanager
def diffusers_warnings(*, include_peft: bool = False):
    """Collect what diffusers logs at WARNING or above (its library logger does not propagate to
    the root logger) and, with ``include_peft``, the Python warnings peft raises about LoRA keys."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        if not include_peft:
            yield records
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(
            str(w.message) for w in caught if "peft" in (w.filename or "") or "lora" in str(w.message).lower()
        )
    finally:
        logger.removeHandler(handler)

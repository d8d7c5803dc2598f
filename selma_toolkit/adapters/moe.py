"""MoE-LoRA (the paper's Table 4 baseline): the skill experts kept apart, mixed per input by a gate.

For each adapted linear layer (weight W0 [out, in]) and input x [..., in]::

    y = W0 x + sum_t g_t * scale_t * B_t (A_t x),   g = softmax(gate logits) over the T experts

with each expert's A_t [r_t, in], B_t [out, r_t], scale_t = alpha_t / r_t exactly as in its file
(the experts are never merged or changed). Two gates:

* ``"layer"`` (the paper's: "a learned linear gate per layer, weights from the layer input,
  normalised, all experts active"): g = softmax(W_l x + b_l) per token, W_l [T, in] per layer;
* ``"prompt"``: one gate per prompt, g = softmax(W p + b), W [T, D], p = the mean over tokens of
  the denoiser's text conditioning ``encoder_hidden_states`` [n, L, D] (what every family passes
  the denoiser, cached or not; over the prompt's own tokens where the family passes a text mask, and
  per prompt for Z-Image's list of prompts), the same g in every layer.

The gates start at zero (g = 1/T: the experts' outputs averaged, the update of the ``delta``
merge). Only the gate is trained (selma_toolkit/train/moe.py); the file holds the experts as they
are, the gate, and metadata naming each expert by sha256::

    expert.<t>.<module>.down / .up / .alpha      expert t's factors (module: canonical name, unet.<path>)
    gate.<module>.weight / .bias                 "layer" gates ([T, in], [T])
    gate.prompt.weight / .bias                   the "prompt" gate ([T, D], [T])
    __metadata__["selma.moe"]                    JSON: format, gate, experts [{name, skill, sha256, metadata}], steps, ...

Inference cost: every adapted layer runs T LoRAs and its gate at every denoising step (a merged
LoRA runs one, or none when fused). ``load_moe(pipe, path)`` attaches it to a diffusers pipeline
(its denoiser: ``pipe.unet`` or ``pipe.transformer``); ``unload_moe(pipe)`` restores the layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.lora import LoraModule, LoraWeights, read_safetensors

MOE_FORMAT = "selma-moe/1"
MOE_KEY = "selma.moe"
GateKind = Literal["layer", "prompt"]
GATE_KINDS: tuple[str, ...] = ("layer", "prompt")
_PROMPT = "prompt"


@dataclass
class MoELora:
    """T experts (kept as they are), their gate and the record naming them.

    ``gate``: ``{"<module>.weight": [T, in], "<module>.bias": [T]}`` per adapted module for
    ``"layer"``, ``{"prompt.weight": [T, D], "prompt.bias": [T]}`` for ``"prompt"``.
    ``experts_info``: one dict per expert (name, skill, sha256, its file's metadata).
    """

    experts: list[LoraWeights]
    gate_kind: str
    gate: dict[str, torch.Tensor]
    experts_info: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.experts)

    def module_names(self) -> list[str]:
        """Every module some expert adapts, sorted."""
        return sorted({name for expert in self.experts for name in expert.modules})


def check_experts(experts: Sequence[LoraWeights], names: Sequence[str]) -> None:
    """MoE-LoRA mixes linear layers of one denoiser: refuse conv and text-encoder layers by name."""
    if len(experts) < 2:
        raise LoraFormatError(f"MoE-LoRA needs at least two experts to gate between, got {len(experts)}")
    components = set()
    for name, expert in zip(names, experts):
        for module_name, module in expert.modules.items():
            components.add(module_name.split(".", 1)[0])
            if module.is_conv:
                raise LoraFormatError(
                    f"{name}: {module_name} is a conv layer; MoE-LoRA gates linear layers only "
                    "(train the experts with the default attention targets)"
                )
            if module_name.startswith("text_encoder"):
                raise LoraFormatError(
                    f"{name}: {module_name} adapts a text encoder; MoE-LoRA gates the denoiser's "
                    "layers only (train the experts with train.train_text_encoder = false)"
                )
    if len(components) != 1:
        raise LoraFormatError(f"MoE-LoRA experts adapt several components {sorted(components)}; expected one denoiser")


def zero_gate(experts: Sequence[LoraWeights], kind: str, text_width: int | None = None) -> dict[str, torch.Tensor]:
    """Gate tensors at zero (g = 1/T everywhere). ``text_width``: D of the text conditioning, for ``"prompt"``."""
    count = len(experts)
    if kind == _PROMPT:
        if text_width is None:
            raise ValueError("a prompt gate needs the width of the text conditioning (text_width)")
        return {"prompt.weight": torch.zeros(count, text_width), "prompt.bias": torch.zeros(count)}
    if kind != "layer":
        raise ValueError(f"gate kind {kind!r}: expected one of {GATE_KINDS}")
    gate = {}
    for name in sorted({n for e in experts for n in e.modules}):
        width = next(e.modules[name].down.shape[1] for e in experts if name in e.modules)
        gate[f"{name}.weight"] = torch.zeros(count, width)
        gate[f"{name}.bias"] = torch.zeros(count)
    return gate


# ------------------------------------------------------------------------------------ layers


class PromptGate(nn.Module):
    """g = softmax(W p + b), p = mean over tokens of encoder_hidden_states; set per denoiser call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.current: torch.Tensor | None = None  # [n, T] for the running denoiser call

    def set_from(
        self, encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor | None = None
    ) -> None:
        """g from the text conditioning: [n, L, D] (mean over the tokens ``mask`` [n, L] keeps, all
        without one), or one [L_i, D] per prompt (Z-Image's transformer takes a list)."""
        if isinstance(encoder_hidden_states, torch.Tensor):
            states = encoder_hidden_states.float()
            if mask is None:
                pooled = states.mean(dim=1)
            else:
                weights = mask.to(states.device, torch.float32)[..., None]
                pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        else:
            pooled = torch.stack([state.float().mean(dim=0) for state in encoder_hidden_states])
        self.current = torch.softmax(self.linear.float()(pooled), dim=-1)


class MoELoRALinear(nn.Module):
    """A frozen linear layer plus T gated LoRA experts (see the module docstring for the formula)."""

    def __init__(
        self,
        base: nn.Linear,
        modules: Sequence[LoraModule | None],
        gate: nn.Linear | None,
        prompt_gate: PromptGate | None,
    ):
        super().__init__()
        self.base = base
        self.count = len(modules)
        self.present = [m is not None for m in modules]
        for t, module in enumerate(modules):
            if module is not None:
                self.register_buffer(f"down_{t}", module.down.float().clone(), persistent=False)
                self.register_buffer(f"up_{t}", module.up.float().clone(), persistent=False)
        self.scales = [m.scale if m is not None else 0.0 for m in modules]
        self.gate = gate  # "layer": nn.Linear(in, T); None for the prompt gate
        object.__setattr__(self, "_prompt_gate", prompt_gate)  # shared, not a submodule of every layer

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """g [..., T] broadcastable against x [..., in] (per token, or per sample of the batch)."""
        if self.gate is not None:
            return torch.softmax(self.gate.float()(x.float()), dim=-1)
        current = self._prompt_gate.current
        if current is None:
            raise RuntimeError(
                "MoE-LoRA prompt gate: no text conditioning seen (call the denoiser with encoder_hidden_states)"
            )
        if current.shape[0] != x.shape[0]:  # e.g. a batch split after the conditioning was seen
            raise RuntimeError(f"MoE-LoRA prompt gate: {current.shape[0]} prompts but a batch of {x.shape[0]} inputs")
        return current.reshape(current.shape[0], *([1] * (x.dim() - 2)), self.count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        g = self.gates(x)
        xf = x.float()
        update = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        for t in range(self.count):
            if not self.present[t]:
                continue
            down, up = getattr(self, f"down_{t}"), getattr(self, f"up_{t}")
            update = update + g[..., t : t + 1] * (self.scales[t] * ((xf @ down.T) @ up.T))
        return out + update.to(out.dtype)


@dataclass
class AttachedMoE:
    """What ``attach_moe`` changed, to read the gate back and to undo it."""

    denoiser: nn.Module
    layers: dict[str, MoELoRALinear]  # module name (without the component) -> layer
    originals: dict[str, nn.Module]
    prompt_gate: PromptGate | None
    hook: Any | None
    component: str = "unet"

    def gate_tensors(self) -> dict[str, torch.Tensor]:
        """The gate as the file stores it (see ``MoELora.gate``), float32 on the CPU."""
        if self.prompt_gate is not None:
            return {
                "prompt.weight": self.prompt_gate.linear.weight.detach().float().cpu().clone(),
                "prompt.bias": self.prompt_gate.linear.bias.detach().float().cpu().clone(),
            }
        tensors = {}
        for path, layer in self.layers.items():
            tensors[f"{self.component}.{path}.weight"] = layer.gate.weight.detach().float().cpu().clone()
            tensors[f"{self.component}.{path}.bias"] = layer.gate.bias.detach().float().cpu().clone()
        return tensors

    def detach(self) -> None:
        """Put the original layers back and remove the hook (the denoiser is as before)."""
        for path, original in self.originals.items():
            parent, _, child = path.rpartition(".")
            setattr(self.denoiser.get_submodule(parent) if parent else self.denoiser, child, original)
        if self.hook is not None:
            self.hook.remove()
        if self.prompt_gate is not None and hasattr(self.denoiser, "selma_moe_gate"):
            del self.denoiser.selma_moe_gate
        self.layers, self.originals = {}, {}


def _encoder_hidden_states(args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
    """(the denoiser call's text conditioning, the mask of its text tokens or None): the keyword
    ``encoder_hidden_states`` with Qwen-Image's ``encoder_hidden_states_mask`` or the text part of
    Chroma's ``attention_mask``; or the third positional argument (``unet(sample, t, ehs)``, Z-Image's
    ``transformer(latents, t, captions)`` with one tensor per prompt)."""
    states = kwargs.get("encoder_hidden_states")
    if states is None:
        states = args[2] if len(args) > 2 and isinstance(args[2], (torch.Tensor, list)) else None
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is None and kwargs.get("attention_mask") is not None and isinstance(states, torch.Tensor):
        mask = kwargs["attention_mask"][:, : states.shape[1]]
    return states, mask


def attach_moe(denoiser: nn.Module, moe: MoELora, *, trainable: bool = False) -> AttachedMoE:
    """Replace each adapted linear layer of ``denoiser`` (a UNet / transformer) by a MoELoRALinear;
    ``trainable``: the gate's parameters require grad (float32), everything else stays frozen."""
    names = moe.module_names()
    components = {name.split(".", 1)[0] for name in names}
    component = next(iter(components))
    prompt_gate = None
    hook = None
    if moe.gate_kind == _PROMPT:
        prompt_gate = PromptGate(moe.gate["prompt.weight"], moe.gate["prompt.bias"])
        denoiser.selma_moe_gate = prompt_gate  # a submodule: its parameters train, checkpoint and move with the model

        def pre_hook(module, args, kwargs):
            states, mask = _encoder_hidden_states(args, kwargs)
            if states is not None:
                prompt_gate.set_from(states, mask)

        hook = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    layers, originals = {}, {}
    device = next(denoiser.parameters()).device
    for name in names:
        path = name.split(".", 1)[1]
        try:
            base = denoiser.get_submodule(path)
        except AttributeError:
            raise LoraFormatError(f"MoE-LoRA: the experts adapt {name}, which this model does not have") from None
        if isinstance(base, MoELoRALinear):
            raise LoraFormatError(f"{name}: a MoE-LoRA is already attached; detach it first (unload_moe)")
        if not isinstance(base, nn.Linear):
            raise LoraFormatError(f"MoE-LoRA: {name} is a {type(base).__name__}, not a linear layer")
        gate = None
        if moe.gate_kind != _PROMPT:
            weight, bias = moe.gate[f"{name}.weight"], moe.gate[f"{name}.bias"]
            gate = nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                gate.weight.copy_(weight)
                gate.bias.copy_(bias)
        layer = MoELoRALinear(base, [e.modules.get(name) for e in moe.experts], gate, prompt_gate).to(device)
        parent, _, child = path.rpartition(".")
        setattr(denoiser.get_submodule(parent) if parent else denoiser, child, layer)
        layers[path], originals[path] = layer, base
    for module in [prompt_gate, *(layer.gate for layer in layers.values())]:
        if module is not None:
            module.to(device=device, dtype=torch.float32)
            module.requires_grad_(trainable)
    return AttachedMoE(denoiser, layers, originals, prompt_gate, hook, component)


# ------------------------------------------------------------------------------------ files


def moe_tensors(moe: MoELora) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, __metadata__) of a MoE-LoRA file (layout in the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for t, expert in enumerate(moe.experts):
        for name, module in expert.modules.items():
            tensors[f"expert.{t}.{name}.down"] = module.down.contiguous()
            tensors[f"expert.{t}.{name}.up"] = module.up.contiguous()
            tensors[f"expert.{t}.{name}.alpha"] = torch.tensor([float(module.alpha)])
    for key, value in moe.gate.items():
        tensors[f"gate.{key}"] = value.float().contiguous()
    record = {"format": MOE_FORMAT, "gate": moe.gate_kind, "experts": moe.experts_info, **moe.extra}
    return tensors, {MOE_KEY: json.dumps(record, sort_keys=True)}


def save_moe(moe: MoELora, path: str | os.PathLike[str]) -> Path:
    """Write the MoE-LoRA as one safetensors file, atomically."""
    from safetensors.torch import save

    tensors, metadata = moe_tensors(moe)
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))
    return Path(path)


def moe_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``selma.moe`` record of a file (None when it is not a MoE-LoRA file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(MOE_KEY)
    except (SafetensorError, OSError):
        return None
    return json.loads(raw) if raw else None


def is_moe_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a MoE-LoRA file (its metadata holds a ``selma.moe`` record)."""
    return moe_record(path) is not None


def read_moe(path: str | os.PathLike[str]) -> MoELora:
    """A MoE-LoRA file back into memory; refuses other files by name."""
    tensors, metadata = read_safetensors(path)
    raw = metadata.get(MOE_KEY)
    if not raw:
        raise LoraFormatError(
            f"{path}: not a MoE-LoRA file (no {MOE_KEY} metadata); a LoRA file loads with load_experts"
        )
    record = json.loads(raw)
    if record.get("format") != MOE_FORMAT:
        raise LoraFormatError(f"{path}: MoE-LoRA format {record.get('format')!r}, this toolkit reads {MOE_FORMAT}")
    info = record["experts"]
    modules: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in info]
    gate: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("gate."):
            gate[key[len("gate.") :]] = value.float()
            continue
        _, index, rest = key.split(".", 2)
        name, _, part = rest.rpartition(".")
        modules[int(index)].setdefault(name, {})[part] = value
    experts = [
        LoraWeights(
            modules={
                name: LoraModule(down=p["down"], up=p["up"], alpha=float(p["alpha"][0])) for name, p in per.items()
            },
            metadata=dict(entry.get("metadata") or {}),
        )
        for per, entry in zip(modules, info)
    ]
    extra = {k: v for k, v in record.items() if k not in ("format", "gate", "experts")}
    return MoELora(experts, record["gate"], gate, info, extra)


# ------------------------------------------------------------------------------------ diffusers


def _denoiser(pipe: Any) -> nn.Module:
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    raise LoraFormatError(f"{type(pipe).__name__}: no unet or transformer to attach a MoE-LoRA to")


def load_moe(pipe: Any, moe: MoELora | str | os.PathLike[str]) -> AttachedMoE:
    """Attach a MoE-LoRA (file or in memory) to a diffusers pipeline's denoiser; undo with unload_moe."""
    if not isinstance(moe, MoELora):
        moe = read_moe(moe)
    denoiser = _denoiser(pipe)
    if getattr(denoiser, "_selma_moe", None) is not None:
        raise LoraFormatError("a MoE-LoRA is already attached to this pipeline; call unload_moe(pipe) first")
    attached = attach_moe(denoiser, moe)
    object.__setattr__(denoiser, "_selma_moe", attached)
    return attached


def unload_moe(pipe: Any) -> bool:
    """Remove the attached MoE-LoRA (the denoiser's layers as before); False when none was attached."""
    denoiser = _denoiser(pipe)
    attached = getattr(denoiser, "_selma_moe", None)
    if attached is None:
        return False
    attached.detach()
    object.__setattr__(denoiser, "_selma_moe", None)
    return True


__all__ = [
    "GATE_KINDS",
    "MOE_FORMAT",
    "AttachedMoE",
    "MoELoRALinear",
    "MoELora",
    "PromptGate",
    "attach_moe",
    "check_experts",
    "is_moe_file",
    "load_moe",
    "moe_record",
    "read_moe",
    "save_moe",
    "unload_moe",
    "zero_gate",
]

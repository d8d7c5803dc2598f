"""Reading LoRA files: safetensors only, every layout in (:mod:`selma_toolkit.lora.keys`), and the
writing of :mod:`selma_toolkit.lora.writing` re-exported (``save_lora``, ``lora_to_state_dict``, the
layouts each family is written in).

A file's layouts are named as the writer names them: ``kohya``, ``kohya-ldm``, ``peft``,
``diffusers-attn-procs``, ``comfyui``, ``ai-toolkit``, and ``kohya-flux`` for kohya's Flux files with
BFL names (``lora.dit``); ``selma lora info`` lists them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selma_toolkit.errors import LoraFormatError, Remedy
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.dit import is_bfl_flux, is_bfl_flux2, split_bfl_flux, split_bfl_flux2
from selma_toolkit.lora.keys import module_from_key, parse_key, peft_adapter_name
from selma_toolkit.lora.metadata import PEFT_METADATA_KEY, guess_architecture, peft_alpha
from selma_toolkit.lora.safetensors_file import read_safetensors
from selma_toolkit.lora.writing import (  # noqa: F401 - the writing side, importable from here as before
    WRITE_FORMATS,
    LoraLayout,
    lora_family,
    lora_to_state_dict,
    resolve_layout,
    save_lora,
)

logger = logging.getLogger(__name__)


@dataclass
class LoraFileInfo:
    """What ``selma lora info`` shows: the file's layouts, the LoRA read from it, its metadata."""

    path: Path
    layouts: list[str]
    weights: LoraWeights
    architecture: str | None
    file_metadata: dict[str, str]


# ------------------------------------------------------------------------------------ reading


def load_lora(
    path: str | os.PathLike[str],
    *,
    component: str | None = None,
    alpha: float | None = None,
    ldm_layers_per_block: int = 2,
    drop_bias_diffs: bool = False,
) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file of any layout in :mod:`selma_toolkit.lora.keys`.

    Pickle files (.bin / .ckpt / .pt / .pth) are refused: unpickling can run arbitrary code. A
    truncated file, a header that lies about sizes, or a file with no LoRA keys raises
    :class:`LoraFormatError` naming the file. Options as in :func:`lora_from_state_dict`.
    """
    return inspect_lora(
        path,
        component=component,
        alpha=alpha,
        ldm_layers_per_block=ldm_layers_per_block,
        drop_bias_diffs=drop_bias_diffs,
    ).weights


def inspect_lora(path: str | os.PathLike[str], **options: Any) -> LoraFileInfo:
    """Read a LoRA file and say what it is: layouts found, weights, architecture guess, metadata."""
    path = Path(path)
    state_dict, metadata = read_safetensors(path)
    weights, layouts = _read_state_dict(state_dict, metadata, source=str(path), **options)
    return LoraFileInfo(path, sorted(layouts), weights, guess_architecture(weights), metadata)


def lora_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    source: str = "state dict",
    component: str | None = None,
    alpha: float | Mapping[str, float] | None = None,
    ldm_layers_per_block: int = 2,
    drop_bias_diffs: bool = False,
) -> LoraWeights:
    """Any LoRA state dict -> :class:`LoraWeights` (tensors kept as they are, not copied).

    ``component`` names the model part of peft keys without a prefix (as
    ``peft.get_peft_model_state_dict(unet)`` returns them). Alpha of a module comes from, in order:
    its ``.alpha`` tensor; diffusers' ``lora_adapter_metadata`` in ``metadata``; ``alpha`` (a number,
    or a dict by canonical module name); else alpha = rank, as diffusers and kohya assume.
    ``ldm_layers_per_block`` is the UNet's layers per block for files with original (LDM) UNet
    names (2 for every SD 1.x / 2.x / SDXL model). Dense weight differences (``.diff``) become exact
    full-rank modules; bias and norm differences (``.diff_b``, ``.w_norm``, ComfyUI's trainer writes
    them) cannot be carried by a LoRA: all-zero ones are dropped, others raise unless
    ``drop_bias_diffs``. ``source`` names the input in messages.
    """
    weights, _ = _read_state_dict(
        state_dict,
        dict(metadata or {}),
        source=source,
        component=component,
        alpha=alpha,
        ldm_layers_per_block=ldm_layers_per_block,
        drop_bias_diffs=drop_bias_diffs,
    )
    return weights


def _read_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    *,
    source: str,
    component: str | None = None,
    alpha: float | Mapping[str, float] | None = None,
    ldm_layers_per_block: int = 2,
    drop_bias_diffs: bool = False,
) -> tuple[LoraWeights, set[str]]:
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    layouts: set[str] = set()
    adapters: set[str] = set()
    unknown: list[str] = []
    if is_bfl_flux2(state_dict, metadata):  # FLUX.2 in BFL's names (ai-toolkit, ComfyUI): diffusers' modules first
        state_dict = split_bfl_flux2(state_dict)
    elif is_bfl_flux(state_dict):  # kohya's Flux names (fused qkv...): split into diffusers' modules first
        state_dict = split_bfl_flux(state_dict)
        layouts.add("kohya-flux")
    for key, tensor in state_dict.items():
        try:
            parsed = parse_key(key)
            if parsed is None:
                unknown.append(key)
                continue
            spelling, role = parsed
            name, layout = module_from_key(spelling, component=component, ldm_layers_per_block=ldm_layers_per_block)
        except LoraFormatError as exc:
            raise exc.within(source) from None
        layouts.add(layout)
        if (adapter := peft_adapter_name(key)) is not None:
            adapters.add(adapter)
        if role in groups[name]:
            raise LoraFormatError(
                f"{source}: module {name} appears twice ({groups[name][role][0]!r} and {key!r}); a file must "
                "spell each module once"
            )
        groups[name][role] = (key, tensor)
    _check_keys(source, state_dict, unknown, groups, adapters)

    config = _peft_config(metadata, source)
    modules: dict[str, LoraModule] = {}
    bias_diffs: list[str] = []
    for name, parts in groups.items():
        if "bias_diff" in parts:
            bias_diffs.append(parts.pop("bias_diff")[0])
        if "diff" in parts and parts["diff"][1].dim() < 2:
            bias_diffs.append(parts.pop("diff")[0])
        if not parts:
            continue
        module = _module(source, name, parts)
        if "alpha" not in parts and "diff" not in parts:
            module.alpha = _alpha_without_tensor(name, module.rank, config, alpha, component)
        modules[name] = module
    _handle_bias_diffs(source, state_dict, bias_diffs, drop_bias_diffs)
    if not modules:
        raise LoraFormatError(f"{source}: holds only bias / norm differences and no LoRA module")
    kept = {key: value for key, value in metadata.items() if key != "format"}
    return LoraWeights(modules=dict(sorted(modules.items())), metadata=kept), layouts


def _check_keys(source, state_dict, unknown, groups, adapters) -> None:
    if unknown and not groups:
        examples = ", ".join(repr(key) for key in unknown[:3])
        raise LoraFormatError(
            f"{source}: not a LoRA: none of its {len(state_dict)} tensors has a LoRA key (e.g. {examples}); "
            "expected keys such as 'lora_unet_..._to_q.lora_down.weight' or 'unet....to_q.lora_A.weight'. "
            "Is this a full model checkpoint?"
        )
    if unknown:
        examples = ", ".join(repr(key) for key in unknown[:5])
        raise LoraFormatError(
            f"{source}: {len(unknown)} of {len(state_dict)} keys are in no LoRA layout this toolkit reads: "
            f"{examples}; expected lora_down/lora_up/alpha (kohya) or lora_A/lora_B (peft) keys"
        )
    if len(adapters) > 1:
        raise LoraFormatError(
            f"{source}: holds several peft adapters ({', '.join(sorted(adapters))}); save one adapter per file"
        )


def _module(source: str, name: str, parts: dict[str, tuple[str, torch.Tensor]]) -> LoraModule:
    if "diff" in parts:
        if set(parts) - {"diff", "alpha"}:
            raise LoraFormatError(f"{source}: module {name} has both a full difference and LoRA factors")
        return full_rank_module(parts["diff"][1])
    missing = {"down", "up"} - set(parts)
    if missing:
        present = ", ".join(key for key, _ in parts.values())
        raise LoraFormatError(
            f"{source}: module {name} lacks its {' and '.join(sorted(missing))} matrix (found only {present}); "
            "the file is incomplete"
        )
    down, up = parts["down"][1], parts["up"][1]
    shapes_ok = (down.dim() == up.dim() == 2) or (down.dim() == up.dim() == 4 and tuple(up.shape[2:]) == (1, 1))
    if not shapes_ok or down.shape[0] != up.shape[1]:
        raise LoraFormatError(
            f"{source}: module {name}: down {tuple(down.shape)} and up {tuple(up.shape)} do not form a LoRA "
            "(expected down [r, in] and up [out, r], or conv down [r, in, kh, kw] and up [out, r, 1, 1])"
        )
    alpha_value = float(parts["alpha"][1].item()) if "alpha" in parts else float(down.shape[0])
    return LoraModule(down=down, up=up, alpha=alpha_value)


def full_rank_module(diff: torch.Tensor) -> LoraModule:
    """A dense difference D as an exact LoRA: B @ A = D with one factor the identity."""
    out_features, in_flat = diff.shape[0], diff[0].numel()
    if diff.dim() == 2 and in_flat <= out_features:
        down, up = torch.eye(in_flat, dtype=diff.dtype), diff
    else:
        down = diff
        up = torch.eye(out_features, dtype=diff.dtype)
        if diff.dim() == 4:
            up = up.reshape(out_features, out_features, 1, 1)
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


def _peft_config(metadata: Mapping[str, str], source: str) -> dict[str, Any] | None:
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFormatError(f"{source}: metadata {PEFT_METADATA_KEY!r} is not valid JSON") from None
    return config if isinstance(config, dict) else None


def _alpha_without_tensor(name, rank, config, alpha, component) -> float:
    if config is not None and (found := peft_alpha(config, name, rank, component)) is not None:
        return found
    if isinstance(alpha, Mapping):
        return float(alpha.get(name, rank))
    return float(alpha) if alpha is not None else float(rank)


def _handle_bias_diffs(source: str, state_dict, keys: list[str], drop: bool) -> None:
    nonzero = [key for key in keys if bool(state_dict[key].any())]
    if nonzero and not drop:
        raise LoraFormatError(
            what=f"{len(nonzero)} bias / norm differences (e.g. {nonzero[0]!r}, as ComfyUI's LoRA trainer writes) "
            "cannot be carried by a LoRA",
            where=source,
            remedies=[Remedy.set("drop_bias_diffs", True, note="the result then differs from the file")],
        )
    if nonzero:
        logger.warning("%s: dropped %d non-zero bias / norm differences (e.g. %s)", source, len(nonzero), nonzero[0])

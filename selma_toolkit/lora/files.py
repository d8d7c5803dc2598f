"""Reading and writing LoRA files: safetensors only, every layout in, kohya or peft out.

The default written layout (format "kohya") is the one that both diffusers' ``load_lora_weights``
and ComfyUI's LoraLoader load, per family (``Family.default_layout``):

* SD 1.x / 2.x / XL: kohya's (``lora_unet_...lora_down.weight`` / ``lora_up.weight`` / ``alpha``).
  ComfyUI maps every key of it, while it skips peft-named UNet attention keys (ComfyUI issues
  #1144, #9753).
* SD 3 / Flux: diffusers' names, ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight``, with
  each module's scale alpha / r folded into B (so alpha = rank and no ``.alpha`` tensor). For these
  models ComfyUI's key map (comfy/lora.py ``model_lora_keys_unet``) takes ``transformer.<diffusers
  path>`` through ``flux_to_diffusers`` / ``mmdit_to_diffusers``, q/k/v slices of its fused layers
  included; diffusers reads it natively (its SD 3 loader has no kohya reader at all, its Flux kohya
  reader knows only some ``lora_transformer_`` names). ComfyUI reads a missing ``.alpha`` as scale
  1 and ignores ``lora_adapter_metadata``, so folding is what makes both agree for any alpha.
  kohya's own Flux layout (BFL names, fused qkv) would need the q/k/v LoRAs fused into one of
  three times the rank; files in it are read (``lora.dit``), not written.

The peft layout is written on request, with diffusers' ``lora_adapter_metadata`` so that alpha
survives (diffusers reads it; ComfyUI does not).

diffusers has ``convert_state_dict_to_kohya``, but it is not used: it needs diffusers at import
(this package also runs inside ComfyUI without it), it writes alpha = rank whatever lora_alpha was
(a LoRA with alpha != rank comes back at the wrong strength), and it needs the ``unet.`` prefix.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from selma_toolkit.errors import LoraFormatError, Remedy
from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES, Family, get_family
from selma_toolkit.lora.dit import is_bfl_flux, split_bfl_flux
from selma_toolkit.lora.keys import kohya_module_name, module_from_key, parse_key, peft_adapter_name
from selma_toolkit.lora.metadata import PEFT_METADATA_KEY, file_metadata, guess_architecture, peft_adapter_metadata, peft_alpha
from selma_toolkit.lora.safetensors_file import read_safetensors

logger = logging.getLogger(__name__)

LoraLayout = Literal["kohya", "peft"]
WRITE_FORMATS: tuple[str, ...] = ("kohya", "peft")


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
        path, component=component, alpha=alpha, ldm_layers_per_block=ldm_layers_per_block, drop_bias_diffs=drop_bias_diffs
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
        state_dict, dict(metadata or {}), source=source, component=component, alpha=alpha,
        ldm_layers_per_block=ldm_layers_per_block, drop_bias_diffs=drop_bias_diffs,
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
    if is_bfl_flux(state_dict):  # kohya's Flux names (fused qkv...): split into diffusers' modules first
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
        return _full_rank_module(parts["diff"][1])
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


def _full_rank_module(diff: torch.Tensor) -> LoraModule:
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
            "cannot be carried by a LoRA", where=source,
            remedies=[Remedy.set("drop_bias_diffs", True, note="the result then differs from the file")],
        )
    if nonzero:
        logger.warning("%s: dropped %d non-zero bias / norm differences (e.g. %s)", source, len(nonzero), nonzero[0])


# ------------------------------------------------------------------------------------ writing


def lora_to_state_dict(weights: LoraWeights, format: LoraLayout = "kohya") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``weights`` in a file layout: (tensors, layout-specific metadata entries).

    ``kohya``: ``lora_unet_<path>`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` with two text
    encoders) + ``.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], ``.alpha`` (float32
    scalar); text-encoder names keep ``text_model``. For SD 3 / Flux LoRAs (their family's
    ``default_layout`` "diffusers", see the module docstring) ``<component>.<path>.lora_A.weight`` /
    ``.lora_B.weight`` with B <- (alpha / r) B and alpha = r. ``peft``: ``<component>.<path>.lora_A.weight`` /
    ``.lora_B.weight``, and diffusers' ``lora_adapter_metadata`` (alpha lives only there).
    """
    _, tensors, extra = _layout(weights, format)
    return tensors, extra


def _layout(weights: LoraWeights, format: LoraLayout) -> tuple[LoraWeights, dict[str, torch.Tensor], dict[str, str]]:
    """(``weights`` as the file holds them: scales folded for the diffusers layout, the tensors,
    the layout's metadata entries); the family is guessed once (it reads every module name)."""
    if format not in WRITE_FORMATS:
        raise LoraFormatError(f"format {format!r}: expected one of {', '.join(WRITE_FORMATS)}")
    if not weights.modules:
        raise LoraFormatError("the LoRA has no modules; nothing to write")
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, str] = {}
    family = _kohya_family(weights) if format == "kohya" else None
    if family is not None and family.default_layout == "diffusers":
        weights = _folded(weights)
        for name, module in weights.modules.items():
            tensors[f"{name}.lora_A.weight"] = module.down
            tensors[f"{name}.lora_B.weight"] = module.up
        extra[PEFT_METADATA_KEY] = json.dumps(peft_adapter_metadata(weights), indent=2, sort_keys=True)
    elif family is not None:
        for name, (module, write_alpha) in _kohya_modules(weights).items():
            key = kohya_module_name(name, family=family)
            tensors[f"{key}.lora_down.weight"] = module.down
            tensors[f"{key}.lora_up.weight"] = module.up
            if write_alpha:
                tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    else:
        for name, module in weights.modules.items():
            tensors[f"{name}.lora_A.weight"] = module.down
            tensors[f"{name}.lora_B.weight"] = module.up
        extra[PEFT_METADATA_KEY] = json.dumps(peft_adapter_metadata(weights), indent=2, sort_keys=True)
    # safetensors stores each tensor whole and refuses views that share memory.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    return weights, tensors, extra


def _folded(weights: LoraWeights) -> LoraWeights:
    return LoraWeights(modules={name: _fold_scale(m) for name, m in weights.modules.items()}, metadata=weights.metadata)


def _fold_scale(module: LoraModule) -> LoraModule:
    """The same update with alpha = r: B <- (alpha / r) B (unchanged when the scale is 1)."""
    if module.scale == 1.0:
        return module
    return LoraModule(down=module.down, up=(module.up.float() * module.scale).to(module.up.dtype), alpha=float(module.rank))


def _kohya_family(weights: LoraWeights) -> Family:
    """The family whose kohya text-encoder prefixes (and default layout) a file gets: the guessed
    one, else the first family (sd1, sd2, sdxl, sd3, flux) that has every model part the LoRA adapts."""
    guessed = guess_architecture(weights)
    if guessed is not None:
        return get_family(guessed)
    components = weights.components()
    return next(FAMILIES[name] for name in FAMILY_NAMES if components <= set(FAMILIES[name].components))


def _kohya_modules(weights: LoraWeights) -> dict[str, tuple[LoraModule, bool]]:
    """Modules as kohya files carry them, and whether to write their ``.alpha``.

    diffusers' kohya reader gives a component one alpha and lists the modules that differ in
    ``alpha_pattern`` under names that never match its attention layers, so those would load at
    the component's common alpha. Hence, per component with mixed alphas: when every alpha equals
    its rank, no ``.alpha`` is written (kohya, diffusers and ComfyUI all read that as alpha = rank,
    exactly); otherwise the odd modules get the common alpha and their B is rescaled by
    alpha / common, which keeps scale * B @ A up to float rounding.
    """
    out: dict[str, tuple[LoraModule, bool]] = {}
    for component in sorted(weights.components()):
        modules = {name: m for name, m in weights.modules.items() if name.split(".", 1)[0] == component}
        alphas = {float(m.alpha) for m in modules.values()}
        if len(alphas) == 1:
            out.update({name: (m, True) for name, m in modules.items()})
        elif all(float(m.alpha) == m.rank for m in modules.values()):
            out.update({name: (m, False) for name, m in modules.items()})
        else:
            common = _most_common_alpha(modules.values())
            changed = 0
            for name, m in modules.items():
                if float(m.alpha) != common:
                    up = (m.up.float() * (float(m.alpha) / common)).to(m.up.dtype)
                    m = LoraModule(down=m.down, up=up, alpha=common)
                    changed += 1
                out[name] = (m, True)
            logger.info("%s: %d modules rescaled to the common alpha %s for diffusers' kohya reader", component, changed, common)
    return {name: out[name] for name in weights.modules}


def _most_common_alpha(modules) -> float:
    counts = Counter(float(m.alpha) for m in modules)
    return max(counts, key=lambda alpha: (counts[alpha], alpha))


def save_lora(
    weights: LoraWeights,
    path: str | os.PathLike[str],
    format: LoraLayout = "kohya",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights`` to ``path`` (.safetensors) atomically, in the kohya (default) or peft layout.

    ``__metadata__``: ``weights.metadata`` updated with ``metadata`` (see
    :func:`selma_toolkit.lora.metadata.lora_metadata`), with rank, alpha, targets, architecture,
    toolkit version and the kohya ``ss_*`` / ModelSpec fields recomputed from the tensors.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files are written as .safetensors; give a path ending in .safetensors")
    written, tensors, extra = _layout(weights, format)  # written: rank / alpha as the file has them
    header = {**file_metadata(written, metadata), **extra, "format": "pt"}
    atomic_write_bytes(path, save(tensors, metadata=header))
    logger.debug("wrote %d modules (%s layout) to %s", len(weights.modules), format, path)
    return path

"""Writing LoRA files in the layouts each family's ecosystem reads: the layout written is the one
named, and ``selma lora info`` names it the same way when it reads the file back.

Each family lists its layouts (``Family.layouts``, the default first); each is one that both
diffusers' ``load_lora_weights`` and ComfyUI's LoraLoader load for that family:

* ``kohya`` (SD 1.x / 2.x / XL, the default): ``lora_unet_...lora_down.weight`` / ``lora_up.weight``
  / ``alpha``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text encoders. ComfyUI maps every
  key of it, while it skips peft-named UNet attention keys (ComfyUI issues #1144, #9753). No DiT
  family offers it: diffusers' SD 3 loader reads no kohya names, its Flux kohya reader only some,
  and kohya's own Flux / FLUX.2 names fuse q/k/v (written here only as ai-toolkit's, below).
* ``peft`` (the default of SD 3, Flux and Chroma): ``<component>.<diffusers path>.lora_A.weight`` /
  ``.lora_B.weight``, as diffusers' ``save_lora_weights`` writes, with its ``lora_adapter_metadata``.
  ComfyUI maps ``transformer.<diffusers path>`` for SD 3 (``mmdit_to_diffusers``), Flux and Chroma
  (``flux_to_diffusers``: Chroma is a Flux model there) and Qwen-Image, and newer ComfyUI for
  Z-Image (``z_image_to_diffusers``). ComfyUI ignores ``lora_adapter_metadata`` and reads a missing
  ``.alpha`` as scale 1, so for the DiT families each module's scale alpha / r is folded into B
  (alpha = rank): every reader gets the same update for any alpha. For the UNet families alpha
  stays in the metadata, as diffusers writes it.
* ``ai-toolkit`` (the default of Qwen-Image, Z-Image and FLUX.2 [klein]): ``diffusion_model.<path>
  .lora_A.weight`` / ``.lora_B.weight``, scale folded, the path as ai-toolkit's model names it:
  diffusers' for Qwen-Image and Z-Image; BFL's for FLUX.2, whose double blocks fuse q/k/v
  (``lora.dit.fuse_flux2``: three LoRAs become one of their summed rank, exactly). diffusers reads
  it through ``_convert_non_diffusers_qwen_lora_to_diffusers`` / ``..._z_image_...`` /
  ``..._flux2_...``; ComfyUI maps ``diffusion_model.<its own module name>`` for every model, which
  are diffusers' names for Qwen-Image (0.3.64) and BFL's for FLUX.2, and ``diffusion_model.<diffusers
  path>`` for Z-Image through ``z_image_to_diffusers`` (ComfyUI versions with Z-Image; not 0.3.64).

diffusers has ``convert_state_dict_to_kohya``, but it is not used: it needs diffusers at import
(this package also runs inside ComfyUI without it), it writes alpha = rank whatever lora_alpha was
(a LoRA with alpha != rank comes back at the wrong strength), and it needs the ``unet.`` prefix.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES, Family, get_family
from selma_toolkit.errors import LoraFormatError, Option, Remedy
from selma_toolkit.io import atomic_write_bytes
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.dit import fuse_flux2
from selma_toolkit.lora.keys import kohya_module_name
from selma_toolkit.lora.metadata import PEFT_METADATA_KEY, file_metadata, guess_architecture, peft_adapter_metadata

logger = logging.getLogger("selma_toolkit.lora.files")

LoraLayout = Literal["kohya", "peft", "ai-toolkit"]
WRITE_FORMATS: tuple[str, ...] = ("kohya", "peft", "ai-toolkit")
AI_TOOLKIT_PREFIX = "diffusion_model."


def lora_family(weights: LoraWeights) -> Family:
    """The family a LoRA is written for: the guessed one, else the first family (sd1, sd2, sdxl,
    sd3, flux, ...) that has every model part the LoRA adapts."""
    guessed = guess_architecture(weights)
    if guessed is not None:
        return get_family(guessed)
    components = weights.components()
    return next(FAMILIES[name] for name in FAMILY_NAMES if components <= set(FAMILIES[name].components))


def resolve_layout(weights: LoraWeights, format: str | None = None) -> str:
    """The layout a file of ``weights`` is written in: ``format``, or the family's default when None.
    A layout the family's readers do not share raises :class:`LoraFormatError` naming the ones it has."""
    return _layout_for(weights, format, lora_family(weights))


def _layout_for(weights: LoraWeights, format: str | None, family: Family) -> str:
    if format is None:
        return family.default_layout
    if format not in WRITE_FORMATS:
        raise LoraFormatError(
            what=f"is not a LoRA layout; expected one of {', '.join(WRITE_FORMATS)}",
            where=Option("format"),
            found=format,
            remedies=[Remedy.unset("format", note="the family's own")],
        )
    if format not in family.layouts:
        raise LoraFormatError(
            what=f"{family.title} LoRAs are written as {' or '.join(family.layouts)} (the layouts both diffusers "
            f"and ComfyUI read for {family.title}), not {format}",
            where=Option("format"),
            found=format,
            remedies=[Remedy.set("format", family.default_layout), Remedy.unset("format", note="the family's default")],
        )
    return format


def lora_to_state_dict(
    weights: LoraWeights, format: LoraLayout | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``weights`` in a file layout (None: the family's default; see the module docstring):
    (tensors, layout-specific metadata entries)."""
    _, tensors, extra, _ = _layout(weights, format)
    return tensors, extra


def _layout(
    weights: LoraWeights, format: str | None
) -> tuple[LoraWeights, dict[str, torch.Tensor], dict[str, str], str]:
    """(``weights`` as the file holds them: scales folded where the layout needs it, the tensors,
    the layout's metadata entries, the layout); the family is guessed once (it reads every module name)."""
    if not weights.modules:
        raise LoraFormatError("the LoRA has no modules; nothing to write")
    family = lora_family(weights)
    layout = _layout_for(weights, format, family)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, str] = {}
    if layout == "kohya":
        for name, (module, write_alpha) in _kohya_modules(weights).items():
            key = kohya_module_name(name, family=family)
            tensors[f"{key}.lora_down.weight"] = module.down
            tensors[f"{key}.lora_up.weight"] = module.up
            if write_alpha:
                tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    else:
        if family.denoiser != "unet":  # ComfyUI reads these names for the DiT families, alpha not
            weights = LoraWeights({n: _fold_scale(m) for n, m in weights.modules.items()}, weights.metadata)
        if layout == "peft":
            for name, module in weights.modules.items():
                tensors[f"{name}.lora_A.weight"] = module.down
                tensors[f"{name}.lora_B.weight"] = module.up
            extra[PEFT_METADATA_KEY] = json.dumps(peft_adapter_metadata(weights), indent=2, sort_keys=True)
        else:
            tensors = _ai_toolkit_tensors(weights, family)
    # safetensors stores each tensor whole and refuses views that share memory.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    return weights, tensors, extra, layout


def _ai_toolkit_tensors(weights: LoraWeights, family: Family) -> dict[str, torch.Tensor]:
    """``diffusion_model.<path>.lora_A/B.weight`` (scales already folded), the path in diffusers' or,
    for FLUX.2, BFL's names (q/k/v fused)."""
    others = sorted(name for name in weights.modules if name.split(".", 1)[0] != family.denoiser)
    if others:
        raise LoraFormatError(
            what=f"ai-toolkit's layout holds the {family.denoiser} only; this LoRA also adapts {others[0]}",
            where=Option("format"),
            found="ai-toolkit",
            remedies=[Remedy.set("format", "peft")],
        )
    modules = {name.split(".", 1)[1]: (m.down, m.up) for name, m in weights.modules.items()}
    if family.native_names == "bfl-flux2":
        try:
            modules = fuse_flux2(modules)
        except ValueError as exc:
            raise LoraFormatError(
                what=f"cannot be written in FLUX.2's BFL names: {exc}",
                where=Option("format"),
                found="ai-toolkit",
                remedies=[Remedy.set("format", "peft")],
            ) from None
    tensors: dict[str, torch.Tensor] = {}
    for path, (down, up) in modules.items():
        tensors[f"{AI_TOOLKIT_PREFIX}{path}.lora_A.weight"] = down
        tensors[f"{AI_TOOLKIT_PREFIX}{path}.lora_B.weight"] = up
    return tensors


def _fold_scale(module: LoraModule) -> LoraModule:
    """The same update with alpha = r: B <- (alpha / r) B (unchanged when the scale is 1)."""
    if module.scale == 1.0:
        return module
    return LoraModule(
        down=module.down, up=(module.up.float() * module.scale).to(module.up.dtype), alpha=float(module.rank)
    )


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
            logger.info(
                "%s: %d modules rescaled to the common alpha %s for diffusers' kohya reader", component, changed, common
            )
    return {name: out[name] for name in weights.modules}


def _most_common_alpha(modules) -> float:
    counts = Counter(float(m.alpha) for m in modules)
    return max(counts, key=lambda alpha: (counts[alpha], alpha))


def save_lora(
    weights: LoraWeights,
    path: str | os.PathLike[str],
    format: LoraLayout | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``weights`` to ``path`` (.safetensors) atomically, in ``format`` (kohya, peft or
    ai-toolkit; None: the family's default layout, see the module docstring).

    ``__metadata__``: ``weights.metadata`` updated with ``metadata`` (see
    :func:`selma_toolkit.lora.metadata.lora_metadata`), with rank, alpha, targets, architecture,
    toolkit version and the kohya ``ss_*`` / ModelSpec fields recomputed from the tensors.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files are written as .safetensors; give a path ending in .safetensors")
    written, tensors, extra, layout = _layout(weights, format)  # written: rank / alpha as the file has them
    header = {**file_metadata(written, metadata), **extra, "format": "pt"}
    atomic_write_bytes(path, save(tensors, metadata=header))
    logger.debug("wrote %d modules (%s layout) to %s", len(weights.modules), layout, path)
    return path

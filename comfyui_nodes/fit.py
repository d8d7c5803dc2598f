"""Whether a LoRA fits the MODEL and CLIP it is applied to, by ComfyUI's own key maps, and applying it.

ComfyUI's LoraLoader patches what it can and only logs the rest ("lora key not loaded", invalid
shapes), so a LoRA made for another model renders an image anyway. The nodes run ComfyUI's key map
and patch maker first, silently, and refuse a LoRA of which any tensor lands on no layer or on a
layer of another shape; nothing is patched (or saved, or emitted as a stack entry) then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from selma_toolkit.architectures import family_of_comfy_model
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.expert_fit import LayerMisfit, layer_misfits, shown_lines
from selma_toolkit.lora import guess_architecture, lora_from_state_dict


def lora_architecture(lora: dict) -> str | None:
    """sd1 / sd2 / sdxl / sd3 / flux for a LORA_MODEL, or None when its layout or architecture is not recognised."""
    try:
        return guess_architecture(lora_from_state_dict(lora, getattr(lora, "metadata", None), source="the LoRA input"))
    except LoraFormatError:
        return None  # another tool's layout: ComfyUI may still map it, so only ComfyUI's key map decides


def _mapped_prefix(key: str, key_map: Mapping[str, Any]) -> str | None:
    """The longest dotted prefix of a LoRA tensor key that ComfyUI's key map knows
    (``lora_unet_x.lora_down.weight`` -> ``lora_unet_x``), or None."""
    cut = len(key)
    while (cut := key.rfind(".", 0, cut)) > 0:
        if key[:cut] in key_map:
            return key[:cut]
    return None


def _lora_factor_shape(patch: Any) -> tuple[int, ...] | None:
    """The weight shape a ComfyUI LoRA patch's factors make ([out, in...]), or None for another kind of
    patch (LoHa, LoKr, diff...) or a LoRA with a mid (Tucker) factor or a reshape, checked by ComfyUI.

    ComfyUI 0.3.x makes a ``weight_adapter.LoRAAdapter`` (``name`` "lora", ``weights`` = (up, down,
    alpha, mid, dora_scale, reshape)); older releases a tuple ``("lora", weights)``."""
    if getattr(patch, "name", None) == "lora" and hasattr(patch, "weights"):
        weights = patch.weights
    elif isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    else:
        return None
    up, down = weights[0], weights[1]
    if any(len(weights) > i and weights[i] is not None for i in (3, 5)):
        return None
    return (int(up.shape[0]), *(int(d) for d in down.shape[1:]))


def _target_shape(target: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of a key-map target: a weight key, or (key, (dim, start, length)) for a slice of it."""
    if isinstance(target, tuple):
        key, offset = target[0], (target[1] if len(target) > 1 else None)
    else:
        key, offset = target, None
    shape = shapes.get(key)
    if shape is None or not offset:
        return shape
    sliced = list(shape)
    sliced[offset[0]] = offset[2]
    return tuple(sliced)


def comfy_lora_fit(
    lora: Mapping[str, Any],
    key_map: Mapping[str, Any],
    patches: Mapping[Any, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[list[str], list[LayerMisfit]]:
    """How a LORA_MODEL lands on a model, from ComfyUI's own key map (``comfy.lora.model_lora_keys_unet``
    / ``_clip``: LoRA key prefix -> model weight key), the patches ``comfy.lora.load_lora`` made from it
    (model weight key -> patch) and the model's weight shapes (``state_dict`` key -> shape).

    Returns (the LoRA's tensor keys that load onto no layer, which ComfyUI would only log as
    "lora key not loaded"; the layers whose update has another shape than the model's weight, which
    ComfyUI would log as an invalid shape and skip), in the LoRA's order."""
    unmatched: list[str] = []
    adapted: dict[str, tuple[int, ...]] = {}
    layers: dict[str, tuple[int, ...]] = {}
    seen: set[str] = set()
    for key in lora:
        prefix = _mapped_prefix(key, key_map)
        if prefix is None or key_map[prefix] not in patches:
            unmatched.append(key)
            continue
        if prefix in seen:
            continue
        seen.add(prefix)
        factors = _lora_factor_shape(patches[key_map[prefix]])
        target = _target_shape(key_map[prefix], shapes)
        if factors is not None and target is not None:
            adapted[prefix], layers[prefix] = factors, target
    return unmatched, layer_misfits(adapted, layers, flatten=True)


def check_lora_fits(
    lora: dict, model_name: str, *, matched: int, unmatched: Sequence[str] = (), misfits: Sequence[LayerMisfit] = ()
) -> None:
    """Raise LoraFormatError when a LORA_MODEL does not fit the MODEL / CLIP it is applied to (nothing is
    patched then): none of its keys matched (``matched``: layers ComfyUI's key map found), its
    architecture is another one than the model's (``model_name``: ComfyUI's model config class, e.g.
    SD15), some of its tensors load onto no layer (``unmatched``), or some layers have other shapes
    (``misfits``; see :func:`comfy_lora_fit`). The message names the first keys and shapes."""
    architecture = lora_architecture(lora)
    family = family_of_comfy_model(model_name)  # ComfyUI's model config class (SD15, SDXL...) -> our family
    expected = family.name if family is not None else None
    if matched == 0:
        example = next(iter(lora), "(none)")
        raise LoraFormatError(
            f"none of the LoRA's {len(lora)} tensors (e.g. {example!r}) matches a layer of this "
            f"{model_name} model or its CLIP; the LoRA is for {architecture or 'another kind of model'}. "
            "Merge experts trained for this checkpoint's architecture"
        )
    if architecture and expected and architecture != expected:
        raise LoraFormatError(
            f"the LoRA is for {architecture} but the MODEL is {model_name} ({expected}); only the "
            "layers that happen to share names would change, with mismatched shapes. Merge experts trained for "
            f"{expected}, or load a {architecture} checkpoint"
        )
    if not unmatched and not misfits:
        return
    found = []
    if misfits:
        found.append(f"{len(misfits)} of the {matched} layers it patches have another shape in the model")
    if unmatched:
        found.append(f"{len(unmatched)} of its {len(lora)} tensors load onto no layer of the model or its CLIP")
    lines = [misfit.describe("this model") for misfit in misfits[:5]]
    lines += [f"{key}: no such layer in this model or its CLIP" for key in unmatched[:5]]
    more = len(misfits) - min(len(misfits), 5) + len(unmatched) - min(len(unmatched), 5)
    raise LoraFormatError(
        f"the LoRA does not fit this {model_name} model: {' and '.join(found)}:\n"
        f"{shown_lines(lines, shown=len(lines))}"
        + (f"\n  ... ({more} more)" if more else "")
        + "\nIt was made for another model (another size of the same architecture, e.g. the tiny:sd1 test model or "
        "a distilled model instead of SD 1.5, or another architecture); nothing was patched. Merge experts trained "
        "for this checkpoint, or load the checkpoint they were trained for"
    )


def weight_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """``state_dict`` key -> weight shape of a torch module (ComfyUI's key maps name these keys)."""
    return {key: tuple(int(d) for d in value.shape) for key, value in module.state_dict().items()}


def check_fits(model: Any, clip: Any, lora: dict) -> None:
    """Raise LoraFormatError unless every tensor of ``lora`` maps onto a layer of ``model`` (ComfyUI's
    ModelPatcher) or ``clip`` with the layer's shape. The key map and matching are ComfyUI's own,
    what ``comfy.sd.load_lora_for_models`` does next, run here silently first."""
    import comfy.lora
    import comfy.lora_convert

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(lora)
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    shapes = {**weight_shapes(model.model), **weight_shapes(clip.cond_stage_model)}
    unmatched, misfits = comfy_lora_fit(converted, key_map, patches, shapes)
    check_lora_fits(
        lora, type(model.model.model_config).__name__, matched=len(patches), unmatched=unmatched, misfits=misfits
    )


def apply_lora(model: Any, clip: Any, lora: dict, strength_model: float, strength_clip: float) -> tuple[Any, Any]:
    """``lora`` applied to MODEL and CLIP as ComfyUI's LoraLoader applies one, after :func:`check_fits`
    (also at strength 0: a LoRA that does not fit is refused, not silently unused)."""
    import comfy.sd

    check_fits(model, clip, lora)
    if strength_model == 0 and strength_clip == 0:
        return model, clip  # as LoraLoader: nothing to patch
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)

"""Whether a LoRA expert fits a base model: every layer it adapts exists in the model, with that shape.

The architecture guess (lora.guess_architecture) tells SD 1.x from SDXL, but not an SD 1.5 expert
from a smaller model of the SD 1.x architecture (the tiny default, a distilled model): the module
names agree and only the layer sizes differ. So the model's layers are listed from its configs,
on the meta device: the UNet and text encoders are built without memory or weights, and nothing
but the config files is read (or downloaded from the Hub).

The shape rule and the misfit listing (:func:`layer_misfits`) are shared with the ComfyUI node
SELMA Apply LoRA, which lists a loaded model's layers through ComfyUI's own key map: at import
this module needs only torch (diffusers and the model loaders are imported inside the functions).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from selma_toolkit.errors import LoraFormatError, ModelError
from selma_toolkit.lora.core import COMPONENTS, LoraModule, LoraWeights, canonical_module_name
from selma_toolkit.lora.metadata import target_names
from selma_toolkit.models import hub_model_error, resolve_model

log = logging.getLogger(__name__)

_SHOWN = 5  # misfit modules named in a message


def base_layer_shapes(spec: str, revision: str | None = None) -> dict[str, tuple[int, ...]] | None:
    """``{canonical module name: weight shape}`` of every Linear and Conv2d in the base model's UNet
    (or SD 3 / Flux transformer) and text encoders (CLIP, T5), built from the configs on the meta device; None for a single-file checkpoint
    (its configs come with the weights)."""
    import torch

    source = resolve_model(spec)
    if source.lower().endswith(".safetensors"):
        log.info("%s: a single-file checkpoint; the listed experts' layers are checked by architecture only", spec)
        return None
    index = json.loads(_config_file(source, "model_index.json", revision).read_text())
    shapes: dict[str, tuple[int, ...]] = {}
    for component in COMPONENTS:
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        config_path = _config_file(source, f"{component}/config.json", revision)
        model = _meta_model(entry[0], entry[1], config_path)
        for path, layer in model.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                shapes[canonical_module_name(component, path)] = tuple(int(d) for d in layer.weight.shape)
    return shapes


def _config_file(source: str, name: str, revision: str | None) -> Path:
    folder = Path(source)
    if folder.is_dir():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{source}: {name} is missing; expected a diffusers model folder")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name, revision=revision))
    except Exception as exc:
        raise hub_model_error(f"{source}: could not read {name} from the Hub", exc) from None


def _meta_model(library: str, class_name: str, config_path: Path):
    """The model class named in model_index.json, built from its config on the meta device."""
    import importlib

    import torch

    model_class = getattr(importlib.import_module(library), class_name, None)
    if model_class is None:
        raise ModelError(f"{config_path}: model class {library}.{class_name} not found")
    with torch.device("meta"):
        if library == "diffusers":
            return model_class.from_config(model_class.load_config(str(config_path.parent)))
        return model_class(model_class.config_class.from_pretrained(str(config_path.parent)))


@dataclass(frozen=True)
class LayerMisfit:
    """A layer a LoRA adapts that the model lacks (``layer`` None) or has with another shape."""

    name: str  # the LoRA's module name (or key prefix, as the caller spells it)
    adapted: tuple[int, ...]  # the weight shape the LoRA's factors make: [out, in] or [out, in, kh, kw]
    layer: tuple[int, ...] | None  # the model's weight shape; None: no such layer

    def describe(self, model: str = "the base model") -> str:
        if self.layer is None:
            return f"{self.name}: no such layer in {model}"
        return f"{self.name}: adapts a layer of shape {list(self.adapted)}, {model}'s is {list(self.layer)}"


def adapted_shape(module: LoraModule) -> tuple[int, ...]:
    """The weight shape of the layer a LoRA module adapts: [out, in] or [out, in, kh, kw]."""
    return (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))


def shapes_fit(adapted: Sequence[int], layer: Sequence[int], *, flatten: bool = False) -> bool:
    """Whether an update of shape ``adapted`` fits a weight of shape ``layer``: equal shapes, or with
    ``flatten`` equal [out, in*kh*kw] (a Linear LoRA on a 1x1 conv, as ComfyUI applies it)."""
    if not flatten:
        return tuple(adapted) == tuple(layer)
    return (
        len(adapted) > 0
        and len(layer) > 0
        and adapted[0] == layer[0]
        and math.prod(adapted[1:]) == math.prod(layer[1:])
    )


def layer_misfits(
    adapted: Mapping[str, Sequence[int]], layers: Mapping[str, Sequence[int] | None], *, flatten: bool = False
) -> list[LayerMisfit]:
    """Every entry of ``adapted`` (name -> adapted shape) whose layer in ``layers`` is missing (absent
    or None) or has a shape that the update does not fit (:func:`shapes_fit`), in ``adapted``'s order."""
    misfits = []
    for name, shape in adapted.items():
        layer = layers.get(name)
        if layer is None or not shapes_fit(shape, layer, flatten=flatten):
            misfits.append(
                LayerMisfit(name, tuple(int(d) for d in shape), None if layer is None else tuple(int(d) for d in layer))
            )
    return misfits


def shown_lines(lines: Sequence[str], shown: int = _SHOWN) -> str:
    """The first ``shown`` lines, indented, and how many more there are."""
    text = "\n  ".join(lines[:shown])
    if len(lines) > shown:
        text += f"\n  ... ({len(lines) - shown} more)"
    return "  " + text


def check_expert_fits(lora: LoraWeights, layers: dict[str, tuple[int, ...]], *, source: str, base_model: str) -> None:
    """Raise LoraFormatError naming the first misfit modules when ``lora`` adapts a layer that
    ``layers`` (base_layer_shapes) lacks or has with another shape."""
    misfits = layer_misfits({name: adapted_shape(module) for name, module in lora.modules.items()}, layers)
    if misfits:
        raise LoraFormatError(
            f"{source}: does not fit base_model {base_model!r}: {len(misfits)} of its {len(lora.modules)} modules "
            f"do not match the model's layers:\n{shown_lines([m.describe() for m in misfits])}\nIt was trained for "
            "another model (another size of the same architecture, e.g. SD 1.5 vs a smaller SD 1.x model); list only "
            "experts trained for this base model"
        )


def target_difference(
    lora: LoraWeights, unet_targets: list[str], text_targets: list[str], *, denoiser: str = "unet"
) -> str | None:
    """How the layers ``lora`` adapts differ from the ones a run trains (``unet_targets`` in the
    ``denoiser``, the family's unet or transformer; and
    ``text_targets`` in the text encoders, empty when the run does not train them), or None.
    A difference is no error (the merge counts a missing module as a zero update) but is worth a
    warning: the merged LoRA then adapts those layers with only some experts' share."""
    found = target_names(lora)
    text_components = [c for c in found if c != denoiser] or ["text_encoder"]
    trained = {denoiser: sorted(set(unet_targets))} | {
        c: sorted(set(text_targets)) for c in text_components if text_targets
    }
    return None if found == trained else f"it adapts {found}, the run trains {trained}"

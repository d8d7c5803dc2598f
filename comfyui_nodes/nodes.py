"""The SELMA nodes (ComfyUI's classic node API, which every ComfyUI release loads).

Each node declares its inputs and outputs and calls :mod:`selma_toolkit.lora` (or
:mod:`selma_toolkit.hub`): no merge formula and no LoRA key name is written here. ComfyUI's own
modules (``folder_paths``, ``comfy.*``) are imported inside the node methods, so the pack also
imports where ComfyUI does not (tests, CI).

Data between the nodes:

* ``SELMA_EXPERTS``: a tuple of :class:`Expert` (file name, weight, sha256, the LoRA read from the
  file). Each Expert Loader returns its input stack plus one expert, so loaders chain.
* ``LORA_MODEL``: ComfyUI's own LoRA type, a plain dict of tensors (here in the kohya layout that
  ComfyUI maps completely). The merge node returns a :class:`LoraStateDict`, a dict that also
  carries the merge's metadata, so that SELMA Save LoRA can write it into the file.

Errors are :class:`selma_toolkit.errors.SelmaError` subclasses whose fields name the file or
option, what was found and what to do; ComfyUI shows the error's message on the failing node. Each
node runs inside :func:`~.words.node_errors`, which words the options as the nodes' inputs ("set the
method input to delta"; ``words.py``), where the ``selma`` CLI words them as flags.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import family_of_comfy_model
from selma_toolkit.config import merge_methods as merging  # the method table: list, rules, texts
from selma_toolkit.errors import HubError, LoraFormatError, Option
from selma_toolkit.expert_fit import LayerMisfit, layer_misfits, shown_lines
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import (
    WRITE_FORMATS,
    LoraWeights,
    guess_architecture,
    load_lora,
    lora_from_state_dict,
    lora_to_state_dict,
    metadata_value,
    save_lora,
)
from selma_toolkit.lora.blocks import parse_block_weights
from selma_toolkit.lora.merge import MergeRecord, merge_experts

from .words import node_errors

logger = logging.getLogger(__name__)

CATEGORY = "SELMA"
EXPERTS = "SELMA_EXPERTS"
LORA_MODEL = "LORA_MODEL"  # ComfyUI's type name (comfy_api.latest.io.LoraModel), produced by its LoRA trainer

@dataclass(frozen=True)
class Expert:
    """One expert of a stack: the file it came from, its merge weight, and the LoRA read from it."""

    name: str
    weight: float
    sha256: str
    lora: LoraWeights


class LoraStateDict(dict):
    """A LORA_MODEL (tensor dict, as ComfyUI's core nodes take it) with the LoRA's metadata attached."""

    def __init__(self, tensors: dict, metadata: dict[str, str]):
        super().__init__(tensors)
        self.metadata = dict(metadata)


_fingerprints: dict[str, tuple[tuple[int, ...], str]] = {}


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file. Re-queuing a graph asks for it again, so it is remembered per path with the
    file's identity and times: any write changes ``st_ctime_ns`` (even when mtime is restored)."""
    stat = os.stat(path)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    known = _fingerprints.get(str(path))
    if known is None or known[0] != identity:
        known = (identity, sha256_file(path))
        _fingerprints[str(path)] = known
    return known[1]


def _loras_path(lora_name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise LoraFormatError(
            f"{lora_name!r}: no such file in the loras folder ({folders}); put the expert's .safetensors file "
            "there (or pull it with SELMA Hub Expert) and refresh the node list (press R)"
        )
    return path


def _stack_with(experts: tuple[Expert, ...] | None, name: str, path: str, weight: float) -> tuple[tuple[Expert, ...]]:
    expert = Expert(name=name, weight=float(weight), sha256=file_fingerprint(path), lora=load_lora(path))
    return (tuple(experts or ()) + (expert,),)


_WEIGHT = ("FLOAT", {
    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
    "tooltip": "The expert's merge weight. With 'normalize weights' on (default), equal weights give the paper's 1/T.",
})
_STACK_IN = (EXPERTS, {"tooltip": "Experts loaded so far; this node adds one."})


class SelmaExpertLoader:
    """Adds one LoRA expert from the loras folder to an expert stack."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The input stack plus this expert.",)
    FUNCTION = "load"
    DESCRIPTION = "Adds a skill expert LoRA (.safetensors from the loras folder) to a stack that SELMA Merge Experts merges."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {
            "required": {
                "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The expert LoRA file."}),
                "weight": _WEIGHT,
            },
            "optional": {"experts": _STACK_IN},
        }

    @classmethod
    def IS_CHANGED(cls, lora_name: str, **_: Any) -> str:
        # ComfyUI re-runs the node (and the merge after it) only when this value changes.
        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        return file_fingerprint(path) if path else ""

    def load(self, lora_name: str, weight: float, experts: tuple[Expert, ...] | None = None):
        with node_errors():
            return _stack_with(experts, lora_name, _loras_path(lora_name), weight)


class SelmaHubExpert:
    """Pulls an expert from the Hugging Face Hub into the loras folder and adds it to a stack."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The input stack plus this expert.",)
    FUNCTION = "pull"
    DESCRIPTION = ("Downloads a skill expert into the loras folder and adds it to the stack: a Hub repo id "
                   "owner/name[:file.safetensors], or a name from your expert catalog (a TOML file named in 'catalog' "
                   "or in the SELMA_CATALOG environment variable; the catalog shipped with the toolkit is empty). "
                   "Needs network access when it runs, never at start-up.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ref": ("STRING", {"default": "", "tooltip": "Hub repo id owner/name (optionally owner/name:path/in/repo"
                                                            ".safetensors), or a name from your catalog file."}),
                "weight": _WEIGHT,
                "revision": ("STRING", {"default": "", "tooltip": "Branch, tag or commit; empty: the catalog's pin, "
                                                                 "else main."}),
                "endpoint": ("STRING", {"default": "", "tooltip": "Hub endpoint (e.g. a mirror); empty: HF_ENDPOINT "
                                                                 "or huggingface.co."}),
            },
            "optional": {
                "experts": _STACK_IN,
                "catalog": ("STRING", {"default": "", "tooltip": "Path of a catalog TOML file whose names 'ref' may "
                                                                "use (besides the files in SELMA_CATALOG); see "
                                                                "hub/catalog.toml for the format."}),
            },
        }

    def pull(self, ref: str, weight: float, revision: str, endpoint: str, experts: tuple[Expert, ...] | None = None,
             catalog: str = ""):
        import folder_paths

        from selma_toolkit.experts import resolve_expert_file

        catalog_file = catalog.strip() or None
        with node_errors("SELMA Hub Expert"):
            if not ref.strip():
                raise HubError(what="empty", where=Option("ref"),
                               expected=f"a Hub repo id owner/name or {_catalog_names(catalog_file)}")
            loras = folder_paths.get_folder_paths("loras")[0]
            path = resolve_expert_file(ref.strip(), to=loras, revision=revision.strip() or None,
                                       endpoint=endpoint.strip() or None, catalog=catalog_file).path
            return _stack_with(experts, Path(path).name, str(path), weight)


def _catalog_names(catalog: str | None) -> str:
    """What 'ref' may name from the catalogs, for a message: the names that resolve, or how to add some."""
    from selma_toolkit.hub import load_catalog

    try:
        names = sorted(load_catalog(catalog))
    except HubError as error:
        return f"a catalog name (the catalog cannot be read: {error})"
    if names:
        return "a name from your catalog: " + ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return ("a name from your catalog (none is known: the shipped catalog is empty; name a catalog TOML file in "
            "'catalog' or in the SELMA_CATALOG environment variable)")


class SelmaMergeExperts:
    """Merges an expert stack into one LoRA with selma_toolkit.lora.merge_experts."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora", "summary")
    OUTPUT_TOOLTIPS = ("The merged LoRA as ComfyUI's LORA_MODEL (the core 'Load LoRA Model' node takes it too).",
                       "Experts, method, modules, rank and architecture of the merge.")
    FUNCTION = "merge"
    DESCRIPTION = f"Merges the stacked experts into one LoRA. {merging.method_summaries()}."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "experts": (EXPERTS, {"tooltip": "The experts to merge (chain SELMA Expert Loader nodes)."}),
                "method": (list(merging.MERGE_METHODS), {"default": merging.DEFAULT_METHOD,
                                                         "tooltip": f"{merging.method_summaries()}."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                 "tooltip": f"{' / '.join(merging.FACTORED_METHODS)}: rank of the merged LoRA; 0: the "
                                            f"experts' largest. {merging.listing(merging.RANK_KEEPING_METHODS, 'and')} "
                                            "keep the ranks: leave 0."}),
                "normalize_weights": ("BOOLEAN", {"default": True, "tooltip": "Divide the expert weights by their sum "
                                                                             "(equal weights -> 1/T each)."}),
            },
            "optional": {
                "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": f"{merging.density_text()}."}),
                "dare_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": f"{merging.seed_text()}."}),
                "block_weights": ("STRING", {
                    "default": "",
                    "tooltip": "Per-block weights, e.g. in=1,mid=0.5,out=1,te=0: each merged module's update is "
                               "multiplied by the weight of its group after the merge (0 removes that group's "
                               "effect; unlisted groups keep 1). Groups: in / mid / out (UNet down, mid, up blocks; "
                               "in.N / out.N for one block by its diffusers index), unet (the whole UNet), te (text "
                               "encoders; te1 / te2 for one of SDXL's). Empty: every weight 1."}),
            },
        }

    def merge(self, experts: tuple[Expert, ...], method: str, rank: int, normalize_weights: bool,
              density: float = 0.5, dare_seed: int = 0, block_weights: str = ""):
        if not experts:
            raise LoraFormatError(
                "SELMA Merge Experts: the expert stack is empty; connect a SELMA Expert Loader (chain one per expert)"
            )
        with node_errors():
            merged = merge_experts(
                [expert.lora for expert in experts], method, weights=[expert.weight for expert in experts],
                rank=rank or None, density=density, seed=dare_seed, names=[expert.name for expert in experts],
                normalize=normalize_weights, block_weights=parse_block_weights(block_weights),
            )
        record = MergeRecord.read(merged).with_files([expert.sha256 for expert in experts])
        record.write_to(merged)
        tensors, _ = lora_to_state_dict(merged)  # the family's default layout (lora/writing.py)
        ranks = sorted(merged.ranks())
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        base_model = metadata_value(merged, "base_model")
        summary = (
            f"{method} merge of {len(experts)} experts ({', '.join(expert.name for expert in experts)}), weights "
            f"{', '.join(f'{w:.4g}' for w in record.weights)}: {len(merged.modules)} modules, rank {rank_text}, "
            f"for {guess_architecture(merged) or 'an unknown architecture'}"
            + (f" (base model {base_model})" if base_model else "")
            + (f"; block weights {', '.join(f'{g}={w:g}' for g, w in record.block_weights.items())}"
               if record.block_weights else "")
        )
        logger.info("SELMA Merge Experts: %s", summary)
        return {"ui": {"text": [summary]}, "result": (LoraStateDict(tensors, merged.metadata), summary)}


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


def comfy_lora_fit(lora: Mapping[str, Any], key_map: Mapping[str, Any], patches: Mapping[Any, Any],
                   shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[LayerMisfit]]:
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


def check_lora_fits(lora: dict, model_name: str, *, matched: int, unmatched: Sequence[str] = (),
                    misfits: Sequence[LayerMisfit] = ()) -> None:
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
            f"SELMA Apply LoRA: none of the LoRA's {len(lora)} tensors (e.g. {example!r}) matches a layer of this "
            f"{model_name} model or its CLIP; the LoRA is for {architecture or 'another kind of model'}. "
            "Merge experts trained for this checkpoint's architecture"
        )
    if architecture and expected and architecture != expected:
        raise LoraFormatError(
            f"SELMA Apply LoRA: the LoRA is for {architecture} but the MODEL is {model_name} ({expected}); only the "
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
        f"SELMA Apply LoRA: the LoRA does not fit this {model_name} model: {' and '.join(found)}:\n"
        f"{shown_lines(lines, shown=len(lines))}" + (f"\n  ... ({more} more)" if more else "")
        + "\nIt was made for another model (another size of the same architecture, e.g. the tiny:sd1 test model or "
        "a distilled model instead of SD 1.5, or another architecture); nothing was patched. Merge experts trained "
        "for this checkpoint, or load the checkpoint they were trained for"
    )


def _weight_shapes(module: Any) -> dict[str, tuple[int, ...]]:
    """``state_dict`` key -> weight shape of a torch module (ComfyUI's key maps name these keys)."""
    return {key: tuple(int(d) for d in value.shape) for key, value in module.state_dict().items()}


class SelmaApplyLora:
    """Applies a LORA_MODEL to MODEL and CLIP as ComfyUI's LoraLoader does."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched CLIP model.")
    FUNCTION = "apply"
    DESCRIPTION = ("Applies the merged LoRA to the model and its text encoder(s) through comfy.sd.load_lora_for_models, "
                   "after checking that every tensor of the LoRA maps onto a layer of this model and fits its shape.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the LoRA is applied to (e.g. Load Checkpoint's "
                                               "MODEL); the experts must have been trained for this checkpoint."}),
                "clip": ("CLIP", {"tooltip": "The CLIP (text encoder) of the same checkpoint; the LoRA's text-encoder "
                                             "layers are applied to it."}),
                "lora": (LORA_MODEL, {"tooltip": "A merged LoRA (SELMA Merge Experts) or any LORA_MODEL."}),
                "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model."}),
                "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly to modify the CLIP model."}),
            }
        }

    def apply(self, model, clip, lora: dict, strength_model: float, strength_clip: float):
        import comfy.lora
        import comfy.lora_convert
        import comfy.sd

        if strength_model == 0 and strength_clip == 0:
            return (model, clip)  # as LoraLoader: nothing to patch
        # The key map and matching are ComfyUI's own (what load_lora_for_models does next), run once
        # silently first, so that a LoRA that does not fit is refused before anything is patched.
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        converted = comfy.lora_convert.convert_lora(lora)
        patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
        shapes = {**_weight_shapes(model.model), **_weight_shapes(clip.cond_stage_model)}
        unmatched, misfits = comfy_lora_fit(converted, key_map, patches, shapes)
        check_lora_fits(lora, type(model.model.model_config).__name__, matched=len(patches), unmatched=unmatched,
                        misfits=misfits)
        return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


class SelmaSaveLora:
    """Writes a LORA_MODEL into the loras folder as .safetensors with its metadata."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    DESCRIPTION = ("Saves the merged LoRA into the loras folder (kohya layout: LoraLoader and diffusers read it; or peft), "
                   "with the merge record (experts, sha256, weights, method) in its metadata.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "lora": (LORA_MODEL, {"tooltip": "The LoRA to save: SELMA Merge Experts' output (its merge record and "
                                                 "the experts' metadata are written too) or any LORA_MODEL."}),
                "filename_prefix": ("STRING", {"default": "selma/merged",
                                               "tooltip": "Path under the loras folder; a counter is appended."}),
                "format": (["default", *WRITE_FORMATS], {
                    "default": "default",
                    "tooltip": "default: the layout ComfyUI's LoraLoader and diffusers both read for the LoRA's family "
                               "(kohya for SD 1.x / 2.x / XL, peft for SD 3 / Flux / Chroma, ai-toolkit for Qwen-Image "
                               "/ Z-Image / FLUX.2); kohya, peft or ai-toolkit where the family has that layout."}),
            }
        }

    def save(self, lora: dict, filename_prefix: str, format: str):
        import folder_paths

        loras = folder_paths.get_folder_paths("loras")[0]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, loras)
        path = Path(folder) / f"{name}_{counter:05}_.safetensors"
        with node_errors():
            weights = lora_from_state_dict(lora, getattr(lora, "metadata", None), source="SELMA Save LoRA input")
            save_lora(weights, path, format=None if format == "default" else format)
        relative = str(Path(subfolder) / path.name) if subfolder else path.name
        logger.info("SELMA Save LoRA: wrote %s (%d modules)", path, len(weights.modules))
        return {"ui": {"text": [f"saved loras/{relative}"]}}


NODE_CLASS_MAPPINGS = {
    "SelmaExpertLoader": SelmaExpertLoader,
    "SelmaHubExpert": SelmaHubExpert,
    "SelmaMergeExperts": SelmaMergeExperts,
    "SelmaApplyLora": SelmaApplyLora,
    "SelmaSaveLora": SelmaSaveLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SelmaExpertLoader": "SELMA Expert Loader",
    "SelmaHubExpert": "SELMA Hub Expert",
    "SelmaMergeExperts": "SELMA Merge Experts",
    "SelmaApplyLora": "SELMA Apply LoRA",
    "SelmaSaveLora": "SELMA Save LoRA",
}

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

Errors are :class:`selma_toolkit.errors.SelmaError` subclasses whose message names the file or
input, what was found and what to do; ComfyUI shows that message on the failing node.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import (
    LoraWeights,
    guess_architecture,
    load_lora,
    lora_from_state_dict,
    lora_to_state_dict,
    save_lora,
)
from selma_toolkit.lora.merge import MERGE_METADATA_KEY, MERGE_METHODS, merge_experts, merge_record

logger = logging.getLogger(__name__)

CATEGORY = "SELMA"
EXPERTS = "SELMA_EXPERTS"
LORA_MODEL = "LORA_MODEL"  # ComfyUI's type name (comfy_api.latest.io.LoraModel), produced by its LoRA trainer
# ComfyUI's model configs (comfy.supported_models class names) -> the toolkit's architecture names.
COMFY_MODEL_ARCHITECTURES = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}


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
        return _stack_with(experts, lora_name, _loras_path(lora_name), weight)


class SelmaHubExpert:
    """Pulls an expert from the Hugging Face Hub into the loras folder and adds it to a stack."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The input stack plus this expert.",)
    FUNCTION = "pull"
    DESCRIPTION = ("Downloads a skill expert (a catalog name such as 'countbench', or a Hub repo id "
                   "owner/name[:file.safetensors]) into the loras folder and adds it to the stack. Needs network "
                   "access when it runs, never at start-up.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "ref": ("STRING", {"default": "", "tooltip": "Catalog name, or Hub repo id owner/name "
                                                            "(optionally owner/name:path/in/repo.safetensors)."}),
                "weight": _WEIGHT,
                "revision": ("STRING", {"default": "", "tooltip": "Branch, tag or commit; empty: the catalog's pin, "
                                                                 "else main."}),
                "endpoint": ("STRING", {"default": "", "tooltip": "Hub endpoint (e.g. a mirror); empty: HF_ENDPOINT "
                                                                 "or huggingface.co."}),
            },
            "optional": {"experts": _STACK_IN},
        }

    def pull(self, ref: str, weight: float, revision: str, endpoint: str, experts: tuple[Expert, ...] | None = None):
        import folder_paths

        from selma_toolkit.hub import resolve_expert

        if not ref.strip():
            raise LoraFormatError(
                "SELMA Hub Expert: 'ref' is empty; give a catalog name (e.g. countbench) or a Hub repo id owner/name"
            )
        loras = folder_paths.get_folder_paths("loras")[0]
        path = resolve_expert(ref.strip(), to=loras, revision=revision.strip() or None,
                              endpoint=endpoint.strip() or None)
        return _stack_with(experts, Path(path).name, str(path), weight)


class SelmaMergeExperts:
    """Merges an expert stack into one LoRA with selma_toolkit.lora.merge_experts."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_MODEL, "STRING")
    RETURN_NAMES = ("lora", "summary")
    OUTPUT_TOOLTIPS = ("The merged LoRA as ComfyUI's LORA_MODEL (the core 'Load LoRA Model' node takes it too).",
                       "Experts, method, modules and rank of the merge.")
    FUNCTION = "merge"
    DESCRIPTION = ("Merges the stacked experts into one LoRA. selma (the paper): averages the A factors and the B factors "
                   "separately; delta: the exact weighted sum of the experts' updates (rank = sum of ranks); svd: that sum "
                   "re-factored to 'rank'; ties / dare: sign-consensus and drop-and-rescale variants.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "experts": (EXPERTS, {"tooltip": "The experts to merge (chain SELMA Expert Loader nodes)."}),
                "method": (list(MERGE_METHODS), {"default": "selma"}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                                 "tooltip": "svd / ties / dare: rank of the merged LoRA; 0: the experts' largest. "
                                            "selma and delta keep the ranks: leave 0."}),
                "normalize_weights": ("BOOLEAN", {"default": True, "tooltip": "Divide the expert weights by their sum "
                                                                             "(equal weights -> 1/T each)."}),
            },
            "optional": {
                "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "ties / dare: share of entries kept."}),
                "dare_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "dare: seed of the drop masks."}),
            },
        }

    def merge(self, experts: tuple[Expert, ...], method: str, rank: int, normalize_weights: bool,
              density: float = 0.5, dare_seed: int = 0):
        if not experts:
            raise LoraFormatError(
                "SELMA Merge Experts: the expert stack is empty; connect a SELMA Expert Loader (chain one per expert)"
            )
        merged = merge_experts(
            [expert.lora for expert in experts], method, weights=[expert.weight for expert in experts], rank=rank or None,
            density=density, seed=dare_seed, names=[expert.name for expert in experts], normalize=normalize_weights,
        )
        record = merge_record(merged)
        for info, expert in zip(record["experts"], experts, strict=True):
            info["sha256"] = expert.sha256
        merged.metadata[MERGE_METADATA_KEY] = json.dumps(record)
        tensors, _ = lora_to_state_dict(merged, "kohya")
        ranks = sorted(merged.ranks())
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        summary = (
            f"{method} merge of {len(experts)} experts ({', '.join(expert.name for expert in experts)}), weights "
            f"{', '.join(f'{w:.4g}' for w in record['weights'])}: {len(merged.modules)} modules, rank {rank_text}, "
            f"for {guess_architecture(merged) or 'an unknown architecture'}"
        )
        logger.info("SELMA Merge Experts: %s", summary)
        return {"ui": {"text": [summary]}, "result": (LoraStateDict(tensors, merged.metadata), summary)}


def lora_architecture(lora: dict) -> str | None:
    """sd1 / sd2 / sdxl for a LORA_MODEL, or None when its layout or architecture is not recognised."""
    try:
        return guess_architecture(lora_from_state_dict(lora, getattr(lora, "metadata", None), source="the LoRA input"))
    except LoraFormatError:
        return None  # another tool's layout: ComfyUI may still map it, so only the key count below decides


def check_lora_fits(lora: dict, matched: int, model_name: str) -> None:
    """Raise when a LORA_MODEL does not belong to the MODEL / CLIP it is applied to: none of its keys
    matched (``matched``: layers ComfyUI's key map found), or its architecture is another one than the
    model's (``model_name``: ComfyUI's model config class, e.g. SD15)."""
    architecture = lora_architecture(lora)
    expected = COMFY_MODEL_ARCHITECTURES.get(model_name)
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


class SelmaApplyLora:
    """Applies a LORA_MODEL to MODEL and CLIP as ComfyUI's LoraLoader does."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched CLIP model.")
    FUNCTION = "apply"
    DESCRIPTION = "Applies the merged LoRA to the model and its text encoder(s) through comfy.sd.load_lora_for_models."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {}),
                "clip": ("CLIP", {}),
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
        # silently first to tell "matches nothing" from a LoRA that loads.
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora), key_map, log_missing=False)
        check_lora_fits(lora, len(patches), type(model.model.model_config).__name__)
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
                "lora": (LORA_MODEL, {}),
                "filename_prefix": ("STRING", {"default": "selma/merged",
                                               "tooltip": "Path under the loras folder; a counter is appended."}),
                "format": (["kohya", "peft"], {"default": "kohya"}),
            }
        }

    def save(self, lora: dict, filename_prefix: str, format: str):
        import folder_paths

        loras = folder_paths.get_folder_paths("loras")[0]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, loras)
        path = Path(folder) / f"{name}_{counter:05}_.safetensors"
        weights = lora_from_state_dict(lora, getattr(lora, "metadata", None), source="SELMA Save LoRA input")
        save_lora(weights, path, format=format)
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

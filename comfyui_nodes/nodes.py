"""The SELMA nodes: each one's inputs, outputs and function, declared once (:class:`~.spec.NodeSpec`).

``v1.py`` makes ComfyUI's classic classes of them and ``v3.py`` its ``comfy_api`` nodes. Each
function calls :mod:`selma_toolkit.lora` (merges), :mod:`selma_toolkit.hub` (pulls), ``stacks.py``
(experts, LORA_STACK) and ``fit.py`` (ComfyUI's key maps): no merge formula and no LoRA key name is
written here. ComfyUI's own modules are imported inside the functions, so the pack also imports
where ComfyUI does not (tests, CI).

Errors are :class:`selma_toolkit.errors.SelmaError` subclasses whose fields name the file or option,
what was found and what to do; ComfyUI shows the error's message on the failing node. Each node runs
inside :func:`~.words.node_errors`, which words the options as the nodes' inputs ("set the method
input to delta"; ``words.py``), where the ``selma`` CLI words them as flags.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selma_toolkit.config import merge_methods as merging  # the method table: list, rules, texts
from selma_toolkit.errors import HubError, LoraFormatError, Option, Remedy
from selma_toolkit.lora import WRITE_FORMATS, lora_from_state_dict, save_lora

from . import fit, stacks
from .spec import Input, NodeSpec, Output, Result
from .stacks import NO_EXPERT, Expert
from .words import node_errors

logger = logging.getLogger(__name__)

EXPERTS = "SELMA_EXPERTS"
LORA_MODEL = "LORA_MODEL"  # ComfyUI's type name (comfy_api io.LoraModel), produced by its LoRA trainer
LORA_STACK = "LORA_STACK"  # Comfyroll's / Efficiency Nodes' list of (file name, model weight, clip weight)
SLOTS = 5  # expert slots of SELMA LoRA Loader: the paper merges five skills; a lora_stack adds more

# ----------------------------------------------------------------------------------- inputs

_WEIGHT_TEXT = "The expert's merge weight. With normalize_weights on (default), equal weights give the paper's 1/T."
_STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
MODEL_IN = Input(
    "model",
    "MODEL",
    "The diffusion model the LoRA is applied to (e.g. Load Checkpoint's MODEL); the "
    "experts must have been trained for this checkpoint.",
)
CLIP_IN = Input(
    "clip", "CLIP", "The CLIP (text encoder) of the same checkpoint; the LoRA's text-encoder layers are applied to it."
)
STRENGTH_MODEL = Input("strength_model", "FLOAT", "How strongly to modify the diffusion model.", **_STRENGTH)
STRENGTH_CLIP = Input("strength_clip", "FLOAT", "How strongly to modify the CLIP model.", **_STRENGTH)


def _weight(name: str) -> Input:
    return Input(name, "FLOAT", _WEIGHT_TEXT, default=1.0, min=-10.0, max=10.0, step=0.01)


METHOD = Input(
    "method", "COMBO", f"{merging.method_summaries()}.", default=merging.DEFAULT_METHOD, choices=merging.MERGE_METHODS
)
RANK = Input(
    "rank",
    "INT",
    f"{' / '.join(merging.FACTORED_METHODS)}: rank of the merged LoRA; 0: the experts' "
    f"largest. {merging.listing(merging.RANK_KEEPING_METHODS, 'and')} keep the ranks: leave 0.",
    default=0,
    min=0,
    max=4096,
)
NORMALIZE = Input(
    "normalize_weights", "BOOLEAN", "Divide the expert weights by their sum (equal weights -> 1/T each).", default=True
)
DENSITY = Input(
    "density", "FLOAT", f"{merging.density_text()}.", default=0.5, min=0.01, max=1.0, step=0.01, optional=True
)
DARE_SEED = Input(
    "dare_seed",
    "INT",
    f"{merging.seed_text()}; and the randomized SVD's seed.",
    default=0,
    min=0,
    max=2**31 - 1,
    optional=True,
)
BLOCK_WEIGHTS = Input(
    "block_weights",
    "STRING",
    "Per-block weights, e.g. in=1,mid=0.5,out=1,te=0: each merged module's update is "
    "multiplied by the weight of its group after the merge (0 removes that group's effect; unlisted groups keep 1). "
    "Groups: in / mid / out (UNet down, mid, up blocks; in.N / out.N for one block by its diffusers index), unet (the "
    "whole UNet), te (text encoders; te1 / te2 for one of SDXL's). Empty: every weight 1.",
    default="",
    optional=True,
)
SVD_MODE = Input(
    "svd_mode", "COMBO", f"{merging.svd_mode_text()}.", default="exact", choices=merging.SVD_MODES, optional=True
)
MERGE_OPTIONS = (DENSITY, DARE_SEED, BLOCK_WEIGHTS, SVD_MODE)  # the optional merge settings, in this order


def _merge_settings(inputs: dict[str, Any]) -> dict[str, Any]:
    """The optional merge settings a node was given, as :func:`.stacks.merge`'s keywords."""
    return {spec.name: inputs[spec.name] for spec in MERGE_OPTIONS if spec.name in inputs}


# ---------------------------------------------------------------------------- the nodes


def load_expert(lora_name: str, weight: float, experts: tuple[Expert, ...] | None = None) -> Result:
    """SELMA Expert Loader: the input stack plus one expert."""
    with node_errors():
        return Result(((*(experts or ()), stacks.expert(lora_name, weight)),))


def pull_expert(
    ref: str, weight: float, revision: str, endpoint: str, experts: tuple[Expert, ...] | None = None, catalog: str = ""
) -> Result:
    """SELMA Hub Expert: a Hub or catalog expert copied into the loras folder, added to the stack."""
    from selma_toolkit.experts import resolve_expert_file

    catalog_file = catalog.strip() or None
    with node_errors("SELMA Hub Expert"):
        if not ref.strip():
            raise HubError(
                what="empty",
                where=Option("ref"),
                expected=f"a Hub repo id owner/name or {_catalog_names(catalog_file)}",
            )
        # cached_only: a queued graph never downloads and extracts two full models (several GB).
        path = resolve_expert_file(
            ref.strip(),
            to=stacks.loras_folder(),
            revision=revision.strip() or None,
            endpoint=endpoint.strip() or None,
            catalog=catalog_file,
            cached_only=True,
        ).path
        return Result(((*(experts or ()), stacks.expert(Path(path).name, weight, path)),))


def _catalog_names(catalog: str | None) -> str:
    """What 'ref' may name from the catalogs, for a message: the names that resolve, or how to add some."""
    from selma_toolkit.hub import load_catalog

    try:
        names = sorted(load_catalog(catalog))
    except HubError as error:
        return f"a catalog name (the catalog cannot be read: {error})"
    if names:
        return "a name from your catalog: " + ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return (
        "a name from your catalog (none is known: name a catalog TOML file in 'catalog' or in the SELMA_CATALOG "
        "environment variable)"
    )


def merge_expert_stack(
    experts: tuple[Expert, ...], method: str, rank: int, normalize_weights: bool, **settings: Any
) -> Result:
    """SELMA Merge Experts: the stack merged into one LORA_MODEL."""
    if not experts:
        raise LoraFormatError(
            "SELMA Merge Experts: the expert stack is empty; connect a SELMA Expert Loader (chain one per expert)"
        )
    with node_errors():
        lora, summary = stacks.merge(experts, method, rank, normalize_weights, **settings)
    return Result((lora, summary), ui={"text": [summary]})


def apply(model: Any, clip: Any, lora: dict, strength_model: float, strength_clip: float) -> Result:
    """SELMA Apply LoRA: MODEL and CLIP patched, and the LoRA passed on once it fits."""
    with node_errors("SELMA Apply LoRA"):
        model, clip = fit.apply_lora(model, clip, lora, strength_model, strength_clip)
    return Result((model, clip, lora))


def _chosen_experts(slots: dict[str, Any], lora_stack: list | None, where: str, remedy: str) -> list[Expert]:
    """The experts of the slots (expert_N, weight_N) that name one, then the stack's; at least one."""
    experts = [
        stacks.expert(slots[f"expert_{i}"], slots[f"weight_{i}"])
        for i in range(1, SLOTS + 1)
        if slots.get(f"expert_{i}", NO_EXPERT) != NO_EXPERT
    ]
    experts += stacks.experts_from_stack(lora_stack)
    if not experts:
        raise LoraFormatError(what="no expert to merge", where=where, remedies=[Remedy.do(remedy)])
    return experts


def load_selma_lora(
    model: Any,
    clip: Any,
    method: str,
    strength_model: float,
    strength_clip: float,
    rank: int = 0,
    normalize_weights: bool = True,
    lora_stack: list | None = None,
    **inputs: Any,
) -> Result:
    """SELMA LoRA Loader: the chosen experts (``expert_1`` / ``weight_1`` ... and a LORA_STACK's entries)
    merged and applied to MODEL and CLIP, as LoraLoader applies one LoRA."""
    settings = _merge_settings(inputs)
    with node_errors("SELMA LoRA Loader"):
        experts = _chosen_experts(
            inputs,
            lora_stack,
            "expert_1 to expert_5",
            "choose one in expert_1 (the loras folder's files and the pulled catalog experts) or connect a lora_stack",
        )
        lora, summary = stacks.merge(experts, method, rank, normalize_weights, **settings)
        model, clip = fit.apply_lora(model, clip, lora, strength_model, strength_clip)
    return Result((model, clip, lora, summary), ui={"text": [summary]})


def merge_lora_stack(
    model: Any,
    clip: Any,
    lora_stack: list,
    method: str,
    strength_model: float,
    strength_clip: float,
    rank: int = 0,
    normalize_weights: bool = True,
    **settings: Any,
) -> Result:
    """SELMA Merge LoRA Stack: a LORA_STACK merged into one LoRA, written under models/loras once it fits
    MODEL and CLIP, and passed on as a one-entry LORA_STACK."""
    with node_errors("SELMA Merge LoRA Stack"):
        experts = _chosen_experts({}, lora_stack, "the lora_stack input", "add LoRAs to the stack")
        lora, summary = stacks.merge(experts, method, rank, normalize_weights, **settings)
        fit.check_fits(model, clip, lora)
        entry = stacks.stack_entry(lora, strength_model, strength_clip)
    return Result(([entry], summary), ui={"text": [f"{summary}; as loras/{entry[0]}"]})


def save(lora: dict, filename_prefix: str, format: str, model: Any = None, clip: Any = None) -> Result:
    """SELMA Save LoRA: the LoRA written into the loras folder (after the fit check, given a MODEL and CLIP);
    its file name under models/loras as output and on the node. A merge this node already wrote under the
    same prefix and format (re-queuing after a change elsewhere, e.g. a strength) is not written again."""
    import folder_paths

    with node_errors("SELMA Save LoRA"):
        if (model is None) != (clip is None):
            raise LoraFormatError(
                what="connect both model and clip (to check the LoRA's fit before saving), or neither",
                where=Option("model" if model is None else "clip"),
            )
        if model is not None:
            fit.check_fits(model, clip, lora)
        loras = stacks.loras_folder()
        saved = stacks.saved_before(lora, filename_prefix, format)
        if saved is not None:
            return Result((saved,), ui={"text": [f"already saved as loras/{saved}"]})
        weights = lora_from_state_dict(lora, getattr(lora, "metadata", None), source="SELMA Save LoRA input")
        folder, name, counter, _subfolder, _ = folder_paths.get_save_image_path(filename_prefix, str(loras))
        path = Path(folder) / f"{name}_{counter:05}_.safetensors"
        save_lora(weights, path, format=None if format == "default" else format)  # type: ignore[arg-type]
    relative = path.relative_to(loras).as_posix()
    stacks.remember_saved(lora, filename_prefix, format, relative)
    logger.info("SELMA Save LoRA: wrote %s (%d modules)", path, len(weights.modules))
    return Result((relative,), ui={"text": [f"saved loras/{relative}"]})


# ------------------------------------------------------------------------------ the specs


def _experts_in(tooltip: str, optional: bool = False) -> Input:
    return Input("experts", EXPERTS, tooltip, optional=optional)


def _expert_slot(index: int) -> tuple[Input, Input]:
    return (
        Input(
            f"expert_{index}",
            "COMBO",
            "An expert: a file of the loras folder, or catalog:NAME for a catalog expert "
            "already pulled (SELMA Hub Expert, `selma hub pull`); None: unused.",
            default=NO_EXPERT,
            choices=lambda: [NO_EXPERT, *stacks.expert_names()],
        ),
        _weight(f"weight_{index}"),
    )


NODES: list[NodeSpec] = [
    NodeSpec(
        "SelmaLoraLoader",
        "SELMA LoRA Loader",
        "Merges up to five skill experts (and a LoRA stack's entries) into one LoRA and applies it to MODEL and CLIP, "
        "as Load LoRA applies one; refused unless every tensor fits the model.",
        inputs=(
            MODEL_IN,
            CLIP_IN,
            *(item for index in range(1, SLOTS + 1) for item in _expert_slot(index)),
            METHOD,
            STRENGTH_MODEL,
            STRENGTH_CLIP,
            RANK,
            NORMALIZE,
            *MERGE_OPTIONS,
            Input(
                "lora_stack",
                LORA_STACK,
                "More experts: a LoRA stack (CR LoRA Stack, LoRA Stacker), each entry's model weight its merge weight.",
                optional=True,
            ),
        ),
        outputs=(
            Output("MODEL", "MODEL", "The patched diffusion model."),
            Output("CLIP", "CLIP", "The patched CLIP model."),
            Output(LORA_MODEL, "lora", "The merged LoRA that was applied (connect SELMA Save LoRA to keep it)."),
            Output("STRING", "summary", "Experts, method, modules, rank and architecture of the merge."),
        ),
        run=load_selma_lora,
        fingerprint=lambda **inputs: stacks.fingerprint_of([inputs.get(f"expert_{i}") for i in range(1, SLOTS + 1)]),
    ),
    NodeSpec(
        "SelmaExpertLoader",
        "SELMA Expert Loader",
        "Adds a skill expert LoRA (.safetensors from the loras folder, or a pulled catalog expert) to a stack that "
        "SELMA Merge Experts merges.",
        inputs=(
            Input("lora_name", "COMBO", "The expert LoRA file.", choices=stacks.expert_names),
            _weight("weight"),
            _experts_in("Experts loaded so far; this node adds one.", optional=True),
        ),
        outputs=(Output(EXPERTS, "experts", "The input stack plus this expert."),),
        run=load_expert,
        fingerprint=lambda lora_name, **_: stacks.fingerprint_of([lora_name]),
    ),
    NodeSpec(
        "SelmaHubExpert",
        "SELMA Hub Expert",
        "Downloads a skill expert into the loras folder and adds it to the stack: a Hub repo id "
        "owner/name[:file.safetensors], or a catalog name (`selma hub list`; your own entries in a TOML file named in "
        "'catalog' or in the SELMA_CATALOG environment variable). Catalog entries extracted from two full models "
        "(kind 'extract', such as the SELMA authors' models) are made once in a terminal with `selma hub pull NAME`; "
        "this node takes them from that cache and never downloads full models. Needs network access when it runs, "
        "never at start-up.",
        inputs=(
            Input(
                "ref",
                "STRING",
                "Hub repo id owner/name (optionally owner/name:path/in/repo.safetensors), or a name "
                "from your catalog file.",
                default="",
            ),
            _weight("weight"),
            Input("revision", "STRING", "Branch, tag or commit; empty: the catalog's pin, else main.", default=""),
            Input(
                "endpoint", "STRING", "Hub endpoint (e.g. a mirror); empty: HF_ENDPOINT or huggingface.co.", default=""
            ),
            _experts_in("Experts loaded so far; this node adds one.", optional=True),
            Input(
                "catalog",
                "STRING",
                "Path of a catalog TOML file whose names 'ref' may use (besides the files in "
                "SELMA_CATALOG); see hub/catalog.toml for the format.",
                default="",
                optional=True,
            ),
        ),
        outputs=(Output(EXPERTS, "experts", "The input stack plus this expert."),),
        run=pull_expert,
    ),
    NodeSpec(
        "SelmaMergeExperts",
        "SELMA Merge Experts",
        f"Merges the stacked experts into one LoRA. {merging.method_summaries()}.",
        inputs=(
            _experts_in("The experts to merge (chain SELMA Expert Loader nodes)."),
            METHOD,
            RANK,
            NORMALIZE,
            *MERGE_OPTIONS,
        ),
        outputs=(
            Output(
                LORA_MODEL,
                "lora",
                "The merged LoRA as ComfyUI's LORA_MODEL (the core 'Load LoRA Model' node takes it too).",
            ),
            Output("STRING", "summary", "Experts, method, modules, rank and architecture of the merge."),
        ),
        run=merge_expert_stack,
    ),
    NodeSpec(
        "SelmaApplyLora",
        "SELMA Apply LoRA",
        "Applies the merged LoRA to the model and its text encoder(s) through comfy.sd.load_lora_for_models, after "
        "checking that every tensor of the LoRA maps onto a layer of this model and fits its shape.",
        inputs=(
            MODEL_IN,
            CLIP_IN,
            Input("lora", LORA_MODEL, "A merged LoRA (SELMA Merge Experts) or any LORA_MODEL."),
            STRENGTH_MODEL,
            STRENGTH_CLIP,
        ),
        outputs=(
            Output("MODEL", "MODEL", "The patched diffusion model."),
            Output("CLIP", "CLIP", "The patched CLIP model."),
            Output(LORA_MODEL, "lora", "The LoRA, passed on once it fitted this model (save this one)."),
        ),
        run=apply,
    ),
    NodeSpec(
        "SelmaMergeLoraStack",
        "SELMA Merge LoRA Stack",
        "Merges a LoRA stack's entries (CR LoRA Stack, LoRA Stacker) into one LoRA; once it fits MODEL and CLIP, "
        "writes it under the loras folder (selma/stack/, one file per merge) and passes it on as a one-entry stack.",
        inputs=(
            MODEL_IN,
            CLIP_IN,
            Input("lora_stack", LORA_STACK, "The entries to merge, each entry's model weight its merge weight."),
            METHOD,
            STRENGTH_MODEL,
            STRENGTH_CLIP,
            RANK,
            NORMALIZE,
            *MERGE_OPTIONS,
        ),
        outputs=(
            Output(LORA_STACK, "lora_stack", "One entry: the merged file, strength_model, strength_clip."),
            Output("STRING", "summary", "Experts, method, modules, rank and architecture of the merge."),
        ),
        run=merge_lora_stack,
    ),
    NodeSpec(
        "SelmaSaveLora",
        "SELMA Save LoRA",
        "Saves the LoRA into the loras folder (in its family's layout: LoraLoader and diffusers read it), with the "
        "merge record (experts, sha256, weights, method) in its metadata; given model and clip, only if it fits them.",
        inputs=(
            Input(
                "lora",
                LORA_MODEL,
                "The LoRA to save: a merge (its merge record and the experts' metadata are "
                "written too) or any LORA_MODEL.",
            ),
            Input(
                "filename_prefix",
                "STRING",
                "Path under the loras folder; a counter is appended.",
                default="selma/merged",
            ),
            Input(
                "format",
                "COMBO",
                "default: the layout ComfyUI's LoraLoader and diffusers both read for the LoRA's family "
                "(kohya for SD 1.x / 2.x / XL, peft for SD 3 / Flux / Chroma, ai-toolkit for Qwen-Image "
                "/ Z-Image / FLUX.2); kohya, peft or ai-toolkit where the family has that layout.",
                default="default",
                choices=("default", *WRITE_FORMATS),
            ),
            Input(
                "model",
                "MODEL",
                "Optional: the model the LoRA is for; nothing is written unless it fits.",
                optional=True,
            ),
            Input("clip", "CLIP", "Optional, with model: its CLIP.", optional=True),
        ),
        outputs=(Output("STRING", "lora_name", "The saved file's name under the loras folder."),),
        run=save,
        output_node=True,
    ),
]

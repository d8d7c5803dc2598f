"""``__metadata__`` of LoRA files (strings only) and telling a LoRA's base architecture.

Three families of fields are written:

* ours, namespaced ``selma.*``: base_model, architecture, rank, alpha, targets, skill / skills,
  method, weights, recipe_sha256, toolkit_version (lists and dicts as JSON strings);
* what A1111-style tools and model sites read: kohya's ``ss_*`` (network module, dim, alpha, base
  model version) and Stability's ModelSpec ``modelspec.*`` (architecture, implementation, title);
* for the peft layout, diffusers' own ``lora_adapter_metadata``: a JSON LoraConfig per component
  (``unet.r``, ``unet.lora_alpha``, ``unet.alpha_pattern``...). diffusers builds the adapter from
  it, so without it a LoRA whose alpha differs from its rank reloads at the wrong strength.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from selma_toolkit import __version__
from selma_toolkit.architectures import DENOISERS, FAMILIES, FAMILY_NAMES, family_from_metadata
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.keys import peft_module_path
from selma_toolkit.published import dit_families_with

SELMA_PREFIX = "selma."
SELMA_FIELDS = (
    "base_model",
    "architecture",
    "rank",
    "alpha",
    "targets",
    "skill",
    "skills",
    "method",
    "weights",
    "recipe_sha256",
    "toolkit_version",
)
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
ARCHITECTURES = FAMILY_NAMES  # the registry's family names (selma_toolkit/architectures.py)
# Fields recomputed from the tensors on every write, so a converted or merged file never carries
# stale values from its source.
_DERIVED = (
    "format",
    PEFT_METADATA_KEY,
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_module",
    "ss_base_model_version",
    "ss_v2",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.sai_model_spec",
    "selma.rank",
    "selma.alpha",
    "selma.targets",
    "selma.toolkit_version",
)


def lora_metadata(
    *,
    base_model: str | None = None,
    architecture: str | None = None,
    skill: str | None = None,
    skills: list[str] | None = None,
    method: str | None = None,
    weights: list[float] | None = None,
    recipe_sha256: str | None = None,
    title: str | None = None,
    description: str | None = None,
    **extra: Any,
) -> dict[str, str]:
    """Our metadata fields as ``__metadata__`` strings (``selma.<field>``; title and description
    as ``modelspec.title`` / ``modelspec.description``). Rank, alpha, targets, architecture (when
    not given), toolkit version and the kohya / ModelSpec fields are added by ``save_lora`` from
    the tensors themselves. ``extra`` keys are written as given (values made strings)."""
    if architecture is not None and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    fields = {
        "base_model": base_model,
        "architecture": architecture,
        "skill": skill,
        "skills": skills,
        "method": method,
        "weights": weights,
        "recipe_sha256": recipe_sha256,
    }
    metadata = {SELMA_PREFIX + key: as_metadata_string(value) for key, value in fields.items() if value is not None}
    if title is not None:
        metadata["modelspec.title"] = title
    if description is not None:
        metadata["modelspec.description"] = description
    metadata.update({key: as_metadata_string(value) for key, value in extra.items() if value is not None})
    return metadata


def as_metadata_string(value: Any) -> str:
    """safetensors metadata values must be strings: lists/dicts as JSON, numbers as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def metadata_value(weights: LoraWeights | Mapping[str, str], field: str) -> str | None:
    """One of our fields (``"skill"``, ``"base_model"``...) from a LoRA's metadata, written either
    namespaced (``selma.skill``) or plain (``skill``); None when absent."""
    metadata = weights.metadata if isinstance(weights, LoraWeights) else weights
    return metadata.get(SELMA_PREFIX + field, metadata.get(field))


def file_metadata(weights: LoraWeights, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``__metadata__`` a file of ``weights`` gets: its own metadata and ``extra`` (plain field
    names such as ``base_model`` moved under ``selma.``), derived fields recomputed."""
    merged: dict[str, str] = {
        key: as_metadata_string(value) for key, value in {**weights.metadata, **(extra or {})}.items()
    }
    for field in SELMA_FIELDS:
        if field in merged:
            merged.setdefault(SELMA_PREFIX + field, merged[field])
            del merged[field]
    for key in _DERIVED:
        merged.pop(key, None)
    modules = weights.modules.values()
    rank, alpha = _most_common(m.rank for m in modules), _most_common(float(m.alpha) for m in modules)
    merged[SELMA_PREFIX + "rank"] = _join_sorted({m.rank for m in modules})
    merged[SELMA_PREFIX + "alpha"] = _join_sorted({_number(m.alpha) for m in modules})
    merged[SELMA_PREFIX + "targets"] = json.dumps(target_names(weights))
    merged[SELMA_PREFIX + "toolkit_version"] = __version__
    merged["ss_network_module"] = "networks.lora"
    merged["ss_network_dim"] = str(rank)
    merged["ss_network_alpha"] = _number(alpha)
    architecture = merged.get(SELMA_PREFIX + "architecture") or guess_architecture(weights)
    if architecture in FAMILIES:
        family = FAMILIES[architecture]
        merged[SELMA_PREFIX + "architecture"] = architecture
        merged["ss_base_model_version"] = family.kohya_base_version
        merged["ss_v2"] = str(family.kohya_base_version.startswith("sd_v2"))  # kohya's flag for SD 2.x text encoders
        spec_arch, resolution = family.modelspec_architecture, family.resolution
        if spec_arch.startswith("stable-diffusion-v2") and "base" in (merged.get(SELMA_PREFIX + "base_model") or ""):
            spec_arch, resolution = (
                "stable-diffusion-v2-512",
                512,
            )  # stabilityai/stable-diffusion-2-base is the 512 px model
        merged["modelspec.sai_model_spec"] = "1.0.0"
        merged["modelspec.architecture"] = f"{spec_arch}/lora"
        merged["modelspec.implementation"] = "diffusers"  # module names follow diffusers' UNet
        merged.setdefault("modelspec.resolution", f"{resolution}x{resolution}")
    if SELMA_PREFIX + "base_model" in merged:
        merged.setdefault("ss_sd_model_name", merged[SELMA_PREFIX + "base_model"])
    return merged


def target_names(weights: LoraWeights) -> dict[str, list[str]]:
    """Per component, the distinct layer names adapted (``to_q``, ``to_out.0``, ``q_proj``...)."""
    targets: dict[str, set[str]] = {}
    for name in weights.modules:
        component, _, path = name.partition(".")
        parts = path.split(".")
        leaf = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        targets.setdefault(component, set()).add(leaf)
    return {component: sorted(leaves) for component, leaves in sorted(targets.items())}


def peft_adapter_metadata(weights: LoraWeights) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` for ``weights``: per component a LoraConfig with the
    most common rank / alpha, every adapted module path as a target, and rank / alpha patterns for
    the modules that differ (module paths, as diffusers itself writes them)."""
    config: dict[str, Any] = {}
    for component in sorted(weights.components()):
        modules = {
            peft_module_path(name): module
            for name, module in weights.modules.items()
            if name.split(".", 1)[0] == component
        }
        rank = _most_common(module.rank for module in modules.values())
        alpha = _most_common(float(module.alpha) for module in modules.values())
        config[f"{component}.r"] = rank
        config[f"{component}.lora_alpha"] = alpha
        config[f"{component}.target_modules"] = sorted(modules)
        config[f"{component}.rank_pattern"] = {path: m.rank for path, m in modules.items() if m.rank != rank}
        config[f"{component}.alpha_pattern"] = {
            path: float(m.alpha) for path, m in modules.items() if float(m.alpha) != alpha
        }
    return config


def peft_alpha(
    config: Mapping[str, Any], canonical: str, rank: int, component_given: str | None = None
) -> float | None:
    """The alpha peft would give module ``canonical`` under a ``lora_adapter_metadata`` config:
    its ``alpha_pattern`` entry, else ``lora_alpha``; rsLoRA's alpha / sqrt(r) scaling is folded
    into the returned alpha (scale = alpha / r here). None when the config does not say."""
    component = canonical.split(".", 1)[0]
    prefix = component + "."
    section = {key[len(prefix) :]: value for key, value in config.items() if key.startswith(prefix)}
    if not section and component_given == component:
        section = dict(config)  # an unprefixed LoraConfig given for a single component
    alpha = section.get("lora_alpha")
    path = peft_module_path(canonical)
    pattern_key = _peft_pattern_key(section.get("alpha_pattern") or {}, (path, "text_model." + path))
    if pattern_key is not None:
        alpha = section["alpha_pattern"][pattern_key]
    if alpha is None:
        return None
    if section.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # peft scales rsLoRA by alpha / sqrt(r)
    return float(alpha)


def _peft_pattern_key(patterns: Mapping[str, Any], paths: tuple[str, ...]) -> str | None:
    # The matching rule of peft.utils.other.get_pattern_key (peft is not importable in ComfyUI).
    for pattern in patterns:
        if any(re.match(rf"(.*\.)?({pattern})$", path) for path in paths):
            return pattern
    return None


# ------------------------------------------------------------------------------- architecture

# Clues from the registry: the denoiser's cross-attention width and the text encoders' widths
# that only one family has (768, CLIP-L, is both SD 1.x's and SDXL's first encoder: no clue).
# Text widths are told apart among the UNet families (SD 3's CLIP-G is as wide as SDXL's: a LoRA
# with transformer modules is placed among the DiT families by the clues below instead).
_UNET_FAMILIES = {name: f for name, f in FAMILIES.items() if f.denoiser == DENOISERS[0]}
_CROSS_ATTENTION_DIM = {family.cross_attention_dim: name for name, family in _UNET_FAMILIES.items()}
_WIDTH_COUNT = Counter(e.hidden_size for f in _UNET_FAMILIES.values() for e in f.text_encoders)
_TEXT_HIDDEN = {
    e.hidden_size: f.name for f in _UNET_FAMILIES.values() for e in f.text_encoders if _WIDTH_COUNT[e.hidden_size] == 1
}
# DiT families: the transformer's attention width and the pooled text width of the real models.
_DIT_WIDTH_COUNT = Counter(w for f in FAMILIES.values() for w in f.denoiser_widths)
_DIT_WIDTH = {w: f.name for f in FAMILIES.values() for w in f.denoiser_widths if _DIT_WIDTH_COUNT[w] == 1}
_POOLED_WIDTH = {f.pooled_width: f.name for f in FAMILIES.values() if f.pooled_width}
_DIT_ATTENTION = re.compile(r"^transformer\..*\.attn\.(to_[qkv]|add_[qkv]_proj)$")
# A first text encoder deeper than this has more layers than any CLIP-L (SD 2's OpenCLIP-H: 23).
_CLIP_L_LAYERS = 12
_DEEP_FIRST_ENCODER = {name for name, f in FAMILIES.items() if f.text_encoders[0].layers > _CLIP_L_LAYERS}
_STACKED = {name for name, f in FAMILIES.items() if f.stacked_transformer_blocks}
_CONV_PROJ = {name for name, f in FAMILIES.items() if f.conv_proj_in}
_TRANSFORMER_INDEX = re.compile(r"\.transformer_blocks\.(\d+)\.")
_TEXT_LAYER_INDEX = re.compile(r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.")


def guess_architecture(weights: LoraWeights) -> str | None:
    """The family name (``"sd1"`` ... ``"flux2-klein"``) from module names and shapes; the file's
    metadata (``selma.architecture``, kohya ``ss_base_model_version``, ``modelspec.architecture``)
    when the tensors do not tell; None when neither does or the evidence conflicts.

    The denoiser's modules say which kind of family it is: ``unet.*`` (SD 1.x / 2.x / XL) or
    ``transformer.*`` (the DiT families); clues of the other kind are ignored. UNet evidence (each
    clue read from the family records of ``selma_toolkit.architectures``): a second text encoder,
    ``add_embedding`` or a second transformer block per attention (SDXL); the cross-attention width
    (768 / 1024 / 2048) and text width (1024 / 1280); more than 12 text-encoder layers (SD 2's
    OpenCLIP-H); conv ``proj_in`` (SD 1.x only; SD 2 and SDXL use Linear). DiT families
    (:func:`_guess_dit`): the families whose real-size transformer has every module of the LoRA
    (``selma_toolkit.published``), with its shape; then a module only one family has (Flux's
    guidance embedding, SD 3's ``pos_embed``, Z-Image's refiners...) or a width only one has; then
    the metadata. Flux, Chroma, Qwen-Image and FLUX.2 share their double-stream attention names
    and width (3072): a LoRA of only those is told by its metadata.
    """
    found: set[str] = set()
    excluded: set[str] = set()
    for name, module in weights.modules.items():
        found.update(_evidence(name, module, excluded))
    denoisers = {name.split(".", 1)[0] for name in weights.modules} & set(DENOISERS)
    pool = {name for name, f in FAMILIES.items() if f.denoiser in denoisers} or set(FAMILIES)
    if denoisers == {"transformer"}:
        return _guess_dit(weights, pool, found & pool)
    found &= pool
    candidates = found - excluded
    if len(found) == 1 and candidates:
        return candidates.pop()
    if found:
        return None  # conflicting evidence
    said = _architecture_from_metadata(weights.metadata, excluded)
    if said in pool:
        return said
    if said is None and len(pool) == 1:
        return next(iter(pool))
    return None


def _guess_dit(weights: LoraWeights, pool: set[str], votes: set[str]) -> str | None:
    """A transformer LoRA's family: among the DiT families with every model part it adapts, those
    whose real-size transformer has each of its modules (``named``) and with their shapes
    (``shaped``); one family by shapes, else by a unique module or width (``votes``), else the
    metadata's when it is possible, else the one family the names allow."""
    components = weights.components()
    candidates = {name for name in pool if components <= set(FAMILIES[name].components)}
    named, shaped = set(candidates), set(candidates)
    for name, module in weights.modules.items():
        component, _, path = name.partition(".")
        if component != "transformer":
            continue
        named &= dit_families_with(path)
        shaped &= dit_families_with(path, (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:])))
    for group in (shaped, votes & (named or candidates)):
        if len(group) == 1:
            return next(iter(group))
    said = _architecture_from_metadata(weights.metadata, set())
    if said is not None and said in (shaped or named or candidates):
        return said
    return next(iter(named)) if len(named) == 1 else None


def _evidence(name: str, module: LoraModule, excluded: set[str]) -> set[str]:
    found: set[str] = set()
    in_features = int(module.down.shape[1])
    for family in FAMILIES.values():
        if name.startswith(family.module_prefixes):
            found.add(family.name)
    if _DIT_ATTENTION.match(name) and in_features in _DIT_WIDTH:
        found.add(_DIT_WIDTH[in_features])
    if name == "transformer.time_text_embed.text_embedder.linear_1" and in_features in _POOLED_WIDTH:
        found.add(_POOLED_WIDTH[in_features])
    match = _TRANSFORMER_INDEX.search(name)
    if match and int(match.group(1)) >= 1 and name.startswith("unet."):
        found.update(_STACKED)
    if name.startswith("unet.") and re.search(r"\.attn2\.to_[kv]$", name) and in_features in _CROSS_ATTENTION_DIM:
        found.add(_CROSS_ATTENTION_DIM[in_features])
    text_input = re.search(r"\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc1)$", name)
    if name.startswith("text_encoder") and text_input and in_features in _TEXT_HIDDEN:
        found.add(_TEXT_HIDDEN[in_features])
    match = _TEXT_LAYER_INDEX.search(name)
    if match and int(match.group(1)) >= _CLIP_L_LAYERS:
        found.update(_DEEP_FIRST_ENCODER)
    if name.startswith("unet.") and re.search(r"\.proj_(in|out)$", name):
        if module.is_conv:
            found.update(_CONV_PROJ)
        else:
            excluded.update(_CONV_PROJ)
    return found


def _architecture_from_metadata(metadata: Mapping[str, str], excluded: set[str]) -> str | None:
    family = family_from_metadata(metadata)
    return family.name if family is not None and family.name not in excluded else None


# ----------------------------------------------------------------------------------- helpers


def _most_common(values) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda value: (counts[value], value)) if counts else 0


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _join_sorted(values: set) -> str:
    return ",".join(str(value) for value in sorted(values, key=float))

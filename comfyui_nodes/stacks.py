"""Experts as the nodes pass them: read from the loras folder or the local catalog cache, stacked,
taken from a LORA_STACK, merged once, and a fitted merge written back as a LORA_STACK entry.

* ``SELMA_EXPERTS``: a tuple of :class:`Expert` (name, weight, sha256, the LoRA read from the file).
* ``LORA_STACK``: the list of (file name under models/loras, model weight, clip weight) that
  Comfyroll's CR LoRA Stack and Efficiency Nodes' LoRA Stacker pass around.
* ``LORA_MODEL``: ComfyUI's own LoRA type, a plain tensor dict; a merge is a :class:`LoraStateDict`,
  a dict that also carries the merge's metadata for SELMA Save LoRA.

ComfyUI's ``folder_paths`` is imported inside the functions, so the pack imports without ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.errors import LoraFormatError, Remedy, SelmaError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import LoraWeights, guess_architecture, load_lora, lora_to_state_dict, metadata_value, save_lora
from selma_toolkit.lora.blocks import parse_block_weights
from selma_toolkit.lora.merge import MergeRecord, merge_experts

logger = logging.getLogger(__name__)

NO_EXPERT = "None"  # an empty expert slot, as LoRA stack nodes spell it
CATALOG = "catalog:"  # expert list entries from the catalog: "catalog:<name>" (a loras file name has a suffix)
STACK_FOLDER = "selma/stack"  # where SELMA Merge LoRA Stack writes the merges it emits, under models/loras


@dataclass(frozen=True)
class Expert:
    """One expert of a stack: its name, merge weight, file sha256, and the LoRA read from the file."""

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


# ------------------------------------------------------------------------------ expert names


def loras_folder() -> Path:
    """ComfyUI's first loras folder, where the nodes write."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def cached_catalog() -> dict[str, Any]:
    """The catalog's experts already in the local Hugging Face cache, by name (selma_toolkit.experts);
    none when the catalog cannot be read or huggingface_hub is missing (then only files are listed)."""
    try:
        from selma_toolkit.experts import cached_catalog_experts

        return cached_catalog_experts()
    except (ImportError, SelmaError) as error:
        logger.warning("SELMA nodes: catalog names are not listed: %s", error)
        return {}


def expert_names() -> list[str]:
    """What an expert input offers: the loras folder's files, then ``catalog:<name>`` for each catalog
    expert already pulled (listing never downloads)."""
    import folder_paths

    return list(folder_paths.get_filename_list("loras")) + [CATALOG + name for name in sorted(cached_catalog())]


def expert_path(name: str) -> Path:
    """The file of an expert input's value: a loras folder file, or a pulled catalog expert."""
    import folder_paths

    if name.startswith(CATALOG):
        cached = cached_catalog().get(name[len(CATALOG) :])
        if cached is None:
            raise LoraFormatError(
                what="no pulled catalog expert of that name",
                where=repr(name),
                remedies=[
                    Remedy.do(
                        f"pull it once with SELMA Hub Expert (ref {name[len(CATALOG) :]}) or "
                        f"`selma hub pull {name[len(CATALOG) :]}`, then refresh the node list (press R)"
                    )
                ],
            )
        if cached.sha256 and file_fingerprint(cached.path) != cached.sha256:
            raise LoraFormatError(
                what=f"the cached file {cached.path} does not have the catalog's sha256 {cached.sha256}",
                where=repr(name),
                remedies=[Remedy.do("delete the file and pull it again")],
            )
        return cached.path
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise LoraFormatError(
            f"{name!r}: no such file in the loras folder ({folders}); put the expert's .safetensors file "
            "there (or pull it with SELMA Hub Expert) and refresh the node list (press R)"
        )
    return Path(path)


def fingerprint_of(names: Sequence[str]) -> str:
    """The sha256s of the files of ``names`` (empty slots and missing files left out), for re-runs."""
    known = []
    for name in names:
        if name and name != NO_EXPERT:
            try:
                known.append(file_fingerprint(expert_path(name)))
            except (OSError, SelmaError):
                known.append("")  # the node's run says what is wrong
    return ",".join(known)


def expert(name: str, weight: float, path: str | os.PathLike[str] | None = None) -> Expert:
    """The expert ``name`` with ``weight``, read from ``path`` (default: :func:`expert_path`)."""
    path = Path(path) if path is not None else expert_path(name)
    return Expert(name=name, weight=float(weight), sha256=file_fingerprint(path), lora=load_lora(path))


# ------------------------------------------------------------------------------ LORA_STACK


def experts_from_stack(stack: Sequence[Any] | None) -> list[Expert]:
    """A LORA_STACK's entries as experts, in order: the file name under models/loras, its model weight as
    the merge weight. A merge gives each expert one weight for all its layers, so an entry whose clip
    weight differs from its model weight is refused (the merged LoRA's strength_clip scales the text
    encoders); entries named None are empty slots."""
    experts = []
    for index, entry in enumerate(stack or ()):
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            raise LoraFormatError(
                what="not a LoRA stack entry",
                where=f"lora_stack entry {index + 1}",
                found=repr(entry),
                expected="(file name, model weight, clip weight)",
            )
        name, model_weight, clip_weight = entry
        if name == NO_EXPERT:
            continue
        if float(model_weight) != float(clip_weight):
            raise LoraFormatError(
                what=f"model weight {model_weight} and clip weight {clip_weight} differ; a SELMA merge gives each "
                "expert one weight for all its layers",
                where=f"lora_stack entry {name!r}",
                remedies=[
                    Remedy.do(
                        "set the entry's clip weight equal to its model weight in the stack node (the "
                        "merged LoRA's strength_clip input scales its text-encoder part)"
                    )
                ],
            )
        experts.append(expert(name, float(model_weight)))
    return experts


def stack_entry(lora: LoraStateDict, strength_model: float, strength_clip: float) -> tuple[str, float, float]:
    """``lora`` written under models/loras as STACK_FOLDER/<digest of its merge record>.safetensors
    (once: the same merge is the same file), as a LORA_STACK entry."""
    record = json.dumps(json.loads(lora.metadata["selma.merge"]), sort_keys=True)  # experts' sha256s, settings
    digest = hashlib.sha256(record.encode()).hexdigest()[:16]
    name = f"{STACK_FOLDER}/merged-{digest}.safetensors"
    path = loras_folder() / name
    if not path.is_file():
        from selma_toolkit.lora import lora_from_state_dict

        save_lora(lora_from_state_dict(lora, lora.metadata, source="the merged LoRA"), path)
        logger.info("SELMA Merge LoRA Stack: wrote %s", path)
    return (name, float(strength_model), float(strength_clip))


_saved: dict[tuple[str, str, str], tuple[str, tuple[int, int]]] = {}


def _saved_key(lora: dict, filename_prefix: str, format: str) -> tuple[str, str, str] | None:
    record = getattr(lora, "metadata", {}).get("selma.merge")  # a merge: its experts' sha256s and settings
    return (filename_prefix, format, record) if record else None


def saved_before(lora: dict, filename_prefix: str, format: str) -> str | None:
    """The file (under models/loras) SELMA Save LoRA already wrote for this merge, prefix and format, if
    it is still there unchanged; None for a new merge or any LoRA without a merge record."""
    key = _saved_key(lora, filename_prefix, format)
    if key is None or key not in _saved:
        return None
    name, identity = _saved[key]
    path = loras_folder() / name
    return name if path.is_file() and (path.stat().st_size, path.stat().st_mtime_ns) == identity else None


def remember_saved(lora: dict, filename_prefix: str, format: str, name: str) -> None:
    """Note that the merge in ``lora`` was written as ``name`` (under models/loras)."""
    key = _saved_key(lora, filename_prefix, format)
    if key is not None:
        stat = (loras_folder() / name).stat()
        _saved[key] = (name, (stat.st_size, stat.st_mtime_ns))


# ------------------------------------------------------------------------------ merging


def merge(
    experts: Sequence[Expert],
    method: str,
    rank: int,
    normalize_weights: bool,
    *,
    density: float = 0.5,
    dare_seed: int = 0,
    block_weights: str = "",
    svd_mode: str = "exact",
) -> tuple[LoraStateDict, str]:
    """The experts merged by selma_toolkit.lora.merge_experts: (LORA_MODEL in the family's default layout with the
    merge record, each expert's sha256 included, in its metadata; a one-line summary)."""
    merged = merge_experts(
        [e.lora for e in experts],
        method,
        weights=[e.weight for e in experts],  # type: ignore[arg-type]
        rank=rank or None,
        density=density,
        seed=dare_seed,
        names=[e.name for e in experts],
        normalize=normalize_weights,
        svd_mode=svd_mode,
        block_weights=parse_block_weights(block_weights),  # type: ignore[arg-type]
    )
    record = MergeRecord.read(merged).with_files([e.sha256 for e in experts])
    record.write_to(merged)
    tensors, _ = lora_to_state_dict(merged)  # the family's default layout (lora/writing.py)
    ranks = sorted(merged.ranks())
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    base_model = metadata_value(merged, "base_model")
    summary = (
        f"{method} merge of {len(experts)} experts ({', '.join(e.name for e in experts)}), weights "
        f"{', '.join(f'{w:.4g}' for w in record.weights)}: {len(merged.modules)} modules, rank {rank_text}, "
        f"for {guess_architecture(merged) or 'an unknown architecture'}"
        + (f" (base model {base_model})" if base_model else "")
        + (
            f"; block weights {', '.join(f'{g}={w:g}' for g, w in record.block_weights.items())}"
            if record.block_weights
            else ""
        )
    )
    logger.info("SELMA merge: %s", summary)
    return LoraStateDict(tensors, merged.metadata), summary

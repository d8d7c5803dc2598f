"""Incremental merge: add experts to a merged LoRA and get exactly the merge of all of them.

A merged file written by :func:`~selma_toolkit.lora.merge.merge_files` carries its merge record
(``selma.merge``: method, weights, rank, density, seed and every expert's name, sha256 and
source). :func:`add_to_merge` reads it and

1. finds each listed expert, verified by its sha256: among files the caller names, at its recorded
   source when it is a path (relative to the merged file's folder), beside the merged file, for a
   merge inside a run folder among the run's experts, and where the caller's ``locate`` looks (the
   CLI passes ``experts.listed_expert_places``: a recorded catalog name / Hub repo id, the experts
   a run's recipe lists; this module imports neither the Hub nor the recipe code);
2. when every expert is found, merges the old experts and the new ones from their files with the
   record's settings: the same computation, in the same order, as a from-scratch ``merge_files``;
3. when some are missing, updates the merged file's own factors where that is exact, which it is
   for the linear methods (``linear`` in config/merge_methods.py's table; today selma and delta)
   when the old experts keep their weights up to one factor c (uniform weights: c = T/(T+K)): ``selma`` (A' = c A_m + sum_new w_k A_k, B' likewise with each new
   expert's scale folded in) and ``delta`` (the new experts' factors stacked under the old ones,
   B_m rescaled by c). Both are merge_experts' own rules applied to [merged, new...] with weights
   [c, w_new...], since the merged LoRA has scale 1. The other methods (svd / ties / dare) are not
   linear in the experts (a truncated SVD, sign elections, random masks): without every expert
   they are refused, saying why (the table's ``nonlinear``).
   Block weights g (recorded) multiply B linearly, so they carry over: the new experts' B enter
   scaled by g, and a from-scratch merge (2.) applies them again.

Weights: uniform 1/(T+K) when the old merge was uniform; otherwise the caller gives all T+K.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from selma_toolkit.config.merge_methods import method_spec
from selma_toolkit.errors import LoraFormatError, Remedy
from selma_toolkit.io import sha256_file
from selma_toolkit.lora.core import LoraWeights
from selma_toolkit.lora.files import WRITE_FORMATS, inspect_lora, load_lora, save_lora
from selma_toolkit.lora.merging.api import merge_experts, merge_files
from selma_toolkit.lora.merging.formulas import apply_block_weights
from selma_toolkit.lora.merging.record import MergeRecord, expert_info, file_source

# (merged file, a record entry) -> (where, file) pairs: more places to look for a listed expert.
Locate = Callable[[Path, dict], Iterable[tuple[str, "Path | None"]]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddedMerge:
    """What :func:`add_to_merge` wrote: the file, the LoRA, and how the old experts were used."""

    path: Path
    weights: LoraWeights
    found: list[Path | None]  # each old expert's verified file, in the record's order (None: not found)
    recomputed: bool  # True: merged from every expert file; False: updated from the merged file's factors


def add_to_merge(
    merged: str | os.PathLike[str],
    new: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None = None,
    *,
    weights: Sequence[float] | None = None,
    expert_files: Sequence[str | os.PathLike[str]] = (),
    new_sources: Sequence[str | None] | None = None,
    format: Literal["kohya", "peft", "ai-toolkit"] | None = None,
    locate: Locate | None = None,
) -> AddedMerge:
    """Add the experts ``new`` to the merged LoRA file ``merged``; write the merge of the old
    experts plus the new ones to ``out`` (default: replace ``merged``, atomically).

    ``weights``: one per expert, old ones first (default: uniform 1/(T+K) when the old merge's
    weights were 1/T; needed otherwise). ``expert_files``: files to look at first for the
    listed experts (matched by sha256). ``new_sources``: how each new expert was referenced (a
    catalog name or repo id) for the new record. ``format``: the layout of the output (default:
    the merged file's). ``locate(merged, entry)``: more places for a listed expert, as (where,
    file) pairs (``experts.listed_expert_places``: its recorded catalog name or repo id, a run's
    listed experts); without it only files are looked at. Raises LoraFormatError where the merge cannot be extended exactly.
    """
    merged, out = Path(merged), Path(out) if out is not None else Path(merged)
    new_paths = [Path(p) for p in new]
    if not new_paths:
        raise LoraFormatError("add_to_merge: no expert to add; give at least one LoRA file")
    info = inspect_lora(merged)
    record = MergeRecord.read(info.weights)
    if record is None:
        raise LoraFormatError(
            what="has no merge record (selma.merge metadata), so the experts it was made from are not known",
            where=str(merged),
            remedies=[
                Remedy.run("selma merge EXPERT... NEW.safetensors --out FILE", note="the experts merged from scratch")
            ],
        )
    old = record.experts
    total = len(old) + len(new_paths)
    weights = _weights_for(merged, record, weights, total)

    listed = {entry.get("sha256") for entry in old}
    new_digests = [sha256_file(path) for path in new_paths]  # once: the exact update records them too
    for path, digest in zip(new_paths, new_digests):
        if digest in listed:
            raise LoraFormatError(
                f"{path}: is already one of the experts of {merged} (same sha256); adding it again would count it twice"
            )
    written = [layout for layout in info.layouts if layout in WRITE_FORMATS]
    format = format or (written[0] if len(written) == 1 else None)  # None: the family's default
    found, looked = _find_experts(merged, old, expert_files, locate)
    missing = [(entry, places) for entry, path, places in zip(old, found, looked) if path is None]
    if not missing:
        paths = [*found, *new_paths]
        sources = [_kept_source(entry) for entry in old] + list(new_sources or [None] * len(new_paths))
        result = merge_files(
            paths,
            out,
            record.method,
            weights,
            record.rank,
            format=format,
            density=record.density or 0.5,
            seed=record.seed or 0,
            svd_mode=record.svd_mode or "exact",
            sources=sources,
            block_weights=record.block_weights,
        )
        log.info(
            "merged the %d listed experts and %d new one(s) from their files into %s", len(old), len(new_paths), out
        )
        return AddedMerge(out, result, found, recomputed=True)
    scale = _common_scale(record.weights, weights[: len(old)])
    if not method_spec(record.method).linear or scale is None:
        raise _missing_error(merged, record, missing)
    result = _update_linear(
        merged, info.weights, record, new_paths, new_digests, new_sources, out, format, scale, weights
    )
    log.info(
        "%s: %d listed expert(s) not found; updated the merged factors exactly (%s rule)",
        merged,
        len(missing),
        record.method,
    )
    return AddedMerge(out, result, found, recomputed=False)


def _weights_for(merged: Path, record: MergeRecord, weights: Sequence[float] | None, total: int) -> list[float]:
    """The new merge's weights: the given ones, or uniform 1/total when the old ones were uniform."""
    old = [float(w) for w in record.weights]
    if weights is not None:
        if len(weights) != total:
            raise LoraFormatError(
                f"weights: got {len(weights)} for {total} experts ({len(old)} in {merged.name} and "
                f"{total - len(old)} new); give one per expert, the merged file's experts first"
            )
        return [float(w) for w in weights]
    if all(math.isclose(w, 1.0 / len(old), rel_tol=1e-9) for w in old):
        return [1.0 / total] * total  # what merge_experts' default gives, value for value
    example = ",".join(f"{w:g}" for w in old) + "," + ",".join(["W"] * (total - len(old)))
    raise LoraFormatError(
        what=f"its {len(old)} experts were merged with weights {old}, not uniformly, so the weights of {total} "
        "experts cannot be inferred",
        where=str(merged),
        remedies=[Remedy.give("weights", example)],
    )


def _common_scale(old: Sequence[float], new: Sequence[float]) -> float | None:
    """c with new_t = c * old_t for every old expert t, or None: the condition under which a linear
    merge of the old experts can be reweighted through its merged factors alone."""
    if any(w == 0 for w in old):
        return None
    ratios = [n / o for n, o in zip(new, old)]
    return ratios[0] if all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios) else None


def _kept_source(entry: dict) -> str | None:
    """A recorded source worth keeping as it is: a catalog name or repo id (paths are re-derived)."""
    source = entry.get("source")
    return source if source and not is_file_source(source) else None


def is_file_source(source: str) -> bool:
    """A recorded file path (merge_files writes them relative), not a catalog name or ``owner/name[:file]``."""
    return Path(source).is_absolute() or (source.lower().endswith(".safetensors") and ":" not in source)


# ---------------------------------------------------------------------------- finding experts


def _candidates(
    merged: Path, entry: dict, expert_files: Sequence[Path], locate: Locate | None
) -> Iterator[tuple[str, Path | None]]:
    """(where, file) for each place a listed expert may be, in order; file None when that place failed."""
    yield from ((f"given file {p}", p) for p in expert_files)
    source = entry.get("source")
    if source and is_file_source(source):
        path = Path(source) if Path(source).is_absolute() else Path(os.path.normpath(merged.parent / source))
        yield f"recorded source {path}", path
    yield f"beside the merged file: {merged.parent / entry['name']}", merged.parent / entry["name"]
    run_root = merged.resolve().parent.parent
    if (run_root / "recipe.toml").is_file():
        yield f"the run's experts: {run_root / 'experts' / entry['name']}", run_root / "experts" / entry["name"]
    if locate is not None:  # references (catalog names, repo ids, a run's listed experts): experts.py
        yield from locate(merged, entry)


def _find_experts(
    merged: Path, old: Sequence[dict], expert_files: Sequence[str | os.PathLike[str]], locate: Locate | None
) -> tuple[list[Path | None], list[list[str]]]:
    """Each listed expert's verified file (or None) and where it was looked for, in the record's order."""
    digests: dict[Path, str] = {}
    given = [Path(p) for p in expert_files]
    found: list[Path | None] = []
    looked: list[list[str]] = []
    for entry in old:
        wanted, places, hit = entry.get("sha256"), [], None
        if not wanted:
            places.append("nowhere: the record has no sha256 for it, so no file can be verified")
        for where, path in _candidates(merged, entry, given, locate) if wanted else ():
            if path is None or not path.is_file():
                places.append(f"{where} (none)" if path is not None else where)
                continue
            key = path.resolve()
            if key not in digests:
                digests[key] = sha256_file(path)
            if digests[key] == wanted:
                hit = path
                break
            places.append(f"{where} (another file: sha256 {digests[key][:12]})")
        found.append(hit)
        looked.append(places)
    return found, looked


def _missing_error(merged: Path, record: MergeRecord, missing: Sequence[tuple[dict, list[str]]]) -> LoraFormatError:
    """Which experts were not found and where they were looked for; why the merge cannot do without them."""
    lines = []
    for entry, places in missing:
        label = f"{entry['name']} (skill {entry.get('skill') or '?'}, sha256 {(entry.get('sha256') or '?')[:12]})"
        lines.append(f"{label}; looked at: " + "; ".join(places))
    spec = method_spec(record.method)
    if not spec.linear:
        why = (
            f"the {record.method} merge is not linear in its experts ({spec.nonlinear}), so it can be extended "
            "exactly only from every expert file"
        )
    else:
        why = (
            "the weights given for the old experts are not proportional to the ones they were merged with, so their "
            "updates must be reweighted one by one, which needs their files"
        )
    return LoraFormatError(
        what=f"{len(missing)} of its {len(record.experts)} experts were not found",
        where=str(merged),
        details=[*lines, f"{why}."],
        remedies=[
            Remedy.give("expert_files", noun="the missing files", note="they are matched by sha256"),
            Remedy.run("selma hub pull NAME", note="to pull them"),
        ],
    )


# ------------------------------------------------------------------------------ exact updates


def _update_linear(
    merged: Path,
    merged_lora: LoraWeights,
    record: MergeRecord,
    new_paths: Sequence[Path],
    new_digests: Sequence[str],
    new_sources: Sequence[str | None] | None,
    out: Path,
    format: str,
    scale: float,
    weights: Sequence[float],
) -> LoraWeights:
    """The merge (of a linear method: selma, delta) of T old experts, known only through the merged factors (scale 1),
    with weights ``scale`` * their old ones, and K new ones: merge_experts' rule on [merged, new...]
    with weights [scale, w_new...] (uniform: [T/(T+K), 1/(T+K), ...])."""
    old, new_loras = record.experts, [load_lora(p) for p in new_paths]
    merged_lora = LoraWeights(modules=merged_lora.modules, metadata={})  # its metadata names the old experts
    # Block weights g scale the merged B linearly (B_m = g * rule(...)), so the new experts enter
    # with their B scaled by g; the merged factors already carry it (g = 0 modules keep their A).
    scaled = [apply_block_weights(lora, record.block_weights) for lora in new_loras]
    result = merge_experts(
        [merged_lora, *scaled],
        record.method,
        [scale, *weights[len(old) :]],  # type: ignore[arg-type]
        names=[merged.name, *(p.name for p in new_paths)],
    )
    sources = list(new_sources or [None] * len(new_paths))
    entries = [{**entry, "source": _rebased_source(entry, merged, out)} for entry in old]
    for path, lora, digest, source in zip(new_paths, new_loras, new_digests, sources):
        entries.append({**expert_info(path.name, lora, digest), "source": file_source(path, out, source)})
    replace(record, weights=list(weights), experts=entries).write_to(result)
    save_lora(result, out, format=format)  # type: ignore[arg-type]
    return result


def _rebased_source(entry: dict, merged: Path, out: Path) -> str | None:
    """An old expert's recorded source, as seen from the new file's folder."""
    source = entry.get("source")
    if not source or not is_file_source(source) or Path(source).is_absolute():
        return source
    return file_source(merged.parent / source, out)

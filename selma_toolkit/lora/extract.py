"""A LoRA extracted from a fine-tuned model and the base it was trained from: every Linear and
Conv weight present in both is compared, one layer pair in memory at a time, and each changed
layer's difference is factored at the rank its spectrum shows above the rounding floor
(:mod:`selma_toolkit.lora.spectrum`), or at a fixed rank.

A model fused with a LoRA (the SELMA authors' published models: base + the merged LoRA) gives
back that LoRA, at its rank in every layer; a full fine-tune or DreamBooth model gives its best
rank-N approximation (``rank=N``), as kohya's ``extract_lora_from_models.py`` and ComfyUI's
LoRA-extract node do, but streamed. The result is a :class:`~selma_toolkit.lora.core.LoraWeights`
saved by ``save_lora`` (kohya layout by default), with both sources, every layer's rank, captured
energy and noise floor in its metadata (``selma.extract``).

Models are local here (a diffusers folder or a single-file checkpoint, ``lora.model_weights``);
Hub ids are resolved by ``selma_toolkit.hub.extraction``, which calls this module.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import statistics
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selma_toolkit.architectures import COMPONENTS
from selma_toolkit.errors import ModelError, Option, Remedy
from selma_toolkit.io import sha256_file
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.files import full_rank_module, save_lora
from selma_toolkit.lora.metadata import lora_metadata
from selma_toolkit.lora.model_weights import ModelWeights, open_model_weights
from selma_toolkit.lora.spectrum import SAFETY, LayerFit, fit_layer

log = logging.getLogger(__name__)

EXTRACT_METADATA_KEY = "selma.extract"
EXTRACTION_VERSION = 1  # bump when the rank rule or the file written changes (extraction caches key on it)
# |D| / |W| at which a full-rank difference is "large": a LoRA fused at SELMA's strength changes a
# layer by about 1e-3-1e-2 of it; an unrelated base differs by about 1.4 (two random weights).
LARGE_CHANGE = 0.05
_EARLY_VERDICT = 8  # changed layers after which a difference no LoRA makes stops the extraction
_LAYER_COLUMNS = ("status", "rank", "found", "width", "energy", "floor", "top", "relative", "error", "raw_error")
_SHA256_BLOB = re.compile(r"^[0-9a-f]{64}$")
Progress = Callable[[str, int, int | None], None]


@dataclass
class Source:
    """Where a model came from, for the metadata and messages: what the user gave, the Hub
    revision asked for and the commit it resolved to (Hub models), and the files read."""

    ref: str
    revision: str | None = None
    commit: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, filled by the extraction


@dataclass
class LayerReport:
    """One compared layer: the fit's figures without its tensors."""

    name: str
    shape: tuple[int, ...]
    status: str
    rank: int
    found: int
    width: int
    energy: float
    floor: float
    top: float
    cliff: float
    tail_excess: float
    relative: float
    error: float
    raw_error: float
    solver: str


@dataclass
class Extraction:
    """The extracted LoRA and what the extraction found in every layer."""

    weights: LoraWeights
    layers: list[LayerReport]
    model: Source
    base: Source
    rank: str | int
    family: str | None

    @property
    def changed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status != "unchanged"]

    def summary(self) -> dict[str, Any]:
        """Counts and figures for a report: layers changed / unchanged, stored-rank histogram,
        full-rank layers by width, captured energy, estimated recovery error against the raw difference."""
        changed = self.changed
        low = [layer for layer in changed if layer.status == "low-rank"]
        full = [layer for layer in changed if layer.status == "full-rank"]
        error = math.sqrt(sum(layer.error**2 for layer in changed))
        raw = math.sqrt(sum(layer.raw_error**2 for layer in changed))
        return {
            "compared": len(self.layers),
            "changed": len(changed),
            "unchanged": len(self.layers) - len(changed),
            "low_rank": len(low),
            "full_rank": len(full),
            "ranks": dict(sorted(Counter(layer.rank for layer in changed).items())),
            "found_ranks": dict(sorted(Counter(layer.found for layer in changed).items())),
            "full_rank_widths": dict(sorted(Counter(layer.width for layer in full).items())),
            "energy_min": min((layer.energy for layer in low), default=1.0),
            "energy_median": statistics.median([layer.energy for layer in low]) if low else 1.0,
            "relative_median": statistics.median([layer.relative for layer in changed]) if changed else 0.0,
            "error_vs_raw": error / raw if raw else 0.0,
        }


def extract_lora(
    model: str | Path,
    base: str | Path,
    *,
    rank: str | int = "auto",
    components: Sequence[str] | None = None,
    allow_pickle: bool = False,
    model_source: Source | None = None,
    base_source: Source | None = None,
    progress: Progress | None = None,
) -> Extraction:
    """Extract the LoRA that turns ``base`` into ``model`` (local diffusers folders or single-file
    checkpoints). ``rank``: "auto" (each layer's rank read from its spectrum) or N (the best
    rank-N approximation). ``components``: model parts to compare (default: every denoiser and
    text encoder the two share). ``model_source`` / ``base_source``: provenance for the metadata
    (default: the paths). Raises ModelError, naming both models, for different architectures,
    identical models, a pickle-only model without ``allow_pickle``, and (``rank="auto"``) a
    difference no LoRA makes."""
    rank_n = _rank_setting(rank)
    model_source = model_source or Source(str(model))
    base_source = base_source or Source(str(base))
    wanted = _components(components)
    with (
        open_model_weights(
            model, f"the fine-tuned model {model_source.ref!r}", components=wanted, allow_pickle=allow_pickle
        ) as fine,
        open_model_weights(
            base, f"the base model {base_source.ref!r}", components=wanted, allow_pickle=allow_pickle
        ) as start,
    ):
        names = _paired_layers(fine, start, model_source.ref, base_source.ref)
        log.info("comparing %d layers of %s with %s (rank %s)", len(names), model_source.ref, base_source.ref, rank)
        hashing = _Hashes([*fine.files, *start.files])
        modules: dict[str, LoraModule] = {}
        reports: list[LayerReport] = []
        hint = 0
        for done, name in enumerate(fine.in_file_order(names)):
            fine_weight, base_weight = fine.read(name), start.read(name)
            fit = fit_layer(fine_weight, base_weight, rank_n, rank_hint=hint)
            reports.append(_report(name, tuple(fine_weight.shape), fit))
            if fit.status != "unchanged":
                modules[name] = _module(fit, tuple(fine_weight.shape), _factor_dtype(fine_weight))
                hint = max(hint, fit.found)  # sizes the range finder of the next layers
            if rank_n is None:
                _early_verdict(reports, model_source.ref, base_source.ref)
            if progress is not None:
                progress("layers", done + 1, len(names))
            _return_freed_memory()
        family = fine.family or start.family
    _check_result(reports, rank_n, model_source.ref, base_source.ref)
    for source, files in ((model_source, fine.files), (base_source, start.files)):
        source.files = {_file_label(file): hashing.digest(file) for file in files}
    extraction = Extraction(
        LoraWeights(dict(sorted(modules.items()))),
        reports,
        model_source,
        base_source,
        rank if rank_n is None else rank_n,
        family,
    )
    extraction.weights.metadata = extraction_metadata(extraction)
    summary = extraction.summary()
    log.info("%d layers changed (ranks %s), %d unchanged", summary["changed"], summary["ranks"], summary["unchanged"])
    return extraction


def save_extraction(extraction: Extraction, path: str | Path, format: str | None = None) -> Path:
    """Write the extracted LoRA with ``save_lora``: in the family's default layout, which diffusers
    and ComfyUI both load (kohya for SD 1.x / 2.x / XL), or ``format``."""
    return save_lora(extraction.weights, path, format=format)  # type: ignore[arg-type]


def extraction_metadata(extraction: Extraction) -> dict[str, str]:
    """The file's ``__metadata__`` entries: base model, family, and ``selma.extract`` (JSON): both
    sources with their files' sha256, the rank setting, the threshold factor, and per changed
    layer its status, stored and found rank, width, captured energy, noise floor, top singular
    value, |D| / |W| and the estimated error against the raw difference's."""
    layers = {layer.name: [getattr(layer, column) for column in _LAYER_COLUMNS] for layer in extraction.changed}
    record = {
        "version": EXTRACTION_VERSION,
        "rank": extraction.rank,
        "safety": SAFETY,
        "model": asdict(extraction.model),
        "base": asdict(extraction.base),
        "compared": len(extraction.layers),
        "unchanged": len(extraction.layers) - len(layers),
        "columns": list(_LAYER_COLUMNS),
        "layers": {name: [_rounded(v) for v in row] for name, row in layers.items()},
    }
    title = f"{Path(extraction.model.ref).name} - {Path(extraction.base.ref).name}"
    return lora_metadata(
        base_model=extraction.base.ref,
        architecture=extraction.family,
        title=title,
        description=f"LoRA extracted from {extraction.model.ref} against its base {extraction.base.ref}",
        **{EXTRACT_METADATA_KEY: json.dumps(record, separators=(",", ":"))},
    )


# ------------------------------------------------------------------------------------- checks


def _rank_setting(rank: str | int) -> int | None:
    if rank == "auto":
        return None
    try:
        value = int(rank)
    except (TypeError, ValueError):
        value = 0
    if value < 1 or str(rank).strip() != str(value):
        raise ModelError(
            what="not a rank",
            where=Option("rank"),
            found=rank,
            expected="'auto' (read from each layer's spectrum) or a positive integer",
        )
    return value


def _components(components: Sequence[str] | None) -> set[str] | None:
    if components is None:
        return None
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ModelError(
            what="not model parts",
            where=Option("components"),
            found=list(components),
            expected=f"some of {', '.join(COMPONENTS)}",
        )
    return set(components)


def _paired_layers(fine: ModelWeights, start: ModelWeights, model: str, base: str) -> list[str]:
    """The layers both models have, after checking that they are one architecture."""
    if fine.family and start.family and fine.family != start.family:
        raise ModelError(
            f"{model} is an {fine.family} model but {base} is an {start.family} model: a LoRA is the "
            f"difference of two models of one architecture; give the base {model} was trained from"
        )
    shared = fine.components() & start.components()
    if not shared:
        raise ModelError(
            f"{model} has {', '.join(sorted(fine.components())) or 'no model part'} and {base} has "
            f"{', '.join(sorted(start.components())) or 'no model part'}: no model part to compare"
        )
    names = {n for n in fine.weights if n.split(".", 1)[0] in shared}
    base_names = {n for n in start.weights if n.split(".", 1)[0] in shared}
    for name in sorted(names & base_names):
        if fine.weights[name].shape != start.weights[name].shape:
            raise ModelError(
                f"{model} and {base} are different architectures: layer {name} is "
                f"{list(fine.weights[name].shape)} in the first and {list(start.weights[name].shape)} in the second"
            )
    one_sided = sorted(names ^ base_names)
    if len(one_sided) > 0.1 * len(names | base_names):
        examples = ", ".join(f"{n} (only in {model if n in names else base})" for n in one_sided[:3])
        raise ModelError(
            f"{model} and {base} are different architectures: {len(one_sided)} of {len(names | base_names)} "
            f"layers are in one model only, e.g. {examples}"
        )
    if one_sided:
        log.warning("%d layers are in one model only and are not compared, e.g. %s", len(one_sided), one_sided[0])
    return sorted(names & base_names)


def _early_verdict(reports: list[LayerReport], model: str, base: str) -> None:
    """Stop early when the first changed layers all differ by large full-rank updates."""
    changed = [r for r in reports if r.status != "unchanged"]
    if len(changed) == _EARLY_VERDICT and all(r.status == "full-rank" and r.relative >= LARGE_CHANGE for r in changed):
        _raise_not_a_lora(changed, changed, 0, model, base)


def _check_result(reports: list[LayerReport], rank: int | None, model: str, base: str) -> None:
    changed = [r for r in reports if r.status != "unchanged"]
    if not changed:
        same = (
            "identical weights"
            if all(r.top == 0.0 for r in reports)
            else ("the same weights up to rounding (one may be a copy of the other in another dtype)")
        )
        raise ModelError(
            f"{model} and {base} hold {same} in all {len(reports)} compared layers: there is no difference to "
            f"extract. Is {model} the fine-tuned model?"
        )
    if rank is not None:
        return
    low_rank = max((r.rank for r in changed if r.status == "low-rank"), default=0)
    offending = [r for r in changed if r.status == "full-rank" and r.width > low_rank and r.relative >= LARGE_CHANGE]
    if offending:
        _raise_not_a_lora(offending, changed, low_rank, model, base)


def _raise_not_a_lora(
    offending: list[LayerReport], changed: list[LayerReport], low_rank: int, model: str, base: str
) -> None:
    worst = max(offending, key=lambda r: r.relative)
    elsewhere = f"the other layers' ranks are at most {low_rank}" if low_rank else "no layer has a low rank"
    median = statistics.median(r.relative for r in offending)
    raise ModelError(
        what=f"{model} differs from {base} by full-rank changes of {median:.2g} of the weights (median) in "
        f"{len(offending)} of the {len(changed)} changed layers seen (e.g. {worst.name}: full rank {worst.width}, "
        f"|D|/|W| = {worst.relative:.2g}), and {elsewhere}: no LoRA makes such a difference (is {base} the model "
        f"{model} was trained from?)",
        remedies=[Remedy.set("rank", None, note="for a full fine-tune: its best rank-N approximation")],
    )


# ------------------------------------------------------------------------------------- pieces


def _report(name: str, shape: tuple[int, ...], fit: LayerFit) -> LayerReport:
    return LayerReport(
        name,
        shape,
        fit.status,
        fit.rank,
        fit.found,
        fit.width,
        fit.energy,
        fit.floor,
        fit.top,
        fit.cliff,
        fit.tail_excess,
        fit.relative,
        fit.error,
        fit.raw_error,
        fit.solver,
    )


def _factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """The LoRA's dtype: the fine-tuned model's when it is a 16-bit float (its precision is all
    there is to keep), float32 otherwise."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32


def _module(fit: LayerFit, shape: tuple[int, ...], dtype: torch.dtype) -> LoraModule:
    """The fit as a LoRA module of the layer's shape, scale 1 (alpha = rank)."""
    if fit.status == "full-rank":
        assert fit.difference is not None
        return full_rank_module(fit.difference.reshape(shape).to(dtype))
    assert fit.up is not None and fit.down is not None
    down, up = fit.down.to(dtype).contiguous(), fit.up.to(dtype).contiguous()
    if len(shape) == 4:  # conv: A is a conv of the layer's kernel, B a 1x1 conv
        down, up = down.reshape(fit.rank, *shape[1:]), up.reshape(shape[0], fit.rank, 1, 1)
    return LoraModule(down=down, up=up, alpha=float(fit.rank))


class _Hashes:
    """sha256 of the source files, computed by a background thread while the layers are factored
    (a Hugging Face cache blob is named by its sha256 already and is not read again)."""

    def __init__(self, files: list[Path]):
        self._digests: dict[Path, str] = {}
        self._thread = threading.Thread(target=self._run, args=(files,), daemon=True)
        self._thread.start()

    def _run(self, files: list[Path]) -> None:
        for file in files:
            blob = file.resolve()
            self._digests[file] = (
                blob.name if blob.parent.name == "blobs" and _SHA256_BLOB.match(blob.name) else sha256_file(file)
            )

    def digest(self, file: Path) -> str:
        self._thread.join()
        return self._digests[file]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def _return_freed_memory() -> None:
    """Give the heap pages freed by a layer's temporaries back to the system. Each layer allocates
    and frees tens of MB between the LoRA factors that are kept, and glibc leaves those holes
    resident: 560 SDXL-sized layers at rank 640 peaked at 3.6 GB RSS for a 1.9 GB LoRA, 2.2 GB
    when trimmed after each layer (a synthetic run of the same allocations)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _file_label(file: Path) -> str:
    """A file's name in the metadata: with its model part's folder (``unet/...safetensors``)."""
    return f"{file.parent.name}/{file.name}" if file.parent.name in COMPONENTS else file.name


def _rounded(value: Any) -> Any:
    """Numbers for the metadata: 6 significant digits; infinity (no cliff after a full rank) as null."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value

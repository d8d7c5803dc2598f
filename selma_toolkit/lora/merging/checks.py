"""The checks of a merge's inputs before any formula runs: weights, options, experts that fit."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from selma_toolkit.config.merge_methods import FACTORED_METHODS, METHODS, SVD_MODES, MethodSpec, listing, method_spec
from selma_toolkit.errors import LoraFormatError, Option, Remedy
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.merging.formulas import Part
from selma_toolkit.lora.metadata import metadata_value

logger = logging.getLogger("selma_toolkit.lora.merge")  # the merge's one logger name, as before the split


def expert_weights(
    weights: Sequence[float] | None, count: int, *, normalize: bool = False, method: str = "selma"
) -> list[float]:
    """The effective per-expert weights: uniform 1/T when none are given, else the given ones
    (divided by their sum with ``normalize``), checked for count, finiteness and the method."""
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise LoraFormatError(
            f"weights: got {len(values)} weight(s) for {count} expert(s); give one weight per expert in the "
            f"same order (e.g. {','.join(['0.5'] * count)}), or none for uniform 1/T"
        )
    if not all(math.isfinite(w) for w in values):
        raise LoraFormatError(f"weights: {values} contains a non-finite value; expected finite numbers")
    if normalize:
        total = math.fsum(values)
        if total == 0:
            raise LoraFormatError(
                f"weights: {values} sum to 0 and cannot be normalised; give weights with a non-zero sum"
            )
        values = [w / total for w in values]
    spec = METHODS.get(method)
    if spec is not None and spec.positive_weights and any(w <= 0 for w in values):
        raise LoraFormatError(
            what=f"method {method} {spec.positive_weights} and needs weights > 0",
            where="weights",
            found=values,
            remedies=[
                Remedy.set("method", "delta"),
                Remedy.set("method", "svd", note="they take negative or zero weights"),
            ],
        )
    return values


def check_options(method: str, rank: int | None, density: float, svd_mode: str) -> None:
    """The settings against the method's rules (methods.py): only re-factoring methods take a
    rank, a positive one; density a share in (0, 1] where the method uses it; a known SVD mode."""
    spec = method_spec(method)
    if rank is not None and not spec.dense:
        raise LoraFormatError(
            what=f"only {listing(FACTORED_METHODS, 'and')} choose an output rank; {method} keeps {spec.kept_rank}",
            where=Option("rank"),
            found=rank,
            remedies=[Remedy.unset("rank"), Remedy.set("method", "svd")],
        )
    if rank is not None and rank < 1:
        raise LoraFormatError(what="", where=Option("rank"), found=rank, expected="a positive integer")
    if spec.density and not 0.0 < density <= 1.0:
        raise LoraFormatError(
            what="", where=Option("density"), found=density, expected="a share in (0, 1] of the entries to keep"
        )
    if svd_mode not in SVD_MODES:
        raise LoraFormatError(what="", where=Option("svd_mode"), found=svd_mode, expected="'exact' or 'randomized'")


def check_compatible(experts: Sequence[LoraWeights], names: Sequence[str], architectures: Sequence[str | None]) -> None:
    """Different architectures -> error; different base models of the same shapes -> warning."""
    known = [(i, arch) for i, arch in enumerate(architectures) if arch]
    for index, architecture in known[1:]:
        first, first_architecture = known[0]
        if architecture != first_architecture:
            raise LoraFormatError(
                what=f"{names[first]} is a LoRA for {first_architecture} but {names[index]} is one for {architecture} "
                f"(module {_module_telling_apart(experts[first], experts[index])}); experts for different base "
                "architectures cannot be merged",
                remedies=[Remedy.do("merge only experts trained for one base model")],
            )
    base_models = {names[i]: base for i, expert in enumerate(experts) if (base := metadata_value(expert, "base_model"))}
    if len(set(base_models.values())) > 1:
        logger.warning(
            "the experts name different base models: %s; their shapes fit, so they are merged, but the result "
            "is only meaningful on one base model",
            ", ".join(f"{name}: {base}" for name, base in base_models.items()),
        )


def _module_telling_apart(first: LoraWeights, other: LoraWeights) -> str:
    """A module name that shows why two LoRAs differ: shared with another shape, or in one only."""
    for name, module in first.modules.items():
        if name in other.modules and layer_shape(module) != layer_shape(other.modules[name]):
            return f"{name}: {layer_shape(module)} vs {layer_shape(other.modules[name])}"
    only = sorted(set(first.modules) ^ set(other.modules))
    return f"{only[0]} in one file only" if only else next(iter(first.modules), "(none)")


def layer_shape(module: LoraModule) -> tuple[int, ...]:
    """The adapted layer's weight shape: [out, in] or [out, in, kh, kw]."""
    return (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))


def check_shapes(module_name: str, parts: Sequence[Part], names: Sequence[str]) -> None:
    """Every expert's part of one module adapts a layer of one shape."""
    first = parts[0]
    for part in parts[1:]:
        if layer_shape(part.module) != layer_shape(first.module):
            raise LoraFormatError(
                f"{names[first.index]} and {names[part.index]} do not fit together: module {module_name} adapts a "
                f"layer of shape {layer_shape(first.module)} in the first and {layer_shape(part.module)} in the "
                "second; experts for different base architectures (e.g. SD 1.x and SDXL) cannot be merged"
            )


def check_ranks(spec: MethodSpec, module_name: str, parts: Sequence[Part], names: Sequence[str]) -> None:
    """Equal ranks for the methods that need them (``equal_ranks`` in the table)."""
    if spec.equal_ranks and len({p.module.rank for p in parts}) > 1:
        listed = ", ".join(f"{names[p.index]}: rank {p.module.rank}" for p in parts)
        raise LoraFormatError(
            what=f"method {spec.name} {spec.equal_ranks} and needs equal ranks",
            where=f"module {module_name}",
            found=listed,
            remedies=[
                Remedy.set("method", "delta", note="the exact weighted sum of updates, rank = sum of ranks"),
                Remedy.set("method", "svd", also={"rank": None}),
            ],
        )


def warn_missing(experts: Sequence[LoraWeights], names: Sequence[str], module_names: Sequence[str]) -> None:
    """A warning per expert that lacks some of the modules: they count as zero updates for it."""
    for name, expert in zip(names, experts):
        missing = [m for m in module_names if m not in expert.modules]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            logger.warning(
                "%s lacks %d of the %d modules the experts adapt; they count as zero updates for it: %s",
                name,
                len(missing),
                len(module_names),
                shown,
            )

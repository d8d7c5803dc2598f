"""Merging LoRA experts into one LoRA: every method, exactly, in this one place.

The ComfyUI nodes, the diffusers adapter and ``selma merge`` all call :func:`merge_experts`;
none of them re-implements a formula. Needs only torch (and safetensors for files).

Memory: modules are merged one at a time. Besides the inputs and the (low-rank) output, at most
one module's dense update and a few accumulators of the same shape are alive at any moment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora.blocks import BlockWeights, check_block_weights, module_block_weight, unused_groups
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.files import lora_from_state_dict, save_lora
from selma_toolkit.lora.metadata import SELMA_PREFIX, guess_architecture, metadata_value
from selma_toolkit.lora.safetensors_file import read_safetensors_with_sha256

logger = logging.getLogger(__name__)

MergeMethod = Literal["selma", "delta", "svd", "ties", "dare"]
MERGE_METHODS: tuple[str, ...] = ("selma", "delta", "svd", "ties", "dare")
FACTORED_METHODS = ("svd", "ties", "dare")  # methods that re-factor a dense update to a chosen rank
SvdMode = Literal["exact", "randomized"]
# Metadata key of the merged file: a JSON string with everything needed to recompute the merge.
MERGE_METADATA_KEY = "selma.merge"
_RANDOMIZED_OVERSAMPLE = 10
_RANDOMIZED_ITERATIONS = 4
_THREADED_SVD_ENTRIES = 512 * 512  # dense updates from this size on are factored with every torch thread


@dataclass(frozen=True)
class _Part:
    """One expert's contribution to one module."""

    index: int
    weight: float
    module: LoraModule


def merge_experts(
    experts: Sequence[LoraWeights],
    method: MergeMethod = "selma",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    density: float = 0.5,
    seed: int = 0,
    names: Sequence[str] | None = None,
    normalize: bool = False,
    svd_mode: SvdMode = "exact",
    block_weights: BlockWeights | None = None,
) -> LoraWeights:
    """Merge T LoRA experts into one LoRA.

    Convention: each expert's scale s_t = alpha_t / r_t is folded into its B first,
    B'_t = s_t B_t, so that expert t's update of a layer is dW_t = B'_t @ A_t with A_t [r_t, in]
    and B'_t [out, r_t] (conv layers: A_t [r_t, in, kh, kw], B_t [out, r_t, 1, 1], and the dense
    update is taken on the flattened [out, in*kh*kw] matrix). Weights w_t default to uniform
    1/T; ``normalize=True`` divides the given weights by their sum (ComfyUI's "normalise weights").
    Every merged module has scale 1 (alpha = its rank), so the merged update is B_m @ A_m.

    Methods, per module:

    * ``selma`` (the paper's rule): A_m = sum_t w_t A_t [r, in], B_m = sum_t w_t B'_t [out, r], so
      B_m @ A_m = sum_s sum_t w_s w_t B'_s @ A_t, cross terms included. Needs equal ranks.
    * ``delta``: B_m @ A_m = sum_t w_t B'_t @ A_t exactly, stored losslessly by stacking ranks:
      A_m = cat_t A_t [sum r_t, in], B_m = cat_t w_t B'_t [out, sum r_t]. Equal to diffusers
      ``set_adapters`` with weights w_t, and to peft ``add_weighted_adapter(..., "cat")``.
    * ``svd``: D = sum_t w_t dW_t [out, in], re-factored to ``rank`` by truncated SVD
      D ~ (U_r S_r) @ Vh_r, B_m = U_r S_r [out, rank], A_m = Vh_r [rank, in]
      (``svd_mode="randomized"`` uses torch.svd_lowrank with ``seed``: faster, approximate).
    * ``ties`` (Yadav et al. 2023): trim each dW_t to its ``density`` share of largest-magnitude
      entries (dW^_t); elect a sign per entry, sign(sum_t w_t dW^_t); keep the entries that agree,
      m_t = [sign(dW^_t) = elected, dW^_t != 0]; take their weighted mean and scale it by
      lambda = sum_t w_t:  D = lambda * (sum_t w_t m_t dW^_t) / (sum_t w_t m_t)  (0 where no
      entry agrees); then re-factored like ``svd``. With 1/T weights, lambda = 1 and D is the
      paper's disjoint mean; with density 1 and no sign conflict D is the ``delta`` update.
      peft's ``ties_svd`` with weights c equals this rule with weights c/T. Weights must be > 0.
    * ``dare`` (Yu et al. 2024): drop each entry of dW_t with probability 1 - ``density`` and
      rescale the rest by 1/density, D = sum_t w_t (M_t * dW_t) / density, then re-factored like
      ``svd``. The masks M_t come from ``seed``, the expert's position and the module name, so a
      merge is reproducible. peft's ``dare_linear_svd`` is the same rule with its own random masks.

    Block weights (``block_weights``, e.g. {"in": 1, "mid": 0.5, "out": 1, "te": 0}; groups in
    :mod:`selma_toolkit.lora.blocks`): after the method's formula, each merged module's B is
    multiplied by the weight g of its most specific listed group (1 where none is listed),

        B_m <- g * B_m [out, r_m] (conv [out, r_m, 1, 1]), A_m unchanged, so dW_m = g * B_m @ A_m,

    for every method alike (selma: g * sum_s sum_t w_s w_t B'_s @ A_t; delta: g * sum_t w_t dW_t;
    svd / ties / dare: g times the re-factored D, the factoring itself unchanged). g = 0 zeroes the
    module's update and keeps its keys. An unknown group name raises :class:`LoraFormatError`
    listing the valid ones; a valid group that no module is in (e.g. te for a UNet-only LoRA) is
    logged and changes nothing.

    ``rank`` (svd/ties/dare) defaults to the largest rank among the experts of each module and is
    capped by the layer's size. Modules that some experts lack count as zero updates for them
    (a warning lists them). Experts whose shapes differ raise :class:`LoraFormatError`.
    ``names`` label the experts in messages and in the merged metadata (e.g. file names).

    The result's metadata holds, under ``"selma.merge"``, a JSON string with the method, the
    effective weights, rank, density, seed, block weights ({group: g} as given, null when none;
    also under ``selma.block_weights``) and the experts (name, skill, base model, architecture,
    recipe hash; merge_files adds each file's sha256 and source), enough to recompute the merge
    exactly; and the base model and architecture the experts agree on (:func:`record_metadata`).
    """
    if method not in MERGE_METHODS:
        raise LoraFormatError(f"merge method {method!r} is not known; expected one of {', '.join(MERGE_METHODS)}")
    if not experts:
        raise LoraFormatError("no experts to merge: give at least one LoRA file")
    names = list(names) if names is not None else [f"expert {i + 1}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise ValueError(f"names: {len(names)} names for {len(experts)} experts")
    effective_weights = expert_weights(weights, len(experts), normalize=normalize, method=method)
    _check_options(method, rank, density, svd_mode)
    architectures = [guess_architecture(expert) for expert in experts]  # once: it reads every module name
    _check_compatible(experts, names, architectures)
    module_names = list(dict.fromkeys(name for expert in experts for name in expert.modules))
    _warn_missing(experts, names, module_names)
    block_weights = check_block_weights(block_weights, module_names)
    if block_weights and (unused := unused_groups(block_weights, module_names)):
        logger.warning("block weights for %s change nothing: no module of the experts is in %s",
                       ", ".join(unused), "that group" if len(unused) == 1 else "those groups")
    options = _Options(method, rank, density, seed, svd_mode, strength=math.fsum(effective_weights),
                       block_weights=block_weights)
    merged: dict[str, LoraModule] = {}
    available_threads = torch.get_num_threads()
    for module_name in module_names:
        parts = [
            _Part(index, effective_weights[index], expert.modules[module_name])
            for index, expert in enumerate(experts)
            if module_name in expert.modules
        ]
        _check_shapes(module_name, parts, names)
        with _intra_op_threads(available_threads if _needs_threads(method, parts) else 1):
            merged[module_name] = _merge_module(module_name, parts, names, options,
                                                module_block_weight(module_name, block_weights))
    metadata = _merged_metadata(experts, names, architectures, effective_weights, options)
    return LoraWeights(modules=merged, metadata=metadata)


@dataclass(frozen=True)
class _Options:
    method: str
    rank: int | None
    density: float
    seed: int
    svd_mode: str
    strength: float  # sum of the weights: TIES' lambda
    block_weights: dict[str, float] | None = None  # checked, as given: {group: g}


def _needs_threads(method: str, parts: Sequence[_Part]) -> bool:
    """Whether a module's merge is worth torch's intra-op threads: only an SVD of a large update."""
    return method in FACTORED_METHODS and math.prod(_dense_shape(parts)) >= _THREADED_SVD_ENTRIES


@contextlib.contextmanager
def _intra_op_threads(count: int) -> Iterator[None]:
    """Run torch with ``count`` intra-op threads, then restore the setting.

    Sums, stacks, copies and small SVDs of tensors of ~10^5 entries are too small for threads to
    pay: on an idle machine they gain little, and on a busy one every op waits for a descheduled
    worker thread (measured on 2 loaded cores: 15 ms instead of 0.06 ms per add, seconds instead
    of 40 ms for the SVDs of a tiny model's LoRA). Only large SVDs keep every thread.
    """
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------- checks


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
            raise LoraFormatError(f"weights: {values} sum to 0 and cannot be normalised; give weights with a non-zero sum")
        values = [w / total for w in values]
    if method == "ties" and any(w <= 0 for w in values):
        raise LoraFormatError(
            f"weights: {values}: method ties elects signs on weighted updates and needs weights > 0; "
            "use delta or svd for negative or zero weights"
        )
    return values


def _check_options(method: str, rank: int | None, density: float, svd_mode: str) -> None:
    if rank is not None and method not in FACTORED_METHODS:
        kept = "the experts' rank" if method == "selma" else "every expert (rank = sum of ranks)"
        raise LoraFormatError(
            f"rank {rank}: only svd, ties and dare choose an output rank; {method} keeps {kept}. Drop --rank or use --method svd"
        )
    if rank is not None and rank < 1:
        raise LoraFormatError(f"rank {rank}: expected a positive integer")
    if method in ("ties", "dare") and not 0.0 < density <= 1.0:
        raise LoraFormatError(f"density {density}: expected a share in (0, 1] of the entries to keep")
    if svd_mode not in ("exact", "randomized"):
        raise LoraFormatError(f"svd_mode {svd_mode!r}: expected 'exact' or 'randomized'")


def _check_compatible(experts: Sequence[LoraWeights], names: Sequence[str], architectures: Sequence[str | None]) -> None:
    """Different architectures -> error; different base models of the same shapes -> warning."""
    known = [(i, arch) for i, arch in enumerate(architectures) if arch]
    for index, architecture in known[1:]:
        first, first_architecture = known[0]
        if architecture != first_architecture:
            raise LoraFormatError(
                f"{names[first]} is a LoRA for {first_architecture} but {names[index]} is one for {architecture} "
                f"(module {_module_telling_apart(experts[first], experts[index])}); experts for different base "
                "architectures cannot be merged"
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
        if name in other.modules and _layer_shape(module) != _layer_shape(other.modules[name]):
            return f"{name}: {_layer_shape(module)} vs {_layer_shape(other.modules[name])}"
    only = sorted(set(first.modules) ^ set(other.modules))
    return f"{only[0]} in one file only" if only else next(iter(first.modules), "(none)")


def _layer_shape(module: LoraModule) -> tuple[int, ...]:
    """The adapted layer's weight shape: [out, in] or [out, in, kh, kw]."""
    return (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))


def _check_shapes(module_name: str, parts: Sequence[_Part], names: Sequence[str]) -> None:
    first = parts[0]
    for part in parts[1:]:
        if _layer_shape(part.module) != _layer_shape(first.module):
            raise LoraFormatError(
                f"{names[first.index]} and {names[part.index]} do not fit together: module {module_name} adapts a "
                f"layer of shape {_layer_shape(first.module)} in the first and {_layer_shape(part.module)} in the "
                "second; experts for different base architectures (e.g. SD 1.x and SDXL) cannot be merged"
            )


def _warn_missing(experts: Sequence[LoraWeights], names: Sequence[str], module_names: Sequence[str]) -> None:
    for name, expert in zip(names, experts):
        missing = [m for m in module_names if m not in expert.modules]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            logger.warning(
                "%s lacks %d of the %d modules the experts adapt; they count as zero updates for it: %s",
                name, len(missing), len(module_names), shown,
            )


# ------------------------------------------------------------------------------------ methods


def _merge_module(module_name: str, parts: Sequence[_Part], names: Sequence[str], options: _Options,
                  block_weight: float = 1.0) -> LoraModule:
    """One module of the merge (see :func:`merge_experts` for the methods); ``block_weight`` g
    multiplies the merged B (g = 1: untouched, bit for bit)."""
    if options.method == "selma":
        return _merge_selma(module_name, parts, names, block_weight)
    if options.method == "delta":
        return _merge_delta(parts, block_weight)
    if options.method == "svd":
        update = _weighted_sum(parts)
    elif options.method == "ties":
        update = _ties_update(parts, options.density, options.strength)
    else:
        update = _dare_update(parts, options.density, options.seed, module_name)
    return _factor(update, options.rank or max(p.module.rank for p in parts), parts, options, block_weight)


def _compute_dtype(parts: Sequence[_Part]) -> torch.dtype:
    # float64 inputs stay float64 (tests compare at high precision); everything else in float32.
    return torch.float64 if any(p.module.down.dtype == torch.float64 for p in parts) else torch.float32


def _output_dtype(parts: Sequence[_Part]) -> torch.dtype:
    dtype = parts[0].module.down.dtype
    for part in parts:
        dtype = torch.promote_types(torch.promote_types(dtype, part.module.down.dtype), part.module.up.dtype)
    return dtype


def _zeros(shape: Sequence[int], parts: Sequence[_Part]) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=_compute_dtype(parts), device=parts[0].module.down.device)


def _merge_selma(module_name: str, parts: Sequence[_Part], names: Sequence[str], block_weight: float = 1.0) -> LoraModule:
    ranks = {p.module.rank for p in parts}
    if len(ranks) > 1:
        listed = ", ".join(f"{names[p.index]}: rank {p.module.rank}" for p in parts)
        raise LoraFormatError(
            f"module {module_name}: method selma averages the A and B factors and needs equal ranks, found {listed}. "
            "Use --method delta (the exact weighted sum of updates, rank = sum of ranks) or --method svd --rank R"
        )
    # Accumulate in place in the compute dtype: no converted copy or product of any input is kept.
    down, up = _zeros(parts[0].module.down.shape, parts), _zeros(parts[0].module.up.shape, parts)
    for p in parts:
        down.add_(p.module.down, alpha=p.weight)
        up.add_(p.module.up, alpha=p.weight * p.module.scale)
    if block_weight != 1.0:
        up.mul_(block_weight)  # B_m <- g * B_m, in the compute dtype, before the one rounding to the output's
    out_dtype = _output_dtype(parts)
    return LoraModule(down=down.to(out_dtype), up=up.to(out_dtype), alpha=float(ranks.pop()))


def _merge_delta(parts: Sequence[_Part], block_weight: float = 1.0) -> LoraModule:
    # Stacking is exact in the inputs' own dtype; only B is scaled (one rounding, as any cast):
    # g * cat_t(w_t B'_t) = cat_t((g w_t s_t) B_t), the coefficient taken in float64 first.
    # Each B is scaled straight into its columns of the output: one pass over it, not a scaled copy and a cat.
    out_dtype = _output_dtype(parts)
    down = torch.cat([p.module.down.to(out_dtype) for p in parts], dim=0)
    first = parts[0].module.up
    up = torch.empty((first.shape[0], down.shape[0], *first.shape[2:]), dtype=out_dtype, device=first.device)
    column = 0
    for p in parts:
        torch.mul(p.module.up.to(out_dtype), block_weight * p.weight * p.module.scale, out=up[:, column : column + p.module.rank])
        column += p.module.rank
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


def _dense(part: _Part, dtype: torch.dtype) -> torch.Tensor:
    """Expert's update dW_t = s_t B_t @ A_t as a matrix [out, in*kh*kw]."""
    return part.module.delta(dtype).flatten(1)


def _dense_shape(parts: Sequence[_Part]) -> tuple[int, int]:
    module = parts[0].module
    return int(module.up.shape[0]), int(math.prod(module.down.shape[1:]))


def _weighted_sum(parts: Sequence[_Part]) -> torch.Tensor:
    total = _zeros(_dense_shape(parts), parts)
    for part in parts:
        total.add_(_dense(part, total.dtype), alpha=part.weight)
    return total


def _trim(update: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (as peft's magnitude pruning)."""
    keep = int(density * update.numel())
    trimmed = torch.zeros_like(update).view(-1)
    if keep:
        top = torch.topk(update.abs().view(-1), k=keep, largest=True).indices
        trimmed[top] = update.view(-1)[top]
    return trimmed.view_as(update)


def _ties_update(parts: Sequence[_Part], density: float, strength: float) -> torch.Tensor:
    # Two passes over the experts rebuild each trimmed update instead of keeping T of them alive.
    signed_total = _zeros(_dense_shape(parts), parts)
    for part in parts:
        signed_total.add_(_trim(_dense(part, signed_total.dtype), density), alpha=part.weight)
    elected = torch.where(signed_total >= 0, 1.0, -1.0).to(signed_total.dtype)
    del signed_total
    agreeing_sum, agreeing_weight = _zeros(elected.shape, parts), _zeros(elected.shape, parts)
    for part in parts:
        trimmed = _trim(_dense(part, elected.dtype), density)
        agrees = (torch.sign(trimmed) == elected).to(elected.dtype)  # sign 0 (trimmed away) never agrees
        agreeing_sum.add_(trimmed * agrees, alpha=part.weight)
        agreeing_weight.add_(agrees, alpha=part.weight)
    return strength * torch.where(agreeing_weight > 0, agreeing_sum / agreeing_weight.clamp_min(1e-30), 0.0)


def _mask_generator(seed: int, index: int, module_name: str) -> torch.Generator:
    """A generator for one expert's DARE mask on one module, independent of merge order."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{module_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _dare_update(parts: Sequence[_Part], density: float, seed: int, module_name: str) -> torch.Tensor:
    total = _zeros(_dense_shape(parts), parts)
    for part in parts:
        update = _dense(part, total.dtype)
        draw = torch.rand(update.shape, generator=_mask_generator(seed, part.index, module_name), dtype=total.dtype)
        total.add_(update * (draw.to(update.device) < density), alpha=part.weight / density)
    return total


def _factor(update: torch.Tensor, rank: int, parts: Sequence[_Part], options: _Options, block_weight: float = 1.0) -> LoraModule:
    """Truncated SVD of a dense update [out, in_flat] -> a LoraModule shaped like the experts' (scale 1),
    its B [out, rank] multiplied by ``block_weight`` g after the factoring."""
    rank = min(rank, *update.shape)
    if options.svd_mode == "exact":
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[update.device] if update.is_cuda else []):
            torch.manual_seed(options.seed)
            u, s, v = torch.svd_lowrank(update, q=min(rank + _RANDOMIZED_OVERSAMPLE, *update.shape), niter=_RANDOMIZED_ITERATIONS)
        vh = v.mT
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if block_weight != 1.0:
        up = up * block_weight
    like = parts[0].module
    if like.is_conv:
        down, up = down.reshape(rank, *like.down.shape[1:]), up.reshape(up.shape[0], rank, 1, 1)
    out_dtype = _output_dtype(parts)
    return LoraModule(down=down.contiguous().to(out_dtype), up=up.contiguous().to(out_dtype), alpha=float(rank))


def apply_block_weights(lora: LoraWeights, block_weights: BlockWeights | None) -> LoraWeights:
    """One LoRA with each module's B multiplied by its block weight g (see :func:`merge_experts`):
    B <- g * B [out, r], A and alpha unchanged, so dW = g * scale * B @ A; computed in float32
    (float64 stays float64) and rounded once to B's dtype. Modules with g = 1 are kept as they are.
    For what has no merge formula of its own: runtime adapters (each expert scaled, then combined
    by set_adapters) and new experts added to a block-weighted merge through its factors."""
    checked = check_block_weights(block_weights, lora.modules)
    if not checked:
        return lora
    modules = {}
    for name, module in lora.modules.items():
        g = module_block_weight(name, checked)
        if g != 1.0:
            compute = torch.float64 if module.up.dtype == torch.float64 else torch.float32
            module = LoraModule(down=module.down, up=(module.up.to(compute) * g).to(module.up.dtype), alpha=module.alpha)
        modules[name] = module
    return LoraWeights(modules=modules, metadata=dict(lora.metadata))


# ----------------------------------------------------------------------------------- metadata


def _merged_metadata(
    experts: Sequence[LoraWeights], names: Sequence[str], architectures: Sequence[str | None],
    weights: Sequence[float], options: _Options,
) -> dict[str, str]:
    infos = [_expert_info(name, expert, None, arch) for name, expert, arch in zip(names, experts, architectures)]
    method, factored = options.method, options.method in FACTORED_METHODS
    record = {
        "method": method,
        "weights": list(weights),
        "rank": options.rank,
        "density": options.density if method in ("ties", "dare") else None,
        "seed": options.seed if method == "dare" or (factored and options.svd_mode == "randomized") else None,
        "svd_mode": options.svd_mode if factored else None,
        "block_weights": options.block_weights,
        "experts": infos,
    }
    return record_metadata(record)


def expert_info(name: str, expert: LoraWeights, sha256: str | None = None) -> dict[str, str | None]:
    """One expert's entry in a merge record: its name, sha256 and provenance from its file's metadata
    (skill, base model, architecture, the recipe hash it was trained with)."""
    return _expert_info(name, expert, sha256, guess_architecture(expert))


def _expert_info(name: str, expert: LoraWeights, sha256: str | None, architecture: str | None) -> dict[str, str | None]:
    return {
        "name": name, "sha256": sha256, "skill": metadata_value(expert, "skill"),
        "base_model": metadata_value(expert, "base_model"), "architecture": architecture,
        "recipe_sha256": metadata_value(expert, "recipe_sha256"),
    }


def record_metadata(record: dict) -> dict[str, str]:
    """A merged LoRA's metadata from its merge record: the record itself under ``selma.merge``, and
    the common fields of lora.metadata (method, weights, skills, base model, architecture) for tools
    that read those and not the record. Base model and architecture are written when the experts
    that name one agree: so a merge says what it is for even when its tensors do not tell (a small
    model's widths), as each expert's file did."""
    metadata = {
        MERGE_METADATA_KEY: json.dumps(record),
        SELMA_PREFIX + "method": record["method"],
        SELMA_PREFIX + "weights": json.dumps(list(record["weights"])),
    }
    if record.get("block_weights"):
        metadata[SELMA_PREFIX + "block_weights"] = json.dumps(record["block_weights"])
    skills = [info["skill"] for info in record["experts"] if info.get("skill")]
    if skills:
        metadata[SELMA_PREFIX + "skills"] = json.dumps(skills)
    base_models = {info["base_model"] for info in record["experts"] if info.get("base_model")}
    if len(base_models) == 1:
        metadata[SELMA_PREFIX + "base_model"] = base_models.pop()
    architectures = {info["architecture"] for info in record["experts"] if info.get("architecture")}
    if len(architectures) == 1:
        metadata[SELMA_PREFIX + "architecture"] = architectures.pop()
    return metadata


def merge_record(weights: LoraWeights) -> dict | None:
    """The merge record of a merged LoRA (method, weights, rank, experts...), or None."""
    raw = weights.metadata.get(MERGE_METADATA_KEY)
    return json.loads(raw) if raw else None


# -------------------------------------------------------------------------------------- files


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    method: MergeMethod = "selma",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    format: Literal["kohya", "peft"] = "kohya",
    density: float = 0.5,
    seed: int = 0,
    normalize: bool = False,
    svd_mode: SvdMode = "exact",
    sources: Sequence[str | None] | None = None,
    block_weights: BlockWeights | None = None,
) -> LoraWeights:
    """Merge LoRA files into one file, written atomically; returns the merged LoRA.

    The inputs are read whole (they are low-rank); the merge then runs module by module (see
    :func:`merge_experts` for the methods and ``block_weights``). The merge record in the output's
    metadata lists each input by file name, sha256 and ``source``: where to find it again for an incremental merge
    (lora/incremental.py), the given ``sources[i]`` (a catalog name or Hub repo id the user typed),
    else the file's path relative to the output's folder.
    """
    paths = [Path(p) for p in paths]
    if sources is not None and len(sources) != len(paths):
        raise ValueError(f"sources: {len(sources)} sources for {len(paths)} files")
    # Each file is read once: its tensors are views into the bytes its sha256 is computed from
    # (profiled in bench/merge.py: hashing a second read of every input cost as much as the merge).
    # Reading and hashing release the GIL, so files are read two at a time.
    with _intra_op_threads(1), ThreadPoolExecutor(max_workers=2) as pool:  # see _intra_op_threads
        read = list(pool.map(read_safetensors_with_sha256, paths))
        experts = [lora_from_state_dict(tensors, metadata, source=str(path)) for path, (tensors, metadata, _) in zip(paths, read)]
    digests = [digest for _, _, digest in read]
    del read
    merged = merge_experts(
        experts, method, weights, rank, density=density, seed=seed, names=[path.name for path in paths],
        normalize=normalize, svd_mode=svd_mode, block_weights=block_weights,
    )
    record = merge_record(merged)
    for info, digest, path, source in zip(record["experts"], digests, paths, sources or [None] * len(paths)):
        info["sha256"] = digest
        info["source"] = source or _relative_source(path, Path(out))
    merged.metadata[MERGE_METADATA_KEY] = json.dumps(record)
    with _intra_op_threads(1):  # so does writing
        save_lora(merged, out, format=format)
    return merged


def _relative_source(path: Path, out: Path) -> str:
    """``path`` relative to the folder of ``out`` (so a run folder can move), or absolute where no
    relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(path.resolve(), out.resolve().parent)).as_posix()
    except ValueError:
        return str(path.resolve())

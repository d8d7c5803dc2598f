"""Every merge formula, once, for one module at a time (peft shapes: A [r, in], B [out, r]).

Convention: expert t's scale s_t = alpha_t / r_t is folded into its B, B'_t = s_t B_t, so its
update of a layer is dW_t = B'_t @ A_t [out, in], with A_t [r_t, in] and B'_t [out, r_t] (conv
layers: A_t [r_t, in, kh, kw], B_t [out, r_t, 1, 1], dense updates taken on the flattened
[out, in*kh*kw] matrix). w_t are the effective weights. Every merged module has scale 1
(alpha = its rank), so the merged update is B_m @ A_m. A block weight g (lora/blocks.py)
multiplies the merged B after the formula: B_m <- g * B_m, A_m unchanged.

A formula takes one module's :class:`ModuleInputs`; ``"factors"`` formulas return the merged
:class:`LoraModule`, ``"dense"`` ones the dense update D [out, in] that :func:`factor` re-factors
(the kind is in methods.py's table, which names each function here). ``svd``'s D is a weighted sum
of the experts' own updates: with the exact SVD, every module is re-factored from the stacked
factors instead, without forming D (``lowrank.py``, the table's ``low_rank``).

Memory: besides the inputs and the (low-rank) output, at most one module's dense update and a few
accumulators of its shape are alive at any moment.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selma_toolkit.architectures import get_family
from selma_toolkit.config.merge_methods import MethodSpec
from selma_toolkit.lora.blocks import BlockWeights, block_weight_of, check_block_weights
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.metadata import guess_architecture

_RANDOMIZED_OVERSAMPLE = 10
_RANDOMIZED_ITERATIONS = 4


@dataclass(frozen=True)
class Part:
    """One expert's contribution to one module: its position, weight w_t and factors."""

    index: int
    weight: float
    module: LoraModule


@dataclass(frozen=True)
class MergeOptions:
    """A merge's checked settings, the same for every module."""

    method: str
    rank: int | None
    density: float
    seed: int
    svd_mode: str
    strength: float  # sum of the weights: TIES' lambda
    block_weights: dict[str, float] | None = None  # checked, as given: {group: g}


@dataclass(frozen=True)
class ModuleInputs:
    """What a formula sees of one module: its name, the experts' parts, their labels (for
    messages), the options and the module's block weight g."""

    name: str
    parts: Sequence[Part]
    names: Sequence[str]
    options: MergeOptions
    block_weight: float = 1.0


def uses_low_rank_svd(spec: MethodSpec, svd_mode: str) -> bool:
    """Whether a merge re-factors from the stacked factors (lowrank.py) instead of dense updates: the
    method names a ``low_rank`` formula and the SVD is the exact one."""
    return bool(spec.low_rank) and svd_mode == "exact"


def merge_module(spec: MethodSpec, inputs: ModuleInputs) -> LoraModule:
    """One module merged with ``spec``'s formula; g = 1 leaves it untouched, bit for bit."""
    formula = globals()[spec.formula]
    if not spec.dense:
        return formula(inputs)
    parts = inputs.parts
    return factor(formula(inputs), inputs.options.rank or max(p.module.rank for p in parts), inputs)


# ------------------------------------------------------------------------------- dtypes


def _compute_dtype(parts: Sequence[Part]) -> torch.dtype:
    # float64 inputs stay float64 (tests compare at high precision); everything else in float32.
    return torch.float64 if any(p.module.down.dtype == torch.float64 for p in parts) else torch.float32


def output_dtype(parts: Sequence[Part]) -> torch.dtype:
    dtype = parts[0].module.down.dtype
    for part in parts:
        dtype = torch.promote_types(torch.promote_types(dtype, part.module.down.dtype), part.module.up.dtype)
    return dtype


def _zeros(shape: Sequence[int], parts: Sequence[Part]) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=_compute_dtype(parts), device=parts[0].module.down.device)


# ---------------------------------------------------------------------- factors formulas


def merge_selma(inputs: ModuleInputs) -> LoraModule:
    """``selma`` (the paper's rule): A_m = sum_t w_t A_t [r, in], B_m = g * sum_t w_t B'_t [out, r],
    so B_m @ A_m = g * sum_s sum_t w_s w_t B'_s @ A_t, cross terms included. Needs equal ranks r
    (checked before: ``equal_ranks`` in the table)."""
    parts, block_weight = inputs.parts, inputs.block_weight
    ranks = {p.module.rank for p in parts}
    # Accumulate in place in the compute dtype: no converted copy or product of any input is kept.
    down, up = _zeros(parts[0].module.down.shape, parts), _zeros(parts[0].module.up.shape, parts)
    for p in parts:
        down.add_(p.module.down, alpha=p.weight)
        up.add_(p.module.up, alpha=p.weight * p.module.scale)
    if block_weight != 1.0:
        up.mul_(block_weight)  # B_m <- g * B_m, in the compute dtype, before the one rounding to the output's
    out_dtype = output_dtype(parts)
    return LoraModule(down=down.to(out_dtype), up=up.to(out_dtype), alpha=float(ranks.pop()))


def merge_delta(inputs: ModuleInputs) -> LoraModule:
    """``delta``: B_m @ A_m = g * sum_t w_t B'_t @ A_t exactly, stored losslessly by stacking ranks:
    A_m = cat_t A_t [sum r_t, in], B_m = cat_t g w_t B'_t [out, sum r_t]. Equal to diffusers
    ``set_adapters`` with weights w_t, and to peft ``add_weighted_adapter(..., "cat")``."""
    parts, block_weight = inputs.parts, inputs.block_weight
    # Stacking is exact in the inputs' own dtype; only B is scaled (one rounding, as any cast):
    # g * cat_t(w_t B'_t) = cat_t((g w_t s_t) B_t), the coefficient taken in float64 first.
    # Each B is scaled straight into its columns of the output: one pass over it, not a scaled copy and a cat.
    out_dtype = output_dtype(parts)
    down = torch.cat([p.module.down.to(out_dtype) for p in parts], dim=0)
    first = parts[0].module.up
    up = torch.empty((first.shape[0], down.shape[0], *first.shape[2:]), dtype=out_dtype, device=first.device)
    column = 0
    for p in parts:
        torch.mul(
            p.module.up.to(out_dtype),
            block_weight * p.weight * p.module.scale,
            out=up[:, column : column + p.module.rank],
        )
        column += p.module.rank
    return LoraModule(down=down, up=up, alpha=float(down.shape[0]))


# ------------------------------------------------------------------------ dense formulas


def _dense(part: Part, dtype: torch.dtype) -> torch.Tensor:
    """Expert's update dW_t = s_t B_t @ A_t as a matrix [out, in*kh*kw]."""
    return part.module.delta(dtype).flatten(1)


def dense_shape(parts: Sequence[Part]) -> tuple[int, int]:
    """[out, in*kh*kw]: the shape of a module's dense update."""
    module = parts[0].module
    return int(module.up.shape[0]), int(math.prod(module.down.shape[1:]))


def svd_update(inputs: ModuleInputs) -> torch.Tensor:
    """``svd``: D = sum_t w_t dW_t [out, in], then re-factored (:func:`factor`)."""
    parts = inputs.parts
    total = _zeros(dense_shape(parts), parts)
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


def ties_update(inputs: ModuleInputs) -> torch.Tensor:
    """``ties`` (Yadav et al. 2023): trim each dW_t [out, in] to its ``density`` share of
    largest-magnitude entries (dW^_t); elect a sign per entry, sign(sum_t w_t dW^_t); keep the
    entries that agree, m_t = [sign(dW^_t) = elected, dW^_t != 0]; take their weighted mean and
    scale it by lambda = sum_t w_t:  D = lambda * (sum_t w_t m_t dW^_t) / (sum_t w_t m_t)  (0 where
    no entry agrees); then re-factored. With 1/T weights, lambda = 1 and D is the paper's disjoint
    mean; with density 1 and no sign conflict D is the ``delta`` update. peft's ``ties_svd`` with
    weights c equals this rule with weights c/T. Weights must be > 0."""
    parts, density, strength = inputs.parts, inputs.options.density, inputs.options.strength
    # Two passes over the experts rebuild each trimmed update instead of keeping T of them alive.
    signed_total = _zeros(dense_shape(parts), parts)
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


def dare_update(inputs: ModuleInputs) -> torch.Tensor:
    """``dare`` (Yu et al. 2024): drop each entry of dW_t [out, in] with probability 1 - ``density``
    and rescale the rest by 1/density, D = sum_t w_t (M_t * dW_t) / density, then re-factored. The
    masks M_t come from ``seed``, the expert's position and the module name, so a merge is
    reproducible. peft's ``dare_linear_svd`` is the same rule with its own random masks."""
    parts, density, seed = inputs.parts, inputs.options.density, inputs.options.seed
    total = _zeros(dense_shape(parts), parts)
    for part in parts:
        update = _dense(part, total.dtype)
        draw = torch.rand(update.shape, generator=_mask_generator(seed, part.index, inputs.name), dtype=total.dtype)
        total.add_(update * (draw.to(update.device) < density), alpha=part.weight / density)
    return total


def factor(update: torch.Tensor, rank: int, inputs: ModuleInputs) -> LoraModule:
    """Truncated SVD of a dense update D [out, in_flat] -> a LoraModule shaped like the experts'
    (scale 1): D ~ (U_r S_r) @ Vh_r, B_m = g * U_r S_r [out, r], A_m = Vh_r [r, in], r = ``rank``
    capped by D's size (conv: A_m [r, in, kh, kw], B_m [out, r, 1, 1]). ``svd_mode="randomized"``
    uses torch.svd_lowrank with ``seed``: faster, approximate."""
    parts, options, block_weight = inputs.parts, inputs.options, inputs.block_weight
    rank = min(rank, *update.shape)
    if options.svd_mode == "exact":
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
    else:
        with torch.random.fork_rng(devices=[update.device] if update.is_cuda else []):
            torch.manual_seed(options.seed)
            u, s, v = torch.svd_lowrank(
                update, q=min(rank + _RANDOMIZED_OVERSAMPLE, *update.shape), niter=_RANDOMIZED_ITERATIONS
            )
        vh = v.mT
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    if block_weight != 1.0:
        up = up * block_weight
    like = parts[0].module
    if like.is_conv:
        down, up = down.reshape(rank, *like.down.shape[1:]), up.reshape(up.shape[0], rank, 1, 1)
    out_dtype = output_dtype(parts)
    return LoraModule(down=down.contiguous().to(out_dtype), up=up.contiguous().to(out_dtype), alpha=float(rank))


# ------------------------------------------------------------------------- block weights


def apply_block_weights(lora: LoraWeights, block_weights: BlockWeights | None) -> LoraWeights:
    """One LoRA with each module's B multiplied by its block weight g (see
    :func:`~selma_toolkit.lora.merge.merge_experts`): B <- g * B [out, r], A and alpha unchanged,
    so dW = g * scale * B @ A; computed in float32 (float64 stays float64) and rounded once to B's
    dtype. Modules with g = 1 are kept as they are. For what has no merge formula of its own:
    runtime adapters (each expert scaled, then combined by set_adapters) and new experts added to a
    block-weighted merge through its factors."""
    if not block_weights:
        return lora
    architecture = guess_architecture(lora)
    family = get_family(architecture) if architecture is not None else None
    checked = check_block_weights(block_weights, lora.modules, family)
    weights = block_weight_of(lora.modules, checked, family)
    modules = {}
    for name, module in lora.modules.items():
        g = weights[name]
        if g != 1.0:
            compute = torch.float64 if module.up.dtype == torch.float64 else torch.float32
            module = LoraModule(
                down=module.down, up=(module.up.to(compute) * g).to(module.up.dtype), alpha=module.alpha
            )
        modules[name] = module
    return LoraWeights(modules=modules, metadata=dict(lora.metadata))

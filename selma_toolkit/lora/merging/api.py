"""``merge_experts`` (LoRAs in memory -> one LoRA) and ``merge_files`` (files -> one file).

The ComfyUI nodes, the diffusers adapter and ``selma merge`` all call :func:`merge_experts`;
none of them re-implements a formula. Needs only torch (and safetensors for files).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch

from selma_toolkit.architectures import FAMILIES
from selma_toolkit.config.merge_methods import MergeMethod, MethodSpec, SvdMode, method_spec
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora.blocks import BlockWeights, block_weight_of, check_block_weights, unused_groups
from selma_toolkit.lora.core import LoraModule, LoraWeights
from selma_toolkit.lora.files import lora_from_state_dict, save_lora
from selma_toolkit.lora.merging.checks import (
    check_compatible,
    check_options,
    check_ranks,
    check_shapes,
    expert_weights,
    warn_missing,
)
from selma_toolkit.lora.merging.formulas import MergeOptions, ModuleInputs, Part, merge_module, uses_low_rank_svd
from selma_toolkit.lora.merging.lowrank import low_rank_formula
from selma_toolkit.lora.merging.record import MergeRecord, expert_info, file_source
from selma_toolkit.lora.merging.threads import intra_op_threads, needs_threads
from selma_toolkit.lora.metadata import guess_architecture
from selma_toolkit.lora.safetensors_file import read_safetensors_hashing_later

logger = logging.getLogger("selma_toolkit.lora.merge")  # the merge's one logger name, as before the split


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
    """Merge T LoRA experts into one LoRA, module by module.

    ``method``: a name in :data:`~selma_toolkit.config.merge_methods.METHODS` (selma, delta, svd,
    ties, dare); each method's formula, with shapes, is the docstring of its function in
    :mod:`selma_toolkit.lora.merging.formulas`. Convention: expert t's scale alpha_t / r_t is folded
    into its B first; the merged LoRA has scale 1 (alpha = its rank), so its update is B_m @ A_m.
    Weights w_t default to uniform 1/T; ``normalize=True`` divides the given weights by their sum
    (ComfyUI's "normalise weights").

    Block weights (``block_weights``, e.g. {"in": 1, "mid": 0.5, "out": 1, "te": 0}, {"double": 1,
    "single.3": 0}, or a LoRA Block Weight vector as ``parse_block_weights`` reads it; groups in
    :mod:`selma_toolkit.lora.blocks`, named as the experts' family names its blocks): after the
    method's formula, each merged module's B is multiplied by the weight g of its most specific
    listed group (1 where none is listed),

        B_m <- g * B_m [out, r_m] (conv [out, r_m, 1, 1]), A_m unchanged, so dW_m = g * B_m @ A_m,

    for every method alike (selma: g * sum_s sum_t w_s w_t B'_s @ A_t; delta: g * sum_t w_t dW_t;
    svd / ties / dare: g times the re-factored D, the factoring itself unchanged). g = 0 zeroes the
    module's update and keeps its keys. An unknown group name raises :class:`LoraFormatError`
    listing the valid ones; a valid group that no module is in (e.g. te for a UNet-only LoRA) is
    logged and changes nothing.

    ``rank`` (the re-factoring methods: svd, ties, dare) defaults to the largest rank among the
    experts of each module and is capped by the layer's size. ``svd_mode="exact"`` (the default)
    takes the exact truncated SVD: for ``svd`` from the experts' stacked factors, without any dense
    update (lowrank.py; seconds for a full model), for ties / dare of each dense update;
    ``"randomized"`` uses torch.svd_lowrank with ``seed`` on the dense updates. Modules that some experts lack count
    as zero updates for them (a warning lists them). Experts whose shapes differ raise
    :class:`LoraFormatError`. ``names`` label the experts in messages and in the merged metadata.

    The result's metadata holds the merge record (:class:`~selma_toolkit.lora.merging.record.MergeRecord`,
    under ``"selma.merge"``): method, effective weights, the settings the method uses, block weights
    and the experts (name, skill, base model, architecture, recipe hash; merge_files adds each
    file's sha256 and source), enough to recompute the merge exactly; and the base model and
    architecture the experts agree on.
    """
    spec = method_spec(method)
    if not experts:
        raise LoraFormatError("no experts to merge: give at least one LoRA file")
    names = list(names) if names is not None else [f"expert {i + 1}" for i in range(len(experts))]
    if len(names) != len(experts):
        raise ValueError(f"names: {len(names)} names for {len(experts)} experts")
    effective_weights = expert_weights(weights, len(experts), normalize=normalize, method=method)
    check_options(method, rank, density, svd_mode)
    architectures = [guess_architecture(expert) for expert in experts]  # once: it reads every module name
    check_compatible(experts, names, architectures)
    module_names = list(dict.fromkeys(name for expert in experts for name in expert.modules))
    warn_missing(experts, names, module_names)
    known = {arch for arch in architectures if arch is not None}
    family = FAMILIES[known.pop()] if len(known) == 1 else None  # whose names the block groups are
    block_weights = check_block_weights(block_weights, module_names, family)
    module_weights = block_weight_of(module_names, block_weights, family)
    if block_weights and (unused := unused_groups(block_weights, module_names, family)):
        logger.warning(
            "block weights for %s change nothing: no module of the experts is in %s",
            ", ".join(unused),
            "that group" if len(unused) == 1 else "those groups",
        )
    options = MergeOptions(
        method, rank, density, seed, svd_mode, strength=math.fsum(effective_weights), block_weights=block_weights
    )
    modules: list[ModuleInputs] = []
    for module_name in module_names:
        parts = [
            Part(index, effective_weights[index], expert.modules[module_name])
            for index, expert in enumerate(experts)
            if module_name in expert.modules
        ]
        check_shapes(module_name, parts, names)
        check_ranks(spec, module_name, parts, names)
        modules.append(ModuleInputs(module_name, parts, names, options, module_weights[module_name]))
    merged = _merge_modules(spec, modules, options)
    infos = [expert_info(name, expert, architecture=arch) for name, expert, arch in zip(names, experts, architectures)]
    record = MergeRecord.new(
        method,
        effective_weights,
        infos,
        rank=rank,
        density=density,
        seed=seed,
        svd_mode=svd_mode,
        block_weights=block_weights,
    )
    return LoraWeights(modules=merged, metadata=record.metadata())


def _merge_modules(spec: MethodSpec, modules: Sequence[ModuleInputs], options: MergeOptions) -> dict[str, LoraModule]:
    """Every module merged with ``spec``'s formula: module by module, or, for the exact SVD from the
    stacked factors, all modules at once (batched by shape: lowrank.py)."""
    if uses_low_rank_svd(spec, options.svd_mode):
        with intra_op_threads(1):
            return low_rank_formula(spec)(modules, options.rank)
    merged: dict[str, LoraModule] = {}
    available_threads = torch.get_num_threads()
    for inputs in modules:
        with intra_op_threads(available_threads if needs_threads(spec, inputs.parts, options.svd_mode) else 1):
            merged[inputs.name] = merge_module(spec, inputs)
    return merged


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    method: MergeMethod = "selma",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    *,
    format: Literal["kohya", "peft", "ai-toolkit"] | None = None,
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
    metadata lists each input by file name, sha256 and ``source``: where to find it again for an
    incremental merge (lora/incremental.py), the given ``sources[i]`` (a catalog name or Hub repo
    id the user typed), else the file's path relative to the output's folder. ``format``: the
    output's layout (lora/writing.py), None for the experts' family's default.
    """
    paths = [Path(p) for p in paths]
    if sources is not None and len(sources) != len(paths):
        raise ValueError(f"sources: {len(sources)} sources for {len(paths)} files")
    # Each file is read once: its tensors are views into the bytes its sha256 is computed from
    # (profiled in bench/merge.py: hashing a second read of every input cost as much as the merge).
    # The hashes are taken on two other threads while this one merges (hashlib releases the GIL), so
    # on two cores the merge takes little more wall time than reading and writing the files.
    with ThreadPoolExecutor(max_workers=2) as hasher:
        with intra_op_threads(1):  # see intra_op_threads
            read = [read_safetensors_hashing_later(path) for path in paths]
        hashing = [hasher.submit(sha256) for _, _, sha256 in read]
        experts = [
            lora_from_state_dict(tensors, metadata, source=str(path))
            for path, (tensors, metadata, _) in zip(paths, read)
        ]
        del read
        merged = merge_experts(
            experts,
            method,
            weights,
            rank,
            density=density,
            seed=seed,
            names=distinct_labels(paths),
            normalize=normalize,
            svd_mode=svd_mode,
            block_weights=block_weights,
        )
        digests = [future.result() for future in hashing]
    given = sources or [None] * len(paths)
    record = MergeRecord.read(merged).with_files(digests, [file_source(p, Path(out), s) for p, s in zip(paths, given)])
    record.write_to(merged)
    with intra_op_threads(1):  # so does writing
        save_lora(merged, out, format=format)
    return merged


def distinct_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """A label per path that tells it from the others: its file name where the names differ, else the
    shortest tail of its path no other path ends with (``a/count.safetensors``, ``b/count.safetensors``),
    the whole path for a file listed twice."""
    parts = [Path(os.path.abspath(path)).parts for path in paths]
    labels = []
    for index, own in enumerate(parts):
        others = [other for i, other in enumerate(parts) if i != index]
        length = next((n for n in range(1, len(own)) if all(other[-n:] != own[-n:] for other in others)), len(own))
        labels.append(str(Path(*own[-length:])) if length < len(own) else str(paths[index]))
    return labels

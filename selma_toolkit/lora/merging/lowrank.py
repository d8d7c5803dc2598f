"""The exact truncated SVD of a weighted sum of LoRA updates, from the experts' factors alone.

``svd`` re-factors D = sum_t w_t B'_t @ A_t [out, in] to a rank. Its SVD needs no dense D: with
the stacked factors B~ = [w_1 B'_1 ... w_T B'_T] [out, R] and A~ = [A_1; ...; A_T] [R, in]
(R = sum_t r_t; conv factors flattened), D = B~ @ A~; thin factorizations B~ = Q_B R_B and
A~^T = Q_A R_A (Q's with orthonormal columns) and the SVD of the small core R_B @ R_A^T = U S V^T
give D = (Q_B U) S (Q_A V)^T, an SVD of D. Truncated to the rank r, the merged factors are those
the dense SVD gives (B_m = U_r S_r, A_m = Vh_r) up to the signs and order of singular vectors of
equal singular values: tests compare the products.

How it is computed. The only work on the long sides is the Gram matrices G_B = B~^T B~ and
G_A = A~ A~^T [R, R] and the two products that give the factors: matrix products, several times
faster than Householder QR on such tall, thin matrices; the Q's are never formed. R_A is a square
root of G_A (R_A^T R_A = G_A: the transposed Cholesky factor, which is the R of a QR up to signs;
G_A's symmetric root where G_A is singular), and G_B is all the core needs of B~: its
C^T C = R_A G_B R_A^T = V S^2 V^T, and

    Q_B U S = D Q_A V = B~ (R_A^T V),    (Q_A V)^T = S^-2 (V^T R_A G_B) A~,

neither of which inverts anything but the kept singular values. B~ and A~ are never assembled
either: each product is taken block by block, expert by expert.

Precision. A Gram squares the condition number: taken in a float type of rounding eps, it resolves
a squared singular value only above about eps * R * |G_A| |G_B| (its noise); a singular value
below that is dropped (its factors are 0). The [R, R] algebra is float64. The long products are
float64 for float64 experts; for others they are float32 first (the inputs are float16 / bfloat16
/ float32, the result is stored so), and kept only when float32's noise is below 1e-4 of every kept
squared singular value, so each is within 1e-4 relative; otherwise (a merge that nearly cancels,
say an expert minus a similar one) the modules are computed again in float64, which resolves
singular values down to about 1e-8 of |B~| |A~|, finer than the dense float32 SVD (about 1e-7).

Modules whose experts have the same ranks and layer shape are computed together (batched: a
model's LoRA has a few dozen such groups for hundreds of modules), which is what makes an exact
`svd` merge of files cost about what the `selma` rule does (bench/merge_svd.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from selma_toolkit.config.merge_methods import MethodSpec
from selma_toolkit.lora.core import LoraModule
from selma_toolkit.lora.merging.formulas import ModuleInputs, dense_shape, output_dtype

# float32 Grams are kept when their noise is below this share of every kept squared singular value.
_FLOAT32_MARGIN = 1e-4


def low_rank_formula(spec: MethodSpec) -> Callable[[Sequence[ModuleInputs], int | None], dict[str, LoraModule]]:
    """The function of this module that the method table's ``low_rank`` names."""
    return globals()[spec.low_rank]


def svd_from_factors(modules: Sequence[ModuleInputs], rank: int | None) -> dict[str, LoraModule]:
    """``svd`` (exact) of every module: name -> merged module of scale 1 shaped like the experts'
    (conv: A_m [r, in, kh, kw], B_m [out, r, 1, 1]), times its block weight g (B_m <- g B_m).
    ``rank`` (None: the module's largest expert rank) is capped by the layer's size; D has rank
    <= R, and a rank above that pads the factors with zeros, so the file has the rank asked for."""
    groups: dict[tuple, list[ModuleInputs]] = {}
    for inputs in modules:
        shapes = tuple((p.index, tuple(p.module.down.shape), tuple(p.module.up.shape)) for p in inputs.parts)
        groups.setdefault(shapes, []).append(inputs)
    merged: dict[str, LoraModule] = {}
    for group in groups.values():
        parts = group[0].parts
        merged.update(_group_svd(group, min(rank or max(p.module.rank for p in parts), *dense_shape(parts))))
    return {inputs.name: merged[inputs.name] for inputs in modules}


def _factors(group: Sequence[ModuleInputs], dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For each expert position t, w_t B'_t [N, out, r_t] (B'_t = alpha_t / r_t B_t) and A_t [N, r_t, in]."""
    ups, downs = [], []
    for position, part in enumerate(group[0].parts):
        modules = [inputs.parts[position].module for inputs in group]
        coefficients = torch.tensor([part.weight * module.scale for module in modules], dtype=dtype)
        ups.append(
            torch.stack([module.up.flatten(1) for module in modules]).to(dtype).mul_(coefficients[:, None, None])
        )
        downs.append(torch.stack([module.down.flatten(1) for module in modules]).to(dtype))
    return ups, downs


def _gram(blocks: Sequence[torch.Tensor], transposed: bool) -> torch.Tensor:
    """The Gram matrix [N, R, R] of the blocks side by side: X^T X for X = [X_1 ... X_T] (``transposed``:
    X X^T for X = [X_1; ...; X_T]); block (j, i) is block (i, j) transposed, so only i <= j are computed."""
    grid: list[list[torch.Tensor]] = [[] for _ in blocks]
    for i, first in enumerate(blocks):
        for j, second in enumerate(blocks):
            grid[i].append(grid[j][i].mT if j < i else first @ second.mT if transposed else first.mT @ second)
    return torch.cat([torch.cat(row, dim=2) for row in grid], dim=1)


def _gram_roots(grams: torch.Tensor) -> torch.Tensor:
    """R [N, k, k] with R^T R = G for each Gram matrix G: Cholesky's L^T, or G's symmetric root where
    G is singular (experts with the same A, more rows than the layer has inputs), which Cholesky refuses."""
    lower, info = torch.linalg.cholesky_ex(grams)
    roots = lower.mT.clone()
    singular = info.nonzero().flatten()
    if len(singular):
        eigenvalues, vectors = torch.linalg.eigh(grams[singular])
        roots[singular] = (vectors * eigenvalues.clamp(min=0).sqrt()[:, None, :]) @ vectors.mT
    return roots


def _truncated_svd(
    group: Sequence[ModuleInputs], rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U_r S_r [N, out, kept], Vh_r [N, kept, in]) with the long products in ``dtype``, kept <= rank;
    None when ``dtype`` is not float64 and its Grams do not resolve every kept singular value."""
    ups, downs = _factors(group, dtype)
    gram_up, gram_down = _gram(ups, transposed=False).double(), _gram(downs, transposed=True).double()  # G_B, G_A
    root_down = _gram_roots(gram_down)  # R_A
    squares, right = torch.linalg.eigh(root_down @ gram_up @ root_down.mT)  # S^2 and V, ascending
    kept = min(rank, squares.shape[1])
    squares, right = squares[:, -kept:].flip(1), right[:, :, -kept:].flip(2)
    noise = (
        torch.finfo(dtype).eps
        * squares.shape[1]
        * torch.linalg.matrix_norm(gram_up)
        * torch.linalg.matrix_norm(gram_down)
    )
    if dtype != torch.float64 and not bool((squares * _FLOAT32_MARGIN > noise[:, None]).all()):
        return None
    resolved = squares > noise[:, None]
    left = (root_down.mT @ right) * resolved[:, None, :]  # R_A^T V_r, 0 for what the Grams do not resolve
    mixing = (left.mT @ gram_up) / squares.where(resolved, 1.0)[:, :, None]  # S_r^-2 V_r^T R_A G_B [N, kept, R]
    ranks = [block.shape[2] for block in ups]
    # U_r S_r = B~ R_A^T V_r and Vh_r = mixing A~, block by block.
    up = sum(block @ part.to(dtype) for block, part in zip(ups, left.split(ranks, dim=1), strict=True))
    down = sum(part.to(dtype) @ block for block, part in zip(downs, mixing.split(ranks, dim=2), strict=True))
    return up, down  # type: ignore[return-value]


def _group_svd(group: Sequence[ModuleInputs], rank: int) -> dict[str, LoraModule]:
    """The truncated SVD of N modules of one shape, batched (see the module docstring)."""
    out_dtype = output_dtype(group[0].parts)
    factors = None if out_dtype == torch.float64 else _truncated_svd(group, rank, torch.float32)
    up, down = factors if factors is not None else _truncated_svd(group, rank, torch.float64)  # type: ignore[misc]
    if rank > up.shape[2]:  # D's rank is at most R: zero factors up to the rank asked for
        up = torch.nn.functional.pad(up, (0, rank - up.shape[2]))
        down = torch.nn.functional.pad(down, (0, 0, 0, rank - down.shape[1]))
    block_weights = torch.tensor([inputs.block_weight for inputs in group], dtype=up.dtype)
    if bool((block_weights != 1.0).any()):
        up = up * block_weights[:, None, None]
    like = group[0].parts[0].module
    down, up = down.to(out_dtype), up.to(out_dtype)
    down_shape = (rank, *like.down.shape[1:])
    up_shape = (like.up.shape[0], rank, *([1, 1] if like.is_conv else []))
    # Each module gets tensors of its own (safetensors refuses to write tensors that share memory).
    return {
        inputs.name: LoraModule(
            down=down[i].reshape(down_shape).clone(), up=up[i].reshape(up_shape).clone(), alpha=float(rank)
        )
        for i, inputs in enumerate(group)
    }

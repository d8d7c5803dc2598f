"""One layer of an extraction: the difference D = W_finetuned - W_base factored at the rank its
singular values show above the rounding floor of the stored weights.

Shapes: a weight [out, in] or [out, in, kh, kw] is compared as D [m, n] = [out, in*kh*kw].

The floor. Both weights are stored rounded to their dtype's grid, so D = dW + E with E the
rounding noise: per element a uniform error of half-width ulp/2 from each stored value (ulp: the
spacing of the dtype at that value's magnitude, ``torch.frexp`` of each element), variance
v_ij = (ulp_fine_ij^2 + ulp_base_ij^2) / 12 (an upper bound: a base stored without rounding adds
none). The top singular value of such a matrix is at most about sqrt(max_i sum_j v_ij) +
sqrt(max_j sum_i v_ij) (Bandeira and van Handel's bound; sigma (sqrt(m) + sqrt(n)) for equal
variances): that is the floor. Measured on fp16 weights of std 0.03 (1280 x 1280, 640 x 2048,
32 x 32), the noise's top singular value was 0.63-0.93 of it.

The rank (``rank=None``): the singular values above ``SAFETY`` x the floor (the threshold). Whether
the base was rounded too is unknown, so the noise energy N is known only between one rounding
(N_low) and two (sum v_ij). A rank-k fit keeps the share k (m + n - k) / (m n) of the noise and
misses the signal left in the tail (tail energy - (1 - share) N, when positive); D's own error is
N. The fit is kept only when it wins for every N between the two estimates (tail < 2 (1 - share)
N_low, up to the tail energy's own statistical fluctuation: with both weights rounded the noise
alone brings the tail to that bound) and its factors are smaller than D; else D itself is kept, at
full rank. So the result is never worse than D by this estimate, and a low-rank update standing
clear of the floor comes back at its exact rank. A layer whose D is within the floor (top singular
value under the threshold) is unchanged. With ``rank=N`` the best rank-N approximation is kept
and its captured energy reported.

For ranks far below the width a randomized range finder (Halko, Martinsson and Tropp, with power
iterations) replaces the full SVD, with a rank check: the residual's top singular value, estimated
by block power iteration, must lie under the threshold, else the exact SVD runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAFETY = 1.25  # threshold = SAFETY x the floor
OVERSAMPLE = 16  # extra directions of the range finder beyond the rank looked for
_RANGE_SHARE = 4  # the range finder runs while its width is at most 1/4 of the layer's
_POWER_ITERATIONS = 2
_SEED = 0  # the range finder's random test matrix: fixed, so that an extraction is reproducible


@dataclass
class LayerFit:
    """The result for one layer. ``status``: "unchanged", "low-rank" or "full-rank"; for
    "low-rank", ``up`` [m, rank] and ``down`` [rank, n] with up @ down ~ D; for "full-rank",
    ``difference`` is D [m, n] itself."""

    status: str
    rank: int  # stored: the found rank, or the width for "full-rank"
    found: int  # the singular values above the threshold (rank=None), or N (rank=N)
    width: int  # min(m, n)
    energy: float  # share of ||D||^2 kept
    floor: float  # estimated top singular value of the rounding noise
    top: float  # largest singular value of D
    cliff: float  # s_rank / s_(rank+1) (inf at full rank or when nothing follows)
    tail_excess: float  # energy left below the threshold / rounding energy expected there (~1: noise only)
    relative: float  # ||D|| / ||W_base||
    error: float  # estimated ||result - dW|| (noise kept + signal dropped)
    raw_error: float  # estimated ||D - dW||: the rounding noise alone (both estimates at one rounding)
    solver: str  # "exact", "range" or "" (nothing to factor)
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    difference: torch.Tensor | None = None


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 for weights stored in 16-bit floats (the SVD's own error, ~1e-7 of the top singular
    value, is far below their rounding floor), float64 otherwise (fp32 weights round at ~6e-8)."""
    return torch.float32 if all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors) else torch.float64


def rounding_variance(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per element, the variance ulp^2 / 12 of rounding to ``weight``'s stored dtype at its magnitude."""
    info = torch.finfo(weight.dtype)
    _, exponent = torch.frexp(weight.to(dtype))  # |w| = f 2^e, f in [0.5, 1): spacing eps 2^(e-1)
    spacing = (torch.exp2((exponent - 1).to(dtype)) * info.eps).clamp_min(info.smallest_normal * info.eps)
    return spacing.square() / 12


def fit_layer(fine: torch.Tensor, base: torch.Tensor, rank: int | None = None, rank_hint: int = 0) -> LayerFit:
    """Factor D = ``fine`` - ``base`` (stored weights of one layer, equal shapes). ``rank``: None
    for the rank read from the spectrum, N for the best rank-N approximation. ``rank_hint``: the
    rank expected (the largest found so far), which sizes the range finder (0: exact SVD)."""
    dtype = compute_dtype(fine, base)
    base_c = base.to(dtype).reshape(base.shape[0], -1)
    difference = fine.to(dtype).reshape(fine.shape[0], -1) - base_c
    m, n = difference.shape
    width = min(m, n)
    base_norm = float(base_c.norm())
    total = float(difference.square().sum())
    relative = math.sqrt(total) / base_norm if base_norm else math.inf
    del base_c
    if total == 0.0:
        return LayerFit("unchanged", 0, 0, width, 0.0, 0.0, 0.0, math.inf, 0.0, 0.0, 0.0, 0.0, "")
    fine_variance, base_variance = rounding_variance(fine, dtype), rounding_variance(base, dtype)
    # One rounding at least (a base stored without rounding adds none): the lower noise estimate.
    noise_low = max(float(fine_variance.sum()), float(base_variance.sum()))
    variance = (fine_variance + base_variance).reshape(m, n)
    del fine_variance, base_variance
    floor = math.sqrt(float(variance.sum(1).max())) + math.sqrt(float(variance.sum(0).max()))
    noise = float(variance.sum())  # expected ||E||^2 when both weights were rounded: the upper estimate
    del variance
    threshold = SAFETY * floor
    unchanged = LayerFit(
        "unchanged",
        0,
        0,
        width,
        0.0,
        floor,
        math.sqrt(total),
        math.inf,
        total / noise if noise else math.inf,
        relative,
        math.sqrt(total),
        math.sqrt(noise_low),
        "",
    )
    if math.sqrt(total) <= threshold:  # s_1 <= ||D||_F: within the floor without any SVD
        return unchanged
    u, s, vh, solver = _decompose(difference, threshold, rank, rank_hint)
    # The SVD's own error (float rounding, ~eps sqrt(n) s_1) is a floor too: relevant for fp32 weights only.
    threshold = max(threshold, 16 * torch.finfo(dtype).eps * math.sqrt(max(m, n)) * float(s[0]))
    unchanged.top = float(s[0])
    if float(s[0]) <= threshold:
        return unchanged
    kept = int((s > threshold).sum()) if rank is None else min(rank, width)
    kept_energy = float(s[:kept].square().sum())
    tail = max(total - kept_energy, 0.0)
    share = min(kept * (m + n - kept) / (m * n), 1.0)  # of the noise energy a rank-k fit keeps
    # At noise energy N the fit's error^2 is share N + (signal left in the tail: tail - (1 - share) N,
    # when positive) and D's is N: the fit is better iff tail < 2 (1 - share) N, hardest at the low N.
    error2 = share * noise_low + max(tail - (1 - share) * noise_low, 0.0)
    cliff = float(s[kept - 1] / s[kept]) if kept < len(s) and float(s[kept]) > 0 else math.inf
    tail_excess = tail / ((1 - share) * noise) if share < 1 else math.inf
    # The tail's energy is a sum over (m - k)(n - k) rounding errors: allow 5 of its standard
    # deviations (about sqrt(1.4 / count) relative for uniform errors) before calling it signal.
    fluctuation = 1 + 5 * math.sqrt(1.4 / max((m - kept) * (n - kept), 1))
    # Factors larger than D itself (rank (m + n) > m n) buy nothing: D is stored, exactly.
    if kept * (m + n) > m * n or (rank is None and tail >= 2 * (1 - share) * noise_low * fluctuation):
        return LayerFit(
            "full-rank",
            width,
            kept,
            width,
            1.0,
            floor,
            float(s[0]),
            cliff,
            tail_excess,
            relative,
            math.sqrt(noise_low),
            math.sqrt(noise_low),
            solver,
            difference=difference,
        )
    root = s[:kept].sqrt()
    return LayerFit(
        "low-rank",
        kept,
        kept,
        width,
        kept_energy / total,
        floor,
        float(s[0]),
        cliff,
        tail_excess,
        relative,
        math.sqrt(error2),
        math.sqrt(noise_low),
        solver,
        up=u[:, :kept] * root,
        down=root[:, None] * vh[:kept],
    )


def _decompose(difference: torch.Tensor, threshold: float, rank: int | None, rank_hint: int):
    """(U, S, Vh, solver) holding at least the singular values the rank choice needs: all of them
    (exact SVD), or the leading ones when a range finder of width rank + OVERSAMPLE suffices."""
    width = min(difference.shape)
    wanted = rank if rank is not None else rank_hint  # no hint yet: the exact SVD finds the first rank
    generator = torch.Generator().manual_seed(_SEED)
    while wanted and (wanted + OVERSAMPLE) * _RANGE_SHARE <= width:
        q = wanted + OVERSAMPLE
        iterations = _POWER_ITERATIONS if rank is None else 2 * _POWER_ITERATIONS  # no gap to rely on for a fixed rank
        u, s, vh = _range_svd(difference, q, iterations, generator)
        if rank is not None:
            return u, s, vh, "range"
        found = int((s > threshold).sum())
        # A window with its last directions above the threshold may cut the spectrum: look wider.
        if (
            found <= q - OVERSAMPLE // 2
            and _residual_top(difference, u[:, :found], s[:found], vh[:found], generator) <= threshold
        ):
            return u, s, vh, "range"
        wanted = max(2 * wanted, found + 1)
    u, s, vh = torch.linalg.svd(difference, full_matrices=False)
    return u, s, vh, "exact"


def _range_svd(matrix: torch.Tensor, q: int, iterations: int, generator: torch.Generator):
    """A rank-q SVD from a randomized range finder with ``iterations`` power iterations.

    torch.svd_lowrank does the same but draws its test matrix from the global random state, so
    results would change between runs (and it would move the caller's random state)."""
    test = torch.randn(matrix.shape[1], q, generator=generator, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ test)
    for _ in range(iterations):
        co_basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ co_basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u_small, s, vh


def _residual_top(matrix, u, s, vh, generator, block: int = 4, iterations: int = 6) -> float:
    """An estimate (from below) of the largest singular value of matrix - u diag(s) vh, by block
    power iteration on the residual applied without forming it."""
    x = torch.randn(matrix.shape[1], block, generator=generator, dtype=matrix.dtype)
    estimate = 0.0
    for _ in range(iterations):
        x, _ = torch.linalg.qr(x)
        y = matrix @ x - u @ (s[:, None] * (vh @ x))
        estimate = float(torch.linalg.matrix_norm(y, ord=2))
        x = matrix.T @ y - vh.T @ (s[:, None] * (u.T @ y))
    return estimate

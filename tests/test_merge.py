"""Merge math (selma_toolkit.lora.merge_experts), merge_files and `selma merge`.

Every method is checked against an independent dense computation in numpy from each expert's A,
B and alpha (never through LoraModule.delta), and against peft's add_weighted_adapter where peft
has the method.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import LoraModule, LoraWeights, merge_experts
from selma_toolkit.lora.merge import MERGE_METADATA_KEY, merge_record

LINEAR = {
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (12, 10),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (12, 7),
}


def random_expert(seed: int, rank: int, alpha: float, shapes=None, dtype=torch.float64, metadata=None) -> LoraWeights:
    """Random A and B (B non-zero, unlike a fresh peft init) for each module of ``shapes``."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in (shapes or LINEAR).items():
        out, *inner = shape
        down = torch.randn(rank, *inner, generator=generator, dtype=dtype)
        up = torch.randn(out, rank, *([1, 1] if len(inner) == 3 else []), generator=generator, dtype=dtype)
        modules[name] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraWeights(modules=modules, metadata=dict(metadata or {}))


def factors(module: LoraModule) -> tuple[np.ndarray, np.ndarray, float]:
    """(B [out, r], A [r, in_flat], alpha / r) as float64 numpy arrays."""
    up = module.up.detach().double().numpy().reshape(module.up.shape[0], -1)
    down = module.down.detach().double().numpy().reshape(module.down.shape[0], -1)
    return up, down, float(module.alpha) / down.shape[0]


def update(module: LoraModule) -> np.ndarray:
    """The module's dense update alpha/r * B @ A, computed here from the factors."""
    up, down, scale = factors(module)
    return scale * up @ down


def best_rank_approximation(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# --------------------------------------------------------------------------------- methods


def test_selma_uniform_averages_A_and_B_separately_with_scales_folded_into_B():
    experts = [random_expert(0, 4, 8.0), random_expert(1, 4, 2.0), random_expert(2, 4, 4.0)]
    merged = merge_experts(experts)  # method selma, weights 1/T by default
    for name, module in merged.modules.items():
        parts = [factors(e.modules[name]) for e in experts]
        mean_a = sum(a for _, a, _ in parts) / 3
        mean_b = sum(s * b for b, _, s in parts) / 3
        np.testing.assert_allclose(module.down.numpy(), mean_a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(module.up.numpy(), mean_b, rtol=1e-12, atol=1e-12)
        assert module.scale == 1.0
        cross_terms = sum(sb * b @ a for b, _, sb in parts for _, a, _ in parts) / 9
        np.testing.assert_allclose(update(module), cross_terms, rtol=1e-10, atol=1e-10)


def test_selma_weighted_merge_keeps_cross_terms_and_is_not_the_sum_of_updates():
    experts = [random_expert(3, 4, 1.0), random_expert(4, 4, 16.0)]
    weights = [0.2, 0.8]
    merged = merge_experts(experts, "selma", weights)
    for name, module in merged.modules.items():
        parts = [factors(e.modules[name]) for e in experts]
        expected = sum(
            ws * wt * ss * bs @ at for ws, (bs, _, ss) in zip(weights, parts) for wt, (_, at, _) in zip(weights, parts)
        )
        np.testing.assert_allclose(update(module), expected, rtol=1e-10, atol=1e-10)
        sum_of_updates = sum(w * s * b @ a for w, (b, a, s) in zip(weights, parts))
        assert not np.allclose(update(module), sum_of_updates, atol=1e-3)


def test_delta_is_the_exact_weighted_sum_of_updates_with_stacked_ranks():
    experts = [random_expert(5, 2, 4.0), random_expert(6, 3, 1.5), random_expert(7, 5, 5.0)]
    weights = [0.5, -0.25, 1.5]
    merged = merge_experts(experts, "delta", weights)
    for name, module in merged.modules.items():
        expected = sum(w * update(e.modules[name]) for w, e in zip(weights, experts))
        np.testing.assert_allclose(update(module), expected, rtol=1e-10, atol=1e-10)
        assert module.rank == 2 + 3 + 5 and module.scale == 1.0


def test_svd_is_the_best_rank_r_approximation_of_the_weighted_sum():
    experts = [random_expert(8, 3, 6.0), random_expert(9, 4, 2.0)]
    weights = [0.7, 0.3]
    merged = merge_experts(experts, "svd", weights, rank=3)
    for name, module in merged.modules.items():
        total = sum(w * update(e.modules[name]) for w, e in zip(weights, experts))
        assert module.rank == 3
        np.testing.assert_allclose(update(module), best_rank_approximation(total, 3), rtol=1e-9, atol=1e-9)


def test_svd_default_rank_is_the_largest_expert_rank_and_exact_when_it_suffices():
    experts = [random_expert(10, 2, 2.0), random_expert(11, 1, 3.0)]
    merged = merge_experts(experts, "svd")
    for module in merged.modules.values():
        assert module.rank == 2
    big = merge_experts(experts, "svd", rank=3)  # 2 + 1: the sum of updates has rank 3
    for name, module in big.modules.items():
        expected = sum(update(e.modules[name]) / 2 for e in experts)
        np.testing.assert_allclose(update(module), expected, rtol=1e-9, atol=1e-9)


def test_randomized_svd_recovers_a_low_rank_sum_and_is_reproducible():
    experts = [random_expert(12, 2, 2.0), random_expert(13, 2, 1.0)]
    merged = merge_experts(experts, "svd", rank=4, svd_mode="randomized", seed=3)
    again = merge_experts(experts, "svd", rank=4, svd_mode="randomized", seed=3)
    for name, module in merged.modules.items():
        expected = sum(update(e.modules[name]) / 2 for e in experts)
        np.testing.assert_allclose(update(module), expected, rtol=1e-8, atol=1e-8)
        assert torch.equal(module.down, again.modules[name].down)


# ------------------------------------------------------------- svd from the stacked factors


SD_SIZED = {  # SD 1.5 layer shapes: attention projections, a cross-attention key, a 3x3 conv (flattened 2880)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (640, 640),
    "unet.down_blocks.0.resnets.0.conv1": (320, 320, 3, 3),
}


def dense_svd_reference(experts, weights, name, rank):
    """The best rank-r approximation of sum_t w_t dW_t, each dW_t from A, B and alpha in float64 numpy."""
    return best_rank_approximation(sum(w * update(e.modules[name]) for w, e in zip(weights, experts)), rank)


def test_svd_from_the_factors_gives_the_product_of_the_dense_svd_at_sd_sizes():
    experts = [random_expert(30, 16, 8.0, SD_SIZED), random_expert(31, 16, 16.0, SD_SIZED)]
    weights = [0.6, -0.4]  # a negative weight: the merge of a difference
    for name, shape in SD_SIZED.items():
        u, s, vh = np.linalg.svd(
            sum(w * update(e.modules[name]) for w, e in zip(weights, experts)), full_matrices=False
        )
        for rank in (8, 20, 40):  # below R = 32, between the experts' rank and R, above R (zero-padded)
            module = merge_experts(experts, "svd", weights, rank=rank).modules[name]
            assert module.rank == rank and module.down.shape[1:] == shape[1:] and module.up.shape[0] == shape[0]
            expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
            np.testing.assert_allclose(update(module), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
            # The dense SVD's convention: A_m has orthonormal rows (as many as the sum has directions).
            down = module.down.reshape(rank, -1).numpy()[: min(rank, 32)]
            np.testing.assert_allclose(down @ down.T, np.eye(len(down)), atol=1e-9)


def test_svd_from_the_factors_never_forms_a_dense_update(monkeypatch):
    from selma_toolkit.lora.merging import formulas

    def refuse(*args, **kwargs):
        raise AssertionError("a dense update was formed")

    monkeypatch.setattr(LoraModule, "delta", refuse)
    monkeypatch.setattr(formulas, "svd_update", refuse)
    monkeypatch.setattr(formulas, "factor", refuse)
    experts = [random_expert(32, 4, 4.0, SD_SIZED), random_expert(33, 4, 2.0, SD_SIZED)]
    merged = merge_experts(experts, "svd", [0.5, 0.5], rank=4)
    assert set(merged.modules) == set(SD_SIZED)
    with pytest.raises(AssertionError, match="a dense update was formed"):  # the randomized SVD needs it
        merge_experts(experts, "svd", [0.5, 0.5], rank=4, svd_mode="randomized")


def test_svd_from_the_factors_handles_degenerate_stacks_exactly():
    shapes = {"unet.conv_out": (4, 320, 3, 3), "unet.mid_block.attentions.0.proj_in": (64, 16)}
    twin = random_expert(34, 12, 12.0, shapes)
    same_a = LoraWeights(
        {name: LoraModule(m.down.clone(), m.up.flip(0).clone(), 3.0) for name, m in twin.modules.items()}
    )
    # conv_out: out = 4 < R = 24 (G_B singular); proj_in: in = 16 < R, and both experts share A (G_A singular).
    experts, weights = [twin, same_a], [0.7, 0.3]
    merged = merge_experts(experts, "svd", weights, rank=6)
    for name in shapes:
        expected = dense_svd_reference(experts, weights, name, 6)
        np.testing.assert_allclose(update(merged.modules[name]), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    # An expert minus itself: D = 0 exactly, and so is the merge (no noise direction is kept).
    cancelled = merge_experts([twin, twin], "svd", [1.0, -1.0], rank=4)
    assert all(not module.up.any() for module in cancelled.modules.values())


def test_svd_from_the_factors_merges_modules_some_experts_lack_and_each_their_own_block_weight():
    first = random_expert(35, 3, 3.0, SD_SIZED)
    second = random_expert(36, 5, 2.5, dict(list(SD_SIZED.items())[:2]))  # lacks two modules: zero updates there
    merged = merge_experts([first, second], "svd", [0.5, 0.5], rank=4, block_weights={"in": 2.0, "in.1": 0.0})
    gains = dict(zip(SD_SIZED, (2.0, 2.0, 0.0, 2.0)))
    for name, gain in gains.items():
        present = [e for e in (first, second) if name in e.modules]
        expected = gain * dense_svd_reference(present, [0.5] * len(present), name, 4)
        np.testing.assert_allclose(
            update(merged.modules[name]), expected, rtol=0, atol=1e-10 * max(np.abs(expected).max(), 1)
        )


def test_svd_from_float16_experts_matches_the_dense_float64_svd_to_float16_precision():
    experts = [
        random_expert(37, 16, 16.0, SD_SIZED, dtype=torch.float16),
        random_expert(38, 16, 8.0, SD_SIZED, dtype=torch.float16),
    ]
    merged = merge_experts(experts, "svd", rank=8)
    for name, module in merged.modules.items():
        assert module.down.dtype == module.up.dtype == torch.float16
        expected = dense_svd_reference(experts, [0.5, 0.5], name, 8)
        error = np.abs(update(module) - expected).max() / np.abs(expected).max()
        assert error < 2e-3, (name, error)  # the result's own float16 rounding


def test_svd_from_float32_experts_is_exact_to_float32_and_a_near_cancelling_merge_too(monkeypatch):
    from selma_toolkit.lora.merging import lowrank

    precisions = []
    truncated_svd = lowrank._truncated_svd
    monkeypatch.setattr(
        lowrank,
        "_truncated_svd",
        lambda group, rank, dtype: precisions.append(dtype) or truncated_svd(group, rank, dtype),
    )
    experts = [
        random_expert(40, 16, 16.0, SD_SIZED, dtype=torch.float32),
        random_expert(41, 16, 8.0, SD_SIZED, dtype=torch.float32),
    ]
    merged = merge_experts(experts, "svd", [0.6, 0.4], rank=8)
    assert set(precisions) == {torch.float32}  # float32 Grams resolve every kept singular value here
    for name, module in merged.modules.items():
        expected = dense_svd_reference(experts, [0.6, 0.4], name, 8)
        assert np.abs(update(module) - expected).max() < 1e-5 * np.abs(expected).max(), name
    # An expert minus a copy of itself with B changed by 1e-4: D is 1e-4 of the factors' scale, below what
    # float32 Grams resolve (every singular value would be dropped): the modules are computed in float64.
    generator = torch.Generator().manual_seed(42)
    near = LoraWeights(
        {
            name: LoraModule(m.down.clone(), m.up * (1 + 1e-4 * torch.randn(m.up.shape, generator=generator)), m.alpha)
            for name, m in experts[0].modules.items()
        }
    )
    precisions.clear()
    cancelled = merge_experts([experts[0], near], "svd", [1.0, -1.0], rank=8)
    assert torch.float64 in precisions
    for name, module in cancelled.modules.items():
        expected = dense_svd_reference([experts[0], near], [1.0, -1.0], name, 8)
        assert np.abs(update(module) - expected).max() < 1e-5 * np.abs(expected).max(), name


def ties_reference(updates: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES written out in numpy: trim, elect sign on the weighted sum, weighted disjoint mean."""
    trimmed = []
    for u in updates:
        keep = int(density * u.size)
        order = np.argsort(-np.abs(u).ravel(), kind="stable")[:keep]
        t = np.zeros(u.size)
        t[order] = u.ravel()[order]
        trimmed.append(t.reshape(u.shape))
    elected = np.where(sum(w * t for w, t in zip(weights, trimmed)) >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == elected) & (t != 0) for t in trimmed]
    numerator = sum(w * a * t for w, a, t in zip(weights, agree, trimmed))
    denominator = sum(w * a for w, a in zip(weights, agree))
    mean = np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
    return sum(weights) * mean


def test_ties_matches_an_independent_trim_elect_disjoint_mean_computation():
    experts = [random_expert(14, 3, 3.0), random_expert(15, 3, 9.0), random_expert(16, 2, 1.0)]
    weights = [0.5, 0.2, 0.6]  # summing to 1.3, so the strength lambda = sum of weights shows
    full_rank = 10  # the layers are 12x10 and 12x7: rank 10 keeps the dense update whole
    merged = merge_experts(experts, "ties", weights, rank=full_rank, density=0.4)
    for name, module in merged.modules.items():
        expected = ties_reference([update(e.modules[name]) for e in experts], weights, 0.4)
        np.testing.assert_allclose(update(module), best_rank_approximation(expected, full_rank), rtol=1e-9, atol=1e-9)


def test_ties_without_trimming_or_sign_conflict_is_the_delta_rule():
    # All factors positive -> every update positive -> no sign conflict anywhere.
    experts = [random_expert(17, 2, 2.0), random_expert(18, 3, 1.0)]
    for expert in experts:
        for module in expert.modules.values():
            module.down.abs_(), module.up.abs_()
    weights = [0.5, 1.0]
    ties = merge_experts(experts, "ties", weights, rank=5, density=1.0)
    delta = merge_experts(experts, "delta", weights)
    for name in ties.modules:
        np.testing.assert_allclose(update(ties.modules[name]), update(delta.modules[name]), rtol=1e-9, atol=1e-9)


def test_dare_keeps_each_entry_of_each_update_or_drops_it_and_rescales_by_density():
    experts = [random_expert(19, 3, 3.0), random_expert(20, 2, 2.0)]
    weights, density = [0.4, 0.6], 0.5
    merged = merge_experts(experts, "dare", weights, rank=10, density=density, seed=1)  # full rank
    name = next(iter(LINEAR))
    a, b = (w * update(e.modules[name]) / density for w, e in zip(weights, experts))
    candidates = np.stack([np.zeros_like(a), a, b, a + b])  # every subset of the two experts
    result = update(merged.modules[name])
    assert np.abs(candidates - result).min(axis=0).max() < 1e-9
    kept_a = np.isclose(result, a) | np.isclose(result, a + b)
    assert 0.25 < kept_a.mean() < 0.75  # 120 entries at density 0.5
    same = merge_experts(experts, "dare", weights, rank=10, density=density, seed=1)
    other = merge_experts(experts, "dare", weights, rank=10, density=density, seed=2)
    np.testing.assert_array_equal(update(same.modules[name]), result)
    assert not np.allclose(update(other.modules[name]), result)


def test_dare_is_unbiased_over_seeds():
    experts = [
        random_expert(21, 2, 2.0, shapes={"unet.x.to_q": (6, 5)}),
        random_expert(22, 2, 4.0, shapes={"unet.x.to_q": (6, 5)}),
    ]
    delta = update(merge_experts(experts, "delta").modules["unet.x.to_q"])
    runs = 400
    mean = (
        sum(
            update(merge_experts(experts, "dare", rank=5, density=0.5, seed=s).modules["unet.x.to_q"])
            for s in range(runs)
        )
        / runs
    )
    # The relative error of a 400-run mean is about sqrt((1-p)/p/400) = 0.05 for p = 0.5.
    assert np.linalg.norm(mean - delta) / np.linalg.norm(delta) < 0.15


def test_conv_modules_merge_on_the_flattened_kernel_and_keep_conv_shapes():
    shapes = {"unet.down_blocks.0.resnets.0.conv1": (8, 4, 3, 3)}
    experts = [random_expert(23, 2, 4.0, shapes), random_expert(24, 3, 3.0, shapes)]
    name = next(iter(shapes))
    expected = sum(update(e.modules[name]) / 2 for e in experts)
    delta = merge_experts(experts, "delta").modules[name]
    svd = merge_experts(experts, "svd", rank=5).modules[name]
    for module in (delta, svd):
        assert module.down.shape[1:] == (4, 3, 3) and module.up.shape[2:] == (1, 1)
        np.testing.assert_allclose(update(module), expected, rtol=1e-9, atol=1e-9)


def test_normalize_divides_the_weights_by_their_sum():
    experts = [random_expert(25, 2, 2.0), random_expert(26, 2, 1.0)]
    normalized = merge_experts(experts, "delta", [1.0, 3.0], normalize=True)
    explicit = merge_experts(experts, "delta", [0.25, 0.75])
    for name in explicit.modules:
        np.testing.assert_allclose(update(normalized.modules[name]), update(explicit.modules[name]), rtol=1e-12)
    assert merge_record(normalized)["weights"] == [0.25, 0.75]


def test_merge_record_holds_what_recomputes_the_merge_exactly():
    experts = [random_expert(27, 3, 1.0), random_expert(28, 3, 2.0)]
    merged = merge_experts(
        experts, "dare", [0.3, 0.9], rank=2, density=0.7, seed=5, names=["count.safetensors", "coco.safetensors"]
    )
    record = json.loads(merged.metadata[MERGE_METADATA_KEY])
    assert [e["name"] for e in record["experts"]] == ["count.safetensors", "coco.safetensors"]
    again = merge_experts(
        experts, record["method"], record["weights"], record["rank"], density=record["density"], seed=record["seed"]
    )
    for name, module in merged.modules.items():
        assert torch.equal(module.down, again.modules[name].down) and torch.equal(module.up, again.modules[name].up)


# ------------------------------------------------------------------- peft as the reference


def peft_model_with_two_adapters():
    """A small linear + conv model with two peft adapters of unequal rank and alpha, random B."""
    peft = pytest.importorskip("peft")

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(10, 12)
            self.conv = torch.nn.Conv2d(4, 6, 3)

    torch.manual_seed(0)
    model = peft.get_peft_model(
        Small(), peft.LoraConfig(r=3, lora_alpha=6.0, target_modules=["to_q", "conv"]), adapter_name="count"
    )
    model.add_adapter("coco", peft.LoraConfig(r=5, lora_alpha=2.0, target_modules=["to_q", "conv"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param))
    return model


def experts_from_peft(model) -> list[LoraWeights]:
    experts = []
    for adapter in ("count", "coco"):
        alpha = model.peft_config[adapter].lora_alpha
        modules = {}
        for short in ("to_q", "conv"):
            layer = getattr(model.base_model.model, short)
            modules[f"unet.{short}"] = LoraModule(
                down=layer.lora_A[adapter].weight.detach().double(),
                up=layer.lora_B[adapter].weight.detach().double(),
                alpha=alpha,
            )
        experts.append(LoraWeights(modules))
    return experts


@pytest.mark.parametrize(
    ("peft_type", "peft_weights", "ours", "kwargs"),
    [
        ("cat", [0.3, 0.7], "delta", {}),
        ("svd", [0.3, 0.7], "svd", {"rank": 4}),
        ("ties_svd", [1.0, 1.0], "ties", {"rank": 4, "density": 0.5}),
        ("dare_linear_svd", [0.3, 0.7], "dare", {"rank": 4, "density": 1.0}),
    ],
)
@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
def test_merge_matches_peft_add_weighted_adapter(peft_type, peft_weights, ours, kwargs):
    model = peft_model_with_two_adapters()
    peft_kwargs = {"svd_rank": kwargs.get("rank")} if peft_type.endswith("svd") else {}
    if "density" in kwargs:
        peft_kwargs["density"] = kwargs["density"]
    model.add_weighted_adapter(["count", "coco"], peft_weights, "merged", combination_type=peft_type, **peft_kwargs)
    # peft's ties_svd with weights c equals ours with weights c / T (see merge_experts' docstring).
    weights = [w / 2 for w in peft_weights] if ours == "ties" else peft_weights
    merged = merge_experts(experts_from_peft(model), ours, weights, **kwargs)
    for short in ("to_q", "conv"):
        reference = getattr(model.base_model.model, short).get_delta_weight("merged").detach().double().numpy()
        np.testing.assert_allclose(
            update(merged.modules[f"unet.{short}"]), reference.reshape(reference.shape[0], -1), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------------------- bad inputs


def test_selma_with_unequal_ranks_names_the_experts_and_suggests_delta_or_svd():
    experts = [random_expert(30, 2, 2.0), random_expert(31, 4, 4.0)]
    with pytest.raises(LoraFormatError) as error:
        merge_experts(experts, names=["count.safetensors", "coco.safetensors"])
    message = str(error.value)
    assert "count.safetensors: rank 2" in message and "coco.safetensors: rank 4" in message
    assert "Set method to delta" in message and "set method to svd and rank to a value of your choice" in message


def test_experts_of_different_shapes_raise_naming_both_files_and_a_module():
    name = next(iter(LINEAR))
    other = random_expert(33, 2, 2.0, shapes={name: (12, 20)})
    with pytest.raises(LoraFormatError) as error:
        merge_experts([random_expert(32, 2, 2.0), other], "delta", names=["sd15.safetensors", "sdxl.safetensors"])
    message = str(error.value)
    assert "sd15.safetensors" in message and "sdxl.safetensors" in message and name in message


def test_missing_modules_count_as_zero_and_are_listed_in_a_warning(caplog):
    full = random_expert(34, 2, 2.0)
    only_q = next(iter(LINEAR))
    partial = random_expert(35, 2, 4.0, shapes={only_q: LINEAR[only_q]})
    with caplog.at_level(logging.WARNING, logger="selma_toolkit.lora.merge"):
        merged = merge_experts([full, partial], "delta", [0.5, 0.5], names=["full.safetensors", "partial.safetensors"])
    missing = next(n for n in LINEAR if n != only_q)
    assert any("partial.safetensors" in r.getMessage() and missing in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(update(merged.modules[missing]), 0.5 * update(full.modules[missing]), rtol=1e-12)
    selma = merge_experts([full, partial], "selma")  # zero A and B for the missing expert
    np.testing.assert_allclose(selma.modules[missing].down.numpy(), full.modules[missing].down.numpy() / 2)


def test_different_base_models_of_the_same_shapes_only_warn(caplog):
    a = random_expert(36, 2, 2.0, metadata={"selma.base_model": "CompVis/stable-diffusion-v1-4"})
    b = random_expert(37, 2, 2.0, metadata={"selma.base_model": "runwayml/stable-diffusion-v1-5"})
    with caplog.at_level(logging.WARNING, logger="selma_toolkit.lora.merge"):
        merged = merge_experts([a, b], names=["a.safetensors", "b.safetensors"])
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "stable-diffusion-v1-4" in text and "stable-diffusion-v1-5" in text
    assert set(merged.modules) == set(LINEAR)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"weights": [0.5]}, "1 weight(s) for 2 expert(s)"),
        ({"method": "ties", "weights": [0.5, -0.5]}, "weights > 0"),
        ({"method": "selma", "rank": 8}, "Leave rank unset or set method to svd."),
        ({"method": "dare", "density": 0.0}, "density 0.0"),
        ({"method": "average"}, "expected one of selma, delta, svd, ties, dare"),
        ({"weights": [1.0, -1.0], "normalize": True}, "sum to 0"),
    ],
)
def test_bad_merge_options_raise_a_clear_error(kwargs, fragment):
    with pytest.raises(LoraFormatError, match=None) as error:
        merge_experts([random_expert(38, 2, 2.0), random_expert(39, 2, 2.0)], **kwargs)
    assert fragment in str(error.value)


def test_no_experts_is_an_error():
    with pytest.raises(LoraFormatError, match="at least one"):
        merge_experts([])


def test_experts_for_different_architectures_raise_naming_both_files_and_a_module():
    # No module in common, so no shape clash: the architecture evidence must catch it
    # (cross-attention from 768-wide CLIP-L text = SD 1.x; a second transformer block = SDXL).
    sd1 = random_expert(
        40, 1, 1.0, shapes={"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 768)}
    )
    sdxl = random_expert(
        41, 1, 1.0, shapes={"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (640, 640)}
    )
    with pytest.raises(LoraFormatError) as error:
        merge_experts([sd1, sdxl], "delta", names=["sd15.safetensors", "sdxl.safetensors"])
    message = str(error.value)
    assert "sd15.safetensors" in message and "sdxl.safetensors" in message
    assert "sd1" in message and "sdxl" in message and "transformer_blocks" in message


# ------------------------------------------------------------------------- files and CLI


def save_experts(folder, experts, skills):
    from selma_toolkit.lora import save_lora

    return [
        save_lora(e, folder / f"{skill}.safetensors", metadata={"skill": skill}) for e, skill in zip(experts, skills)
    ]


def test_merge_files_matches_the_in_memory_merge_and_records_each_input_sha256(tmp_path):
    from selma_toolkit.io import sha256_file
    from selma_toolkit.lora import load_lora, merge_files

    experts = [random_expert(42, 3, 6.0, dtype=torch.float32), random_expert(43, 3, 1.0, dtype=torch.float32)]
    paths = save_experts(tmp_path, experts, ["countbench", "whoops"])
    out = tmp_path / "merged" / "selma.safetensors"
    merge_files(paths, out, "selma", [0.4, 0.6])
    written = load_lora(out)
    in_memory = merge_experts(experts, "selma", [0.4, 0.6])
    for name, module in in_memory.modules.items():
        np.testing.assert_allclose(update(written.modules[name]), update(module), rtol=1e-5, atol=1e-6)
    record = merge_record(written)
    assert record["method"] == "selma" and record["weights"] == [0.4, 0.6]
    assert [(e["name"], e["skill"], e["sha256"]) for e in record["experts"]] == [
        (p.name, skill, sha256_file(p)) for p, skill in zip(paths, ["countbench", "whoops"])
    ]
    assert sorted(p.name for p in out.parent.iterdir()) == ["selma.safetensors"]  # no temporary file left


def test_merged_file_keeps_the_architecture_base_model_and_provenance_of_its_experts(tmp_path):
    from selma_toolkit.lora import guess_architecture, inspect_lora, merge_files, save_lora

    # LINEAR's widths tell no architecture: only the experts' files say sd1 (as `selma lora info` shows).
    paths = [
        save_lora(
            random_expert(50 + i, 2, 2.0, dtype=torch.float32),
            tmp_path / f"{skill}.safetensors",
            metadata={"skill": skill, "architecture": "sd1", "base_model": "tiny:sd1", "recipe_sha256": f"{i}" * 64},
        )
        for i, skill in enumerate(["countbench", "whoops"])
    ]
    assert guess_architecture(random_expert(50, 2, 2.0)) is None
    assert [inspect_lora(p).architecture for p in paths] == ["sd1", "sd1"]
    merged = merge_files(paths, tmp_path / "merged.safetensors", "delta")
    info = inspect_lora(tmp_path / "merged.safetensors")
    assert info.architecture == "sd1" and guess_architecture(merged) == "sd1"
    assert (
        info.file_metadata["selma.base_model"] == "tiny:sd1" and info.file_metadata["ss_base_model_version"] == "sd_v1"
    )
    assert info.file_metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    record = merge_record(info.weights)
    assert [(e["skill"], e["architecture"], e["base_model"], e["recipe_sha256"]) for e in record["experts"]] == [
        ("countbench", "sd1", "tiny:sd1", "0" * 64),
        ("whoops", "sd1", "tiny:sd1", "1" * 64),
    ]
    # Experts that name no architecture (or disagree on the base model) leave those fields out.
    plain = [
        save_lora(
            random_expert(60 + i, 2, 2.0, dtype=torch.float32),
            tmp_path / f"p{i}.safetensors",
            metadata={"base_model": f"model-{i}"},
        )
        for i in range(2)
    ]
    metadata = merge_files(plain, tmp_path / "plain.safetensors", "delta").metadata
    assert "selma.architecture" not in metadata and "selma.base_model" not in metadata


def test_cli_merge_writes_the_weighted_delta_and_prints_the_summary(tmp_path, cli):
    from selma_toolkit.lora import load_lora

    experts = [random_expert(44, 2, 2.0, dtype=torch.float32), random_expert(45, 4, 1.0, dtype=torch.float32)]
    paths = save_experts(tmp_path, experts, ["coco", "whoops"])
    out = tmp_path / "merged.safetensors"
    result = cli("merge", *map(str, paths), "--out", str(out), "--method", "delta", "--weights", "0.2,0.8")
    assert result.returncode == 0, result.stderr
    assert "modules" in result.stdout and "delta" in result.stdout and "coco.safetensors" in result.stdout
    written = load_lora(out)
    for name in LINEAR:
        expected = 0.2 * update(experts[0].modules[name]) + 0.8 * update(experts[1].modules[name])
        np.testing.assert_allclose(update(written.modules[name]), expected, rtol=1e-5, atol=1e-6)
        assert written.modules[name].rank == 6


def test_cli_merge_bad_input_prints_the_reason_without_traceback(tmp_path, cli):
    experts = [random_expert(46, 2, 2.0, dtype=torch.float32), random_expert(47, 4, 1.0, dtype=torch.float32)]
    paths = save_experts(tmp_path, experts, ["coco", "whoops"])
    result = cli("merge", *map(str, paths), "--out", str(tmp_path / "m.safetensors"))  # selma, unequal ranks
    assert result.returncode == 2
    assert "--method delta" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_merge_svd_mode_picks_the_randomized_svd_for_ties_and_records_it(tmp_path, cli):
    from selma_toolkit.lora import load_lora

    experts = [random_expert(48, 3, 3.0, dtype=torch.float32), random_expert(49, 3, 1.0, dtype=torch.float32)]
    paths = save_experts(tmp_path, experts, ["coco", "whoops"])
    out = tmp_path / "ties.safetensors"
    common = ("--method", "ties", "--rank", "3", "--density", "1", "--seed", "5")
    result = cli("merge", *map(str, paths), "--out", str(out), *common, "--svd-mode", "randomized")
    assert result.returncode == 0, result.stderr
    record = merge_record(load_lora(out))
    assert (record["svd_mode"], record["seed"], record["rank"]) == ("randomized", 5, 3)
    exact = cli("merge", *map(str, paths), "--out", str(tmp_path / "exact.safetensors"), *common)
    assert exact.returncode == 0 and merge_record(load_lora(tmp_path / "exact.safetensors"))["svd_mode"] == "exact"
    for name in LINEAR:  # rank + oversampling covers these small layers whole: the randomized SVD is exact here
        np.testing.assert_allclose(
            update(load_lora(out).modules[name]),
            update(load_lora(tmp_path / "exact.safetensors").modules[name]),
            rtol=1e-3,
            atol=1e-4,
        )
    refused = cli("merge", *map(str, paths), "--out", str(tmp_path / "x.safetensors"), "--svd-mode", "fast")
    assert refused.returncode == 2 and "--svd-mode 'fast': expected exact or randomized" in refused.stderr

"""The diffusers adapter (selma_toolkit.adapters.diffusers.load_experts) on the tiny SD 1.x pipeline.

References: diffusers' own runtime adapters (load_lora_weights + set_adapters), and the base
model with the merged update added to its weights by hand, computed in numpy from the factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support_lora import diffusers_warnings, random_lora

from selma_toolkit.adapters.diffusers import load_experts
from selma_toolkit.lora import LoraWeights, load_lora, merge_files, save_lora

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the recipe default


@pytest.fixture
def fresh_pipe(tiny_sd1):
    from selma_toolkit.models import load_pipeline

    return lambda: load_pipeline(str(tiny_sd1), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def experts(tiny_sd1) -> list[LoraWeights]:
    """Three experts with unequal alphas (and ranks for the last), on UNet attention and text encoder."""
    from selma_toolkit.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd1), device="cpu", dtype="float32")
    specs = [(4, 1.0), (4, 8.0), (4, 3.0)]
    return [
        random_lora(pipe, rank=r, alpha=a, text_targets=TEXT_TARGETS, seed=10 + i) for i, (r, a) in enumerate(specs)
    ]


def outputs(pipe) -> tuple[np.ndarray, np.ndarray]:
    """(text-encoder hidden states, one UNet noise prediction) on fixed inputs."""
    ids = pipe.tokenizer(
        ["a red cube left of a blue ball"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, pipe.unet.config.in_channels, 8, 8, generator=generator)  # 64 px: small is enough
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, 10, encoder_hidden_states=hidden).sample
    return hidden.numpy(), noise.numpy()


def factor_arrays(module) -> tuple[np.ndarray, np.ndarray, float]:
    up = module.up.double().numpy().reshape(module.up.shape[0], -1)
    down = module.down.double().numpy().reshape(module.down.shape[0], -1)
    return up, down, float(module.alpha) / down.shape[0]


def add_updates_by_hand(pipe, updates: dict[str, np.ndarray]) -> None:
    """Add dense updates (by canonical module name) to the pipeline's weights."""
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        for name, update in updates.items():
            component, path = name.split(".", 1)
            layer = parts[component].get_submodule(path.removeprefix("text_model.") if component != "unet" else path)
            layer.weight += torch.from_numpy(update).reshape(layer.weight.shape).to(layer.weight.dtype)


def assert_close(actual, expected, base, *, tolerance=1e-4):
    """actual == expected within ``tolerance`` of how far the LoRA moved the output from base."""
    for a, e, b in zip(actual, expected, base):
        moved = np.abs(e - b).max()
        assert moved > 1e-3, "the LoRA should visibly change the output"
        assert np.abs(a - e).max() <= tolerance * moved


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # peft's note on a second adapter
def test_delta_merge_gives_the_output_of_runtime_adapters_with_uniform_weights(fresh_pipe, experts, tmp_path):
    paths = [save_lora(expert, tmp_path / f"expert{i}.safetensors") for i, expert in enumerate(experts[:2])]
    refs = [*paths, experts[2]]  # files and in-memory experts mix
    base = outputs(fresh_pipe())
    runtime_pipe = fresh_pipe()
    names = load_experts(runtime_pipe, refs, method="runtime")
    assert names == ["selma_0", "selma_1", "selma_2"]
    assert sorted(runtime_pipe.get_active_adapters()) == names
    merged_pipe = fresh_pipe()
    assert load_experts(merged_pipe, refs, method="delta") == ["selma"]
    assert_close(outputs(merged_pipe), outputs(runtime_pipe), base)


def test_selma_adapter_applies_the_papers_merged_update(fresh_pipe, experts):
    pipe = fresh_pipe()
    load_experts(pipe, experts)  # method selma, weights 1/T
    by_hand = fresh_pipe()
    base = outputs(by_hand)
    updates = {}
    for name in experts[0].modules:
        parts = [factor_arrays(e.modules[name]) for e in experts]
        mean_b = sum(s * b for b, _, s in parts) / len(parts)
        mean_a = sum(a for _, a, _ in parts) / len(parts)
        updates[name] = mean_b @ mean_a
    add_updates_by_hand(by_hand, updates)
    assert_close(outputs(pipe), outputs(by_hand), base)


@pytest.mark.parametrize(("layout", "method"), [("kohya", "delta"), ("peft", "svd")])
def test_merged_file_loads_in_a_fresh_pipeline_without_unexpected_or_missing_keys(
    fresh_pipe, experts, tmp_path, layout, method
):
    out = merge_files(
        [save_lora(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)],
        tmp_path / "merged.safetensors",
        method,
        format=layout,
    )
    written = load_lora(tmp_path / "merged.safetensors")
    pipe = fresh_pipe()
    base = outputs(pipe)
    with diffusers_warnings() as warnings:
        pipe.load_lora_weights(str(tmp_path / "merged.safetensors"), adapter_name="merged")
    assert not [w for w in warnings if "unexpected" in w or "missing" in w or "No LoRA keys" in w], warnings
    from peft.tuners.lora import LoraLayer

    adapted = sum(
        isinstance(m, LoraLayer) and "merged" in m.lora_A
        for part in (pipe.unet, pipe.text_encoder)
        for m in part.modules()
    )
    assert adapted == len(out.modules) == len(written.modules)
    by_hand = fresh_pipe()
    updates = {}
    for name, module in written.modules.items():
        up, down, scale = factor_arrays(module)
        updates[name] = scale * up @ down
    add_updates_by_hand(by_hand, updates)
    assert_close(outputs(pipe), outputs(by_hand), base)


def test_fused_adapter_gives_the_unfused_output(fresh_pipe, experts):
    unfused = fresh_pipe()
    base = outputs(fresh_pipe())
    load_experts(unfused, experts, method="svd", rank=2)
    fused = fresh_pipe()
    load_experts(fused, experts, method="svd", rank=2, fuse=True)
    assert_close(outputs(fused), outputs(unfused), base)


def block_weight_by_hand(name: str) -> float:
    """in=0.5, mid=0, out=2, te=0.25 read off a module name; UNet modules outside the blocks keep 1."""
    for prefix, weight in (
        ("unet.down_blocks.", 0.5),
        ("unet.mid_block.", 0.0),
        ("unet.up_blocks.", 2.0),
        ("text_encoder", 0.25),
    ):
        if name.startswith(prefix):
            return weight
    return 1.0


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_block_weights_scale_each_groups_update_in_the_merged_and_the_runtime_adapters(fresh_pipe, experts):
    block_weights = "in=0.5,mid=0,out=2,te=0.25"
    by_hand = fresh_pipe()
    base = outputs(by_hand)
    updates = {}
    for name in experts[0].modules:
        total = sum(s * b @ a for b, a, s in (factor_arrays(e.modules[name]) for e in experts)) / len(experts)
        updates[name] = block_weight_by_hand(name) * total
    assert {block_weight_by_hand(name) for name in updates} >= {0.5, 0.0, 2.0, 0.25}  # every group is exercised
    add_updates_by_hand(by_hand, updates)
    expected = outputs(by_hand)
    merged = fresh_pipe()
    load_experts(merged, experts, method="delta", block_weights=block_weights)
    assert_close(outputs(merged), expected, base)
    runtime = fresh_pipe()
    load_experts(runtime, experts, method="runtime", block_weights={"in": 0.5, "mid": 0, "out": 2, "te": 0.25})
    assert_close(outputs(runtime), expected, base)


def test_text_encoder_block_weight_zero_leaves_the_text_encoders_output_unchanged(fresh_pipe, experts):
    pipe = fresh_pipe()
    base_hidden, base_noise = outputs(fresh_pipe())
    load_experts(pipe, experts, block_weights="te=0")
    hidden, noise = outputs(pipe)
    assert np.array_equal(hidden, base_hidden)
    assert np.abs(noise - base_noise).max() > 1e-3  # the UNet's update stays

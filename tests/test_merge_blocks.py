"""Per-block merge weights (selma_toolkit.lora.blocks, applied by merge_experts).

Each expected update is computed here in numpy from the experts' factors with the method's rule,
then multiplied by the block weight this test assigns to each module by hand (not through
module_groups), and compared with the merged module's B @ A.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from test_merge import best_rank_approximation, factors, random_expert, ties_reference, update

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import merge_experts
from selma_toolkit.lora.blocks import module_groups, parse_block_weights
from selma_toolkit.lora.merge import apply_block_weights, merge_record

# One module in every kind of group, the conv one flattened to [8, 4*3*3] by the merge.
SHAPES = {
    "unet.conv_in": (8, 4, 3, 3),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (12, 10),
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (12, 7),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v": (12, 10),
    "unet.up_blocks.1.resnets.0.conv1": (8, 4, 3, 3),
    "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0": (10, 12),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (10, 10),
    "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": (12, 10),
}
BLOCK_WEIGHTS = {"unet": 0.5, "in": 2.0, "in.1": -1.0, "mid": 0.0, "out.2": 3.0, "te": 0.25, "te2": 0.0}
# What BLOCK_WEIGHTS gives each module, read off by hand: the most specific listed group wins.
EXPECTED_G = {
    "unet.conv_in": 0.5,  # unet
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2.0,  # in (no in.0)
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": -1.0,  # in.1 over in
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v": 0.0,  # mid
    "unet.up_blocks.1.resnets.0.conv1": 0.5,  # no out / out.1: unet
    "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0": 3.0,  # out.2
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 0.25,  # te (no te1)
    "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": 0.0,  # te2 over te
}


def experts(rank: int = 3, count: int = 3):
    return [random_expert(70 + i, rank, float(2 + 3 * i), SHAPES) for i in range(count)]


def method_update(method: str, loras, name: str, weights, density: float = 0.5) -> np.ndarray:
    """The method's dense update of one module [out, in_flat], from the factors, without block weights."""
    parts = [factors(e.modules[name]) for e in loras]
    if method == "selma":
        a_m = sum(w * a for w, (_, a, _) in zip(weights, parts))
        b_m = sum(w * s * b for w, (b, _, s) in zip(weights, parts))
        return b_m @ a_m  # cross terms included
    updates = [update(e.modules[name]) for e in loras]
    if method == "delta":
        return sum(w * u for w, u in zip(weights, updates))
    if method == "svd":
        return best_rank_approximation(sum(w * u for w, u in zip(weights, updates)), 100)  # full rank
    assert method == "ties"
    return ties_reference(updates, weights, density)


@pytest.mark.parametrize("method", ["selma", "delta", "svd", "ties"])
def test_block_weight_multiplies_each_modules_merged_update_after_the_methods_formula(method):
    loras, weights = experts(), [0.5, 0.2, 0.6]
    options = {"rank": 12} if method in ("svd", "ties") else {}  # full rank: the dense rule is kept whole
    merged = merge_experts(loras, method, weights, block_weights=BLOCK_WEIGHTS, density=0.4, **options)
    assert set(merged.modules) == set(SHAPES)  # weight 0 keeps the keys
    for name, g in EXPECTED_G.items():
        expected = g * method_update(method, loras, name, weights, density=0.4)
        np.testing.assert_allclose(update(merged.modules[name]), expected, rtol=1e-9, atol=1e-9, err_msg=name)


def test_dare_block_weight_scales_the_same_masked_update():
    loras, weights = experts(), [0.4, 0.6, 0.3]
    plain = merge_experts(loras, "dare", weights, rank=12, seed=5)
    weighted = merge_experts(loras, "dare", weights, rank=12, seed=5, block_weights=BLOCK_WEIGHTS)
    for name, g in EXPECTED_G.items():
        np.testing.assert_allclose(
            update(weighted.modules[name]), g * update(plain.modules[name]), rtol=1e-9, atol=1e-9
        )


def test_block_weight_zero_removes_its_groups_effect_and_leaves_the_other_modules_bit_identical():
    loras = experts()
    plain = merge_experts(loras, "selma")
    cut = merge_experts(loras, "selma", block_weights={"te": 0, "in": 0})
    for name, module in cut.modules.items():
        if name.startswith(("text_encoder", "unet.down_blocks.")):
            assert not module.up.any() and update(module).max() == 0.0, name
            assert torch.equal(module.down, plain.modules[name].down)  # A kept: the merge can still be extended
        else:
            assert torch.equal(module.up, plain.modules[name].up) and torch.equal(module.down, plain.modules[name].down)


@pytest.mark.parametrize("method", ["selma", "delta", "svd", "ties", "dare"])
def test_block_weights_of_one_give_the_merge_without_block_weights_bit_for_bit(method):
    loras = experts()
    plain = merge_experts(loras, method)
    ones = merge_experts(loras, method, block_weights={"unet": 1, "te": 1.0})
    for name, module in plain.modules.items():
        assert torch.equal(ones.modules[name].up, module.up) and torch.equal(ones.modules[name].down, module.down)


def test_unknown_block_group_is_an_error_naming_it_and_listing_the_valid_groups():
    with pytest.raises(LoraFormatError) as raised:
        merge_experts(experts(), "selma", block_weights={"in": 1, "down": 0.5})
    message = str(raised.value)
    assert "block weight group 'down' is not a group" in message
    assert "valid groups: te, te1, te2, unet, in, in.N, mid, out, out.N" in message
    assert "the experts' modules are in te, te1, te2, unet, in, in.0, in.1, mid, out, out.1, out.2" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("in=1,mid", "'mid' is not GROUP=WEIGHT; expected pairs separated by commas, e.g. in=1,mid=0.5,out=1,te=0"),
        ("in=1,mid=half", "'half' (for mid) is not a number"),
        ("in=1,in=2", "group 'in' is given twice"),
        ("input=1", "block weight group 'input' is not a group; valid groups: te, te1, te2, unet, in, in.N"),
        ("in.01=1", "block weight group 'in.01' is not a group"),
        ("out=inf", "block weight out=inf: expected a finite number"),
    ],
)
def test_bad_block_weight_strings_name_the_fault(text, fragment):
    with pytest.raises(LoraFormatError, match=re.escape(fragment)):
        parse_block_weights(text)


def test_block_weight_string_reads_as_a_mapping_and_empty_means_none():
    assert parse_block_weights(" in = 1, mid=0.5 ,out.2=-1,te=0, ") == {"in": 1.0, "mid": 0.5, "out.2": -1.0, "te": 0.0}
    assert parse_block_weights("") is None and parse_block_weights("  ") is None and parse_block_weights(None) is None


def test_module_groups_follow_diffusers_block_names_most_specific_first():
    assert module_groups("unet.down_blocks.2.resnets.1.conv2") == ("in.2", "in", "unet")
    assert module_groups("unet.up_blocks.0.upsamplers.0.conv") == ("out.0", "out", "unet")
    assert module_groups("unet.mid_block.resnets.0.conv1") == ("mid", "unet")
    assert module_groups("unet.add_embedding.linear_1") == ("unet",)
    assert module_groups("text_encoder.text_model.encoder.layers.3.self_attn.v_proj") == ("te1", "te")
    assert module_groups("text_encoder_2.text_projection") == ("te2", "te")


def test_a_valid_group_that_no_module_is_in_only_warns(caplog):
    loras = [random_expert(80 + i, 2, 2.0) for i in range(2)]  # two mid_block modules only
    with caplog.at_level(logging.WARNING, logger="selma_toolkit.lora.merge"):
        merged = merge_experts(loras, "delta", block_weights={"te": 0, "out.3": 2, "mid": 0.5})
    assert "block weights for te, out.3 change nothing" in caplog.text
    plain = merge_experts(loras, "delta")
    for name, module in merged.modules.items():
        np.testing.assert_allclose(update(module), 0.5 * update(plain.modules[name]), rtol=1e-12, atol=1e-12)


def test_apply_block_weights_scales_one_loras_B_and_keeps_its_dtype():
    lora = random_expert(90, 2, 4.0, SHAPES, dtype=torch.float16)
    scaled = apply_block_weights(lora, BLOCK_WEIGHTS)
    for name, g in EXPECTED_G.items():
        module = scaled.modules[name]
        assert module.up.dtype == torch.float16 and module.alpha == 4.0
        assert torch.equal(module.down, lora.modules[name].down)
        np.testing.assert_allclose(
            module.up.double().numpy(), (lora.modules[name].up.float() * g).half().double().numpy()
        )
    assert apply_block_weights(lora, None) is lora


# ----------------------------------------------------------------------------------- files


def save(folder, loras):
    from selma_toolkit.lora import save_lora

    return [
        save_lora(e, folder / f"skill{i}.safetensors", metadata={"skill": f"skill{i}"}) for i, e in enumerate(loras)
    ]


def test_merge_files_applies_block_weights_and_records_them_in_the_metadata(tmp_path):
    from selma_toolkit.lora import inspect_lora, merge_files

    loras = [random_expert(100 + i, 3, 3.0, SHAPES, dtype=torch.float32) for i in range(2)]
    paths = save(tmp_path, loras)
    merge_files(paths, tmp_path / "merged.safetensors", "delta", block_weights=BLOCK_WEIGHTS)
    info = inspect_lora(tmp_path / "merged.safetensors")
    record = merge_record(info.weights)
    assert record["block_weights"] == BLOCK_WEIGHTS
    assert json.loads(info.file_metadata["selma.block_weights"]) == BLOCK_WEIGHTS
    for name, g in EXPECTED_G.items():
        expected = g * method_update("delta", loras, name, [0.5, 0.5])
        np.testing.assert_allclose(update(info.weights.modules[name]), expected, rtol=1e-5, atol=1e-6)
    plain = merge_files(paths, tmp_path / "plain.safetensors", "delta")
    assert merge_record(plain)["block_weights"] is None and "selma.block_weights" not in plain.metadata


@pytest.mark.parametrize("keep_old_files", [True, False])
def test_adding_an_expert_to_a_block_weighted_merge_gives_the_block_weighted_merge_of_all(tmp_path, keep_old_files):
    from selma_toolkit.lora import add_to_merge, load_lora, merge_files

    shapes = {name: shape for name, shape in SHAPES.items() if len(shape) == 2}
    loras = [random_expert(110 + i, 3, 2.0 + i, shapes, dtype=torch.float32) for i in range(3)]
    paths = save(tmp_path, loras)
    merged = tmp_path / "merged" / "selma.safetensors"
    merge_files(paths[:2], merged, "selma", block_weights=BLOCK_WEIGHTS)
    if not keep_old_files:  # the merge is then extended from its own factors
        for path in paths[:2]:
            path.rename(tmp_path / f"moved-{path.name}")
    result = add_to_merge(merged, [paths[2]], tmp_path / "added.safetensors")
    assert result.recomputed is keep_old_files
    assert merge_record(load_lora(tmp_path / "added.safetensors"))["block_weights"] == BLOCK_WEIGHTS
    for name in shapes:
        expected = EXPECTED_G[name] * method_update("selma", loras, name, [1 / 3] * 3)
        np.testing.assert_allclose(update(result.weights.modules[name]), expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_selma_merge_block_weights_option_gives_the_library_merge_and_is_refused_with_to(tmp_path, cli):
    from safetensors.torch import load_file

    from selma_toolkit.lora import merge_files

    loras = [random_expert(300 + i, 3, 3.0, SHAPES, dtype=torch.float32) for i in range(2)]
    paths = save(tmp_path, loras)
    result = cli(
        "merge",
        *map(str, paths),
        "--method",
        "delta",
        "--block-weights",
        "in=2,mid=0,te=0.25",
        "--out",
        str(tmp_path / "cli.safetensors"),
    )
    assert result.returncode == 0, result.stderr
    merge_files(paths, tmp_path / "lib.safetensors", "delta", block_weights={"in": 2.0, "mid": 0.0, "te": 0.25})
    from_cli, from_library = load_file(str(tmp_path / "cli.safetensors")), load_file(str(tmp_path / "lib.safetensors"))
    assert from_cli.keys() == from_library.keys()
    assert all(torch.equal(from_cli[k], from_library[k]) for k in from_cli)
    refused = cli("merge", "--add", str(paths[0]), "--to", str(tmp_path / "cli.safetensors"), "--block-weights", "in=1")
    assert (
        refused.returncode != 0 and "--block-weights" in refused.stderr and "keeps its merge settings" in refused.stderr
    )
    unknown = cli("merge", *map(str, paths), "--block-weights", "down=1", "--out", str(tmp_path / "x.safetensors"))
    assert unknown.returncode != 0 and "'down'" in unknown.stderr and not (tmp_path / "x.safetensors").exists()

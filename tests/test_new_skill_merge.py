"""Incremental merge (selma_toolkit.lora.incremental, `selma merge --add NEW --to MERGED`): the
result is the merge of the merged file's experts plus the new ones, checked bit for bit against a
from-scratch merge of the files and numerically against the paper's rule computed here in numpy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from selma_toolkit.cli.words import cli_message
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import LoraModule, LoraWeights, add_to_merge, load_lora, lora_metadata, merge_files, save_lora
from selma_toolkit.lora.merge import merge_record

SHAPES = {
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (12, 10),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (12, 7),
}
SKILLS = ("count", "color", "shape")


def expert(seed: int, alpha: float, rank: int = 3) -> LoraWeights:
    """Random A and B (alpha != rank, so the scale must be folded in) for each module of SHAPES."""
    generator = torch.Generator().manual_seed(seed)
    return LoraWeights(
        modules={
            name: LoraModule(
                torch.randn(rank, n_in, generator=generator), torch.randn(n_out, rank, generator=generator), alpha
            )
            for name, (n_out, n_in) in SHAPES.items()
        }
    )


@pytest.fixture
def experts(tmp_path):
    """Three expert files in tmp/experts (count, color, shape), alphas 1, 6, 2 at rank 3."""
    folder = tmp_path / "experts"
    return [
        save_lora(
            expert(i, alpha), folder / f"{skill}.safetensors", metadata=lora_metadata(skill=skill, architecture="sd1")
        )
        for i, (skill, alpha) in enumerate(zip(SKILLS, (1.0, 6.0, 2.0)))
    ]


def numpy_factors(path):
    """{module: (s*B, A)} of a LoRA file as float64 numpy arrays, read back through safetensors."""
    lora = load_lora(path)
    return {
        name: (m.up.double().numpy() * (m.alpha / m.rank), m.down.double().numpy()) for name, m in lora.modules.items()
    }


def paper_merge_update(paths):
    """The paper's rule computed here: B_m = mean_t s_t B_t, A_m = mean_t A_t; update B_m @ A_m."""
    parts = [numpy_factors(p) for p in paths]
    return {
        name: np.mean([f[name][0] for f in parts], axis=0) @ np.mean([f[name][1] for f in parts], axis=0)
        for name in SHAPES
    }


def dense_updates(path):
    return {name: up @ down for name, (up, down) in numpy_factors(path).items()}


def identical(first, second) -> bool:
    a, b = load_lora(first), load_lora(second)
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[n].down, b.modules[n].down) and torch.equal(a.modules[n].up, b.modules[n].up)
        for n in a.modules
    )


@pytest.mark.parametrize("method, rank", [("selma", None), ("delta", None), ("svd", 2), ("ties", 2), ("dare", 2)])
def test_adding_an_expert_gives_exactly_the_from_scratch_merge_of_all_of_them(experts, tmp_path, method, rank):
    old = tmp_path / "merged" / f"{method}.safetensors"
    merge_files(experts[:2], old, method, rank=rank, density=0.7, seed=3)
    result = add_to_merge(old, [experts[2]], tmp_path / "added.safetensors")
    scratch = tmp_path / "scratch.safetensors"
    merge_files(experts, scratch, method, rank=rank, density=0.7, seed=3)
    assert result.recomputed and identical(result.path, scratch)
    record = merge_record(load_lora(result.path))
    assert record["method"] == method and record["weights"] == pytest.approx([1 / 3] * 3)
    assert [(e["skill"], e["sha256"]) for e in record["experts"]] == [
        (s, sha256_file(p)) for s, p in zip(SKILLS, experts)
    ]
    assert [e["source"] for e in record["experts"]] == [f"experts/{s}.safetensors" for s in SKILLS]
    if method == "selma":
        for name, expected in paper_merge_update(experts).items():
            np.testing.assert_allclose(dense_updates(result.path)[name], expected, rtol=1e-5, atol=1e-6)


def test_without_the_expert_files_a_uniform_selma_or_delta_merge_is_extended_exactly_from_its_factors(
    experts, tmp_path
):
    for method in ("selma", "delta"):
        merge_files(experts[:2], tmp_path / method / "merged.safetensors", method)
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "experts"), str(moved))  # no listed expert can be found any more
    experts = [moved / p.name for p in experts]
    parts = [numpy_factors(p) for p in experts]
    expected = {
        "selma": paper_merge_update(experts),
        "delta": {name: sum(up @ down for up, down in (f[name] for f in parts)) / 3 for name in SHAPES},
    }
    for method in ("selma", "delta"):
        result = add_to_merge(
            tmp_path / method / "merged.safetensors", [experts[2]], tmp_path / method / "added.safetensors"
        )
        assert not result.recomputed and result.found == [None, None]
        for name, update in dense_updates(result.path).items():
            np.testing.assert_allclose(update, expected[method][name], rtol=1e-5, atol=1e-6)
        record = merge_record(load_lora(result.path))
        assert [e["sha256"] for e in record["experts"]] == [sha256_file(p) for p in experts]
        assert record["weights"] == pytest.approx([1 / 3] * 3)


def test_a_changed_file_is_not_taken_for_the_expert_its_record_lists(experts, tmp_path):
    merged = tmp_path / "merged" / "selma.safetensors"
    merge_files(experts[:2], merged, "selma")
    original = experts[0].read_bytes()
    save_lora(expert(99, 1.0), experts[0], metadata=lora_metadata(skill="count"))  # same name, other tensors
    result = add_to_merge(merged, [experts[2]], tmp_path / "added.safetensors")
    assert result.found == [None, experts[1]]
    assert not result.recomputed  # updated from the factors, so still the merge of the ORIGINAL count expert
    experts[0].write_bytes(original)
    for name, update in dense_updates(result.path).items():
        np.testing.assert_allclose(update, paper_merge_update(experts)[name], rtol=1e-5, atol=1e-6)


def test_a_moved_expert_given_with_expert_file_is_found_by_its_sha256(experts, tmp_path):
    merged = tmp_path / "merged" / "svd.safetensors"
    merge_files(experts[:2], merged, "svd", rank=2)
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(str(experts[0]), str(moved))
    with pytest.raises(LoraFormatError) as refused:
        add_to_merge(merged, [experts[2]], tmp_path / "added.safetensors")
    message = str(refused.value)
    assert (
        "1 of its 2 experts were not found" in message
        and f"count.safetensors (skill count, sha256 {sha256_file(moved)[:12]})" in message
    )
    assert "svd merge is not linear" in message and "Give the missing files with --expert" in cli_message(refused.value)
    result = add_to_merge(merged, [experts[2]], tmp_path / "added.safetensors", expert_files=[moved])
    scratch = merge_files([moved, *experts[1:]], tmp_path / "scratch.safetensors", "svd", rank=2)
    assert result.recomputed and result.found == [moved, experts[1]]
    assert all(torch.equal(result.weights.modules[n].up, scratch.modules[n].up) for n in SHAPES)


def test_weights_that_are_not_uniform_must_be_given_again_for_every_expert(experts, tmp_path):
    merged = tmp_path / "merged" / "delta.safetensors"
    merge_files(experts[:2], merged, "delta", [0.2, 0.8])
    with pytest.raises(LoraFormatError, match=r"merged with weights \[0.2, 0.8\], not uniformly") as refused:
        add_to_merge(merged, [experts[2]])
    assert cli_message(refused.value).endswith("Give --weights (e.g. 0.2,0.8,W).")
    with pytest.raises(LoraFormatError, match="got 2 for 3 experts"):
        add_to_merge(merged, [experts[2]], weights=[0.5, 0.5])
    result = add_to_merge(merged, [experts[2]], tmp_path / "added.safetensors", weights=[0.1, 0.6, 0.3])
    scratch = merge_files(experts, tmp_path / "scratch.safetensors", "delta", [0.1, 0.6, 0.3])
    assert result.recomputed and identical(result.path, tmp_path / "scratch.safetensors")
    assert merge_record(scratch)["weights"] == merge_record(result.weights)["weights"] == [0.1, 0.6, 0.3]
    # Without the old files, only weights proportional to the old ones (0.1 : 0.4 = 0.2 : 0.8) can go
    # through the merged factors; the result is the weighted sum of updates computed here.
    shutil.move(str(tmp_path / "experts"), str(tmp_path / "moved"))
    experts = [tmp_path / "moved" / p.name for p in experts]
    with pytest.raises(LoraFormatError, match="not proportional to the ones they were merged with"):
        add_to_merge(merged, [experts[2]], tmp_path / "refused.safetensors", weights=[0.1, 0.6, 0.3])
    result = add_to_merge(merged, [experts[2]], tmp_path / "scaled.safetensors", weights=[0.1, 0.4, 0.5])
    assert not result.recomputed
    parts = [numpy_factors(p) for p in experts]
    for name, update in dense_updates(result.path).items():
        expected = sum(w * up @ down for w, (up, down) in zip([0.1, 0.4, 0.5], (f[name] for f in parts)))
        np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-6)


def test_an_expert_already_in_the_merge_or_a_file_without_a_record_is_refused(experts, tmp_path):
    merged = tmp_path / "merged" / "selma.safetensors"
    merge_files(experts[:2], merged, "selma")
    with pytest.raises(LoraFormatError, match="already one of the experts"):
        add_to_merge(merged, [experts[1]])
    with pytest.raises(LoraFormatError, match=r"has no merge record.*Run `selma merge EXPERT"):
        add_to_merge(experts[0], [experts[2]])


def test_cli_merge_add_to_replaces_the_merged_file_with_the_merge_of_all_experts(experts, tmp_path, cli):
    merged = tmp_path / "merged" / "selma.safetensors"
    merge_files(experts[:2], merged, "selma")
    result = cli("merge", "--add", str(experts[2]), "--to", str(merged), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "every listed expert found and verified" in result.stdout
    assert all(f"{skill}.safetensors" in result.stdout for skill in SKILLS)
    merge_files(experts, tmp_path / "scratch.safetensors", "selma")
    assert identical(merged, tmp_path / "scratch.safetensors")
    assert json.loads(load_lora(merged).metadata["selma.skills"]) == list(SKILLS)
    refused = cli("merge", "--add", str(experts[2]), "--to", str(merged), "--method", "svd")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--method: adding to" in refused.stderr and "keeps its merge settings" in refused.stderr

"""Teaching one more skill on the tiny model: a run recipe listing two existing experts (one a local
file, one served by a local Hub mirror) and one new grammar-sourced skill trains exactly one new
expert and merges all three; the incremental merge equals a from-scratch merge; a misfit expert
stops the run before any work; `selma evaluate --before` compares the merges before and after.

One small run of two skills makes the existing experts (the "old" run); the new run is started
through the CLI as a user would, against olah on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import LoraModule, LoraWeights, add_to_merge, load_lora, lora_metadata, merge_files, save_lora
from selma_toolkit.lora.merge import merge_record
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_folder, load_run_recipe
from selma_toolkit.run import run_pipeline

HUB_REPO = "selma-tests/color-grammar-tiny"
NEW, OLD = "shape-count", ("count-grammar", "color-grammar")
SMALL = """
[images]
resolution = 32
steps = 2
batch_size = 4

[train]
rank = 4
alpha = 4
learning_rate = 1e-3
batch_size = 4
steps = 4
checkpoint_every = 4

[evaluate]
prompts_per_skill = 2
scorers = ["clipscore"]
clip_model = "tiny:clip"
bootstrap_samples = 200
"""


def new_skill_file(folder):
    from selma_toolkit.skill_new import new_skill_recipe

    return new_skill_recipe(
        NEW,
        folder / f"{NEW}.toml",
        source="grammar",
        overrides=[
            "description=Counting simple shapes.",
            'seeds=["two circles", "three squares", "a photo of two stars"]',
            'grammar.templates=["{count} {color} {shape}s"]',
            'grammar.words.shape=["circle", "square", "star", "heart"]',
            "num_prompts=4",
        ],
    ).path


@pytest.fixture(scope="module")
def added(tmp_path_factory):
    """The old run (two skills, in process), its color expert published on olah, then `selma run`
    of a recipe with the new skill, the old count expert by path and the color expert by repo id."""
    from support_hub import OlahHub, commit_files, init_repo

    root = tmp_path_factory.mktemp("new-skill")
    (root / "old.toml").write_text(
        f'name = "old"\nbase_model = "tiny:sd1"\nskills = [{{ recipe = "count-grammar", '
        f'num_prompts = 4 }}, {{ recipe = "color-grammar", num_prompts = 4 }}]\n{SMALL}'
    )
    old = run_pipeline(load_run_recipe(root / "old.toml"), RunPaths(root / "runs" / "old"))
    hub = OlahHub(root / "hub").start()
    try:
        commit_files(
            init_repo(hub.mirrors, HUB_REPO), {"color-grammar.safetensors": old.experts[1][1].read_bytes()}, "publish"
        )
        new_skill_file(root)
        (root / "new.toml").write_text(
            f'name = "new"\nbase_model = "tiny:sd1"\nskills = ["{NEW}.toml"]\n'
            f'experts = ["runs/old/experts/count-grammar.safetensors", "{HUB_REPO}"]\n{SMALL}'
        )
        result = run_cli("run", "new.toml", cwd=root, env={"HF_ENDPOINT": hub.endpoint})
        yield {
            "root": root,
            "old": RunPaths(root / "runs" / "old"),
            "new": RunPaths(root / "runs" / "new"),
            "result": result,
        }
    finally:
        hub.stop()


def test_a_run_with_two_listed_experts_and_a_new_skill_trains_only_the_new_expert_and_merges_all_three(added):
    result, old, new = added["result"], added["old"], added["new"]
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (new.root / "skills").iterdir()) == [NEW]  # prompts, images, training: new skill only
    assert sorted(p.name for p in (new.root / "experts").iterdir()) == [f"{NEW}.safetensors"]
    assert f"train {NEW}" in result.stderr and not any(f"train {skill}" in result.stderr for skill in OLD)
    record = merge_record(load_lora(new.merged("selma")))
    assert [e["skill"] for e in record["experts"]] == [NEW, *OLD]
    # The Hub expert is the old run's color expert, byte for byte (pulled through the HF cache).
    assert [e["sha256"] for e in record["experts"]] == [
        sha256_file(p) for p in (new.expert(NEW), *map(old.expert, OLD))
    ]
    assert json.loads(load_lora(new.merged("selma")).metadata["selma.skills"]) == [NEW, *OLD]


def test_incremental_merge_of_the_new_expert_equals_a_from_scratch_merge_of_the_three(added, tmp_path):
    old, new = added["old"], added["new"]
    result = add_to_merge(old.merged("selma"), [new.expert(NEW)], tmp_path / "added.safetensors")
    assert result.recomputed and result.found == [old.expert(s) for s in OLD]
    scratch = merge_files([*map(old.expert, OLD), new.expert(NEW)], tmp_path / "scratch.safetensors", "selma")
    incremental = load_lora(result.path)
    for name, module in scratch.modules.items():
        assert torch.equal(incremental.modules[name].down, module.down) and torch.equal(
            incremental.modules[name].up, module.up
        )
    # The run merged the same three in another order (new skill first): the same update up to rounding.
    run_merge = load_lora(new.merged("selma"))
    assert run_merge.modules.keys() == incremental.modules.keys()
    for name, module in incremental.modules.items():
        torch.testing.assert_close(
            run_merge.modules[name].delta(torch.float64), module.delta(torch.float64), rtol=1e-5, atol=1e-7
        )


def random_lora(layers: dict, names: list[str], rank: int, seed: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    return LoraWeights(
        modules={
            name: LoraModule(
                torch.randn(rank, layers[name][1], generator=generator),
                torch.randn(layers[name][0], rank, generator=generator),
                float(rank),
            )
            for name in names
        }
    )


def test_an_expert_for_another_architecture_or_model_size_stops_the_run_before_any_work(tmp_path, cli):
    from selma_toolkit.expert_fit import base_layer_shapes

    sdxl = base_layer_shapes("tiny:sdxl")
    other_arch = save_lora(
        random_lora(sdxl, [n for n in sdxl if n.endswith("attn1.to_q")], 4, 0),
        tmp_path / "sdxl.safetensors",
        metadata=lora_metadata(architecture="sdxl", skill="sdxl-skill"),
    )
    sd1 = base_layer_shapes("tiny:sd1")
    # The module names of the tiny SD 1.x model with the layer sizes of SD 1.5 (cross-attention 768).
    full_size = {
        n: (320, 768) for n in sd1 if n.startswith("unet.down_blocks.0") and n.endswith(("attn2.to_k", "attn2.to_v"))
    }
    other_size = save_lora(
        random_lora(full_size, list(full_size), 4, 1),
        tmp_path / "sd15.safetensors",
        metadata=lora_metadata(skill="sd15-skill"),
    )
    new_skill_file(tmp_path)
    for expert, message in [
        (other_arch, r"sdxl\.safetensors.* is a LoRA for sdxl, but base_model 'tiny:sd1' is sd1"),
        (
            other_size,
            (
                r"(?s)sd15\.safetensors.*does not fit base_model 'tiny:sd1'.*attn2\.to_k: adapts a "
                r"layer of shape \[320, 768\], the base model's is \[32, 32\]"
            ),
        ),
    ]:
        recipe = tmp_path / "run.toml"
        recipe.write_text(
            f'name = "r"\nbase_model = "tiny:sd1"\nskills = ["{NEW}.toml"]\nexperts = ["{expert}"]\n{SMALL}'
        )
        with pytest.raises(LoraFormatError, match=message):
            run_pipeline(load_run_recipe(recipe), RunPaths(tmp_path / "out"))
        assert not (tmp_path / "out").exists()  # not even the recipe was written: no prompt, image or expert
    result = cli("run", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "does not fit base_model 'tiny:sd1'" in result.stderr
        and "list only experts trained for this base model" in result.stderr
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def compared(added):
    """`selma evaluate RUN --before PREVIOUS`'s comparison of the new run with the old one."""
    from selma_toolkit.evaluate.before_after import compare_before_after

    run, paths = load_run_folder(added["new"].root)
    return compare_before_after(run, paths, added["old"].root)


def test_before_after_compares_the_merges_on_the_new_and_the_old_skills_prompts(added, compared):
    from selma_toolkit.dataset import read_prompts

    old, new, comparison = added["old"], added["new"], compared
    assert comparison.before == old.merged("selma") and comparison.after == new.merged("selma")
    assert {(c.skill, c.kind) for c in comparison.changes} == {(NEW, "new"), *((s, "old") for s in OLD)}
    items = json.loads((comparison.folder / "scores.json").read_text())["items"]
    # Held-out prompts only: the new skill's from the new run, the old skills' from the old run.
    for skill, paths in [(NEW, new), *((s, old) for s in OLD)]:
        heldout = {p.id: p.prompt for p in read_prompts(paths.prompts(skill), split="heldout")}
        for variant in ("before", "after"):
            assert {
                (i["prompt_id"], i["prompt"]) for i in items if i["skill"] == skill and i["variant"] == variant
            } == set(heldout.items())
    # The new skill's after images are the run evaluation's own, not drawn again.
    after_new = [i["image"] for i in items if i["variant"] == "after" and i["skill"] == NEW]
    assert after_new and all(
        image.startswith(str((new.eval_dir / "images" / "merged-selma" / NEW).resolve())) for image in after_new
    )
    # Every number, recomputed here from the per-image scores.
    recorded = json.loads((comparison.folder / "comparison.json").read_text())["changes"]
    for change in recorded:
        pairs = {}
        for item in items:
            if item["skill"] == change["skill"]:
                pairs.setdefault((item["prompt_id"], item["seed"]), {})[item["variant"]] = item["scores"][
                    change["metric"]
                ]
        before = np.array([p["before"] for p in pairs.values()])
        after = np.array([p["after"] for p in pairs.values()])
        assert change["before"] == pytest.approx(before.mean()) and change["after"] == pytest.approx(after.mean())
        interval = change["change"]
        assert interval["mean"] == pytest.approx((after - before).mean()) and interval["n"] == len(pairs) == 2
        assert interval["low"] <= interval["mean"] <= interval["high"]
        expected = "gained" if interval["low"] > 0 else "lost" if interval["high"] < 0 else "no clear change"
        assert change["verdict"] == expected
    text = (comparison.folder / "comparison.md").read_text()
    assert "Gained:" in text and "Lost:" in text and comparison.report.is_file()


def test_before_images_are_drawn_with_the_merged_lora_from_before(added, compared):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from selma_toolkit.images import image_seed
    from selma_toolkit.models import resolve_model

    old, folder = added["old"], compared.folder
    item = next(
        i
        for i in json.loads((folder / "scores.json").read_text())["items"]
        if i["variant"] == "before" and i["skill"] == OLD[0]
    )
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model("tiny:sd1"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(old.merged("selma")))
    redrawn = pipe(
        item["prompt"],
        num_inference_steps=2,
        guidance_scale=7.5,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(image_seed(item["seed"], item["prompt_id"])),
    ).images[0]
    stored = np.asarray(Image.open(folder / item["image"]), dtype=np.float32) / 255
    assert np.abs(redrawn - stored).max() <= 2 / 255

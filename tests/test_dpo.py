"""The DPO variant (paper Table 4): the Diffusion-DPO loss equals a direct computation, the winner
of each pair is the image the scorer prefers and ties are dropped, both images of a pair share
the timestep and the noise, the reference is the base without the LoRA, the first step's loss is
log 2 (model = reference), resume equals an uninterrupted run, and [dpo] settings are validated."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selma_toolkit.errors import DatasetError, RecipeError
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import RunRecipe
from selma_toolkit.train import dpo


def test_dpo_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    model_w, model_l, ref_w, ref_l = (torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 7.5
    got = dpo.dpo_loss(model_w, model_l, ref_w, ref_l, beta).item()
    terms = []
    for mw, ml, rw, rl in zip(model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist()):
        z = -beta / 2 * ((mw - rw) - (ml - rl))
        terms.append(-math.log(1.0 / (1.0 + math.exp(-z))))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_dpo_loss_is_log2_at_the_reference_and_falls_when_the_winner_is_fitted_better():
    ref_w, ref_l = torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.6])
    assert dpo.dpo_loss(ref_w, ref_l, ref_w, ref_l, 100.0).item() == pytest.approx(math.log(2))
    assert dpo.dpo_loss(ref_w - 0.01, ref_l, ref_w, ref_l, 100.0).item() < math.log(2)
    assert dpo.dpo_loss(ref_w, ref_l - 0.01, ref_w, ref_l, 100.0).item() > math.log(2)


def test_pair_up_makes_the_preferred_image_the_winner_and_drops_ties_and_unscored_images():
    images = [Path(f"{i}.png") for i in range(8)]
    pairs = dpo.pair_up(3, "two red cubes", images, [0.2, 0.9, 0.7, 0.1, 0.5, 0.5, None, 1.0])
    assert [(p.winner.name, p.loser.name) for p in pairs] == [("1.png", "0.png"), ("2.png", "3.png")]
    assert all(p.winner_score > p.loser_score and p.prompt_id == 3 for p in pairs)


def test_pair_draws_share_timestep_and_noise_within_a_pair_only():
    draws = dpo.pair_draws([torch.Generator().manual_seed(s) for s in (1, 2)], (4, 2, 2), 1000)
    assert torch.equal(draws.timesteps[:2], draws.timesteps[2:])
    assert torch.equal(draws.noise[:2], draws.noise[2:])
    assert not torch.equal(draws.noise[0], draws.noise[1])
    assert not torch.equal(draws.latent_noise[:2], draws.latent_noise[2:])  # each image its own latent sample


def test_reference_model_is_the_base_without_the_lora_and_gradients_come_back(tiny_model_dirs):
    from selma_toolkit.recipe import TrainSettings
    from selma_toolkit.train import model as parts

    model_dir = tiny_model_dirs["sd1"]
    from selma_toolkit.architectures import get_family

    base = parts.load_denoiser(model_dir, get_family("sd1"), torch.float32)
    unet = parts.load_denoiser(model_dir, get_family("sd1"), torch.float32)
    parts.add_lora(unet, "unet", TrainSettings(rank=2))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    g = torch.Generator().manual_seed(0)
    sample, text = (
        torch.randn(1, 4, 4, 4, generator=g),
        torch.randn(1, 77, base.config.cross_attention_dim, generator=g),
    )
    want = base(sample, 10, encoder_hidden_states=text).sample
    with torch.no_grad(), dpo.reference_model(unet):
        assert torch.allclose(unet(sample, 10, encoder_hidden_states=text).sample, want, atol=1e-6)
    assert not torch.allclose(unet(sample, 10, encoder_hidden_states=text).sample, want, atol=1e-3)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------ pairs and training (tiny SD1)


def write_prompts(path: Path, skill: str, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"id": i, "skill": skill, "prompt": t, "split": "train"}) + "\n" for i, t in enumerate(texts)
        )
    )


def tiny_run(model: Path, images: dict | None = None, clip_model: str = "tiny:clip", **dpo_settings) -> RunRecipe:
    return RunRecipe.model_validate(
        {
            "name": "t",
            "base_model": str(model),
            "skills": [{"name": "count", "seeds": ["a", "b", "c"], "instruction": "x"}],
            "images": {"resolution": 32, "steps": 2, "batch_size": 4, **(images or {})},
            "train": {"rank": 4, "batch_size": 2, "steps": 2, "checkpoint_every": 2},
            "evaluate": {"scorers": ["clipscore"], "clip_model": clip_model},
            "dpo": {
                "steps": 2,
                "checkpoint_every": 2,
                "learning_rate": 1e-3,
                "beta": 500.0,
                "pairs_per_prompt": 2,
                **dpo_settings,
            },
        }
    )


class Brightness:
    """A scorer that prefers brighter images (so the test knows the right winner without a model)."""

    name, label, model_id, description = "brightness", "Brightness", "-", "mean pixel value"

    def score(self, images, prompts):
        return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


@pytest.fixture
def brightness(monkeypatch):
    monkeypatch.setattr(dpo, "build_scorer", lambda name, settings, device=None: Brightness())


@pytest.fixture(scope="module")
def pair_run(tiny_model_dirs, tmp_path_factory):
    """A run folder with 3 train prompts of one skill (the pair images are drawn by the tests)."""
    paths = RunPaths(tmp_path_factory.mktemp("dpo") / "run")
    write_prompts(paths.prompts("count"), "count", ["one red cube", "two blue balls", "three green cones"])
    return paths


def test_winner_of_every_pair_is_the_image_the_scorer_prefers(tiny_model_dirs, pair_run, brightness):
    run = tiny_run(tiny_model_dirs["sd1"])
    pairs = dpo.preference_pairs(run, "count", pair_run)
    assert pairs and len(pairs) <= 3 * 2
    for pair in pairs:
        with Image.open(pair.winner) as w, Image.open(pair.loser) as lose:
            assert np.asarray(w, dtype=np.float64).mean() > np.asarray(lose, dtype=np.float64).mean()
        assert pair.winner.parent == pair.loser.parent and pair.winner != pair.loser
    seeds = {int(p.stem.split("seed")[1]) for pair in pairs for p in (pair.winner, pair.loser)}
    assert seeds <= set(dpo.pair_seeds(run)) and run.images.seed not in seeds  # not the dataset's own seed
    recorded = [
        json.loads(line)
        for line in (dpo.dpo_paths(pair_run).skill_dir("count") / "pairs.jsonl").read_text().splitlines()
    ]
    assert [(r["prompt_id"], r["winner_score"]) for r in recorded] == [(p.prompt_id, p.winner_score) for p in pairs]
    scored = (dpo.dpo_paths(pair_run).skill_dir("count") / "scores.jsonl").read_text().splitlines()
    assert len(scored) == 3 * 4  # every image scored once; a second call reuses the scores
    dpo.preference_pairs(run, "count", pair_run)
    assert len((dpo.dpo_paths(pair_run).skill_dir("count") / "scores.jsonl").read_text().splitlines()) == 12


def test_judge_picks_the_pairs_with_the_images_judge_model_not_the_evaluation_one(tiny_model_dirs, tmp_path):
    from selma_toolkit.config.evaluate import EvaluateSettings
    from selma_toolkit.evaluate.scorers import build_scorer

    paths = RunPaths(tmp_path / "run")
    write_prompts(paths.prompts("count"), "count", ["one red cube", "two blue balls"])
    # The evaluation's CLIP does not exist: only the images section's judge may be loaded.
    run = tiny_run(
        tiny_model_dirs["sd1"],
        images={"judge": "clipscore", "judge_model": "tiny:clip"},
        clip_model="no-such/clip",
        scorer="judge",
        pairs_per_prompt=1,
    )
    pairs = dpo.preference_pairs(run, "count", paths)
    rows = [
        json.loads(line) for line in (dpo.dpo_paths(paths).skill_dir("count") / "scores.jsonl").read_text().splitlines()
    ]
    assert {(row["scorer"], row["model"]) for row in rows} == {("clipscore", "tiny:clip")}
    judge = build_scorer("clipscore", EvaluateSettings(clip_model="tiny:clip"))
    for pair in pairs:
        with Image.open(pair.winner) as win, Image.open(pair.loser) as lose:
            winner, loser = judge.score([win.convert("RGB"), lose.convert("RGB")], [pair.text] * 2)
        assert winner > loser
    assert dpo.scorer_label(run) == "judge:clipscore(tiny:clip)"


def test_all_ties_is_a_clear_error(tiny_model_dirs, pair_run, monkeypatch):
    class Flat(Brightness):
        name = "flat"

        def score(self, images, prompts):
            return [50.0] * len(images)

    monkeypatch.setattr(dpo, "build_scorer", lambda name, settings, device=None: Flat())
    with pytest.raises(DatasetError, match="every preference pair of count is a tie"):
        dpo.train_dpo_expert(tiny_run(tiny_model_dirs["sd1"]), "count", pair_run)


def test_first_step_loss_is_log2_and_resume_equals_an_uninterrupted_run(
    tiny_model_dirs, pair_run, tmp_path, brightness
):
    from safetensors.torch import load_file

    model = tiny_model_dirs["sd1"]

    def fresh(name: str) -> RunPaths:
        paths = RunPaths(tmp_path / name)
        shutil.copytree(pair_run.root, paths.root, ignore=shutil.ignore_patterns("train", "experts"))
        return paths

    resumed = fresh("resumed")
    dpo.train_dpo_expert(tiny_run(model, steps=2), "count", resumed)  # stopped at step 2
    first = json.loads((dpo.dpo_paths(resumed).train_dir("count") / "loss.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at 0: model = reference
    dpo.train_dpo_expert(tiny_run(model, steps=4), "count", resumed)
    whole = fresh("whole")
    dpo.train_dpo_expert(tiny_run(model, steps=4), "count", whole)
    a = load_file(str(dpo.dpo_paths(resumed).expert("count")))
    b = load_file(str(dpo.dpo_paths(whole).expert("count")))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "up" in k)  # the LoRA learned something
    from selma_toolkit.lora import load_lora

    assert load_lora(dpo.dpo_paths(whole).expert("count")).metadata["selma.training"] == "diffusion-dpo"
    with pytest.raises(RecipeError, match="dpo.beta: 500.0 -> 50.0"):
        dpo.train_dpo_expert(tiny_run(model, steps=4, beta=50.0), "count", whole)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.scorer=nosuch", "dpo.scorer"),
        ("dpo.pairs_per_prompt=0", "dpo.pairs_per_prompt"),
        ("moe.gate=router", "moe.gate"),
        ("moe.learning_rate=-1", "moe.learning_rate"),
    ],
)
def test_bad_dpo_and_moe_settings_are_refused_by_name(override, message):
    from selma_toolkit.recipe import load_run_recipe

    with pytest.raises(RecipeError, match=message):
        load_run_recipe("tiny-demo", [override])


def test_study_kinds_dpo_and_moe_are_scored_and_compared_with_the_merges_with_paired_intervals(tmp_path):
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.study import StudyOptions, run_study

    run = load_run_recipe(
        "toy-study",
        [
            "skills.toy-count.num_prompts=3",
            "skills.toy-color.num_prompts=3",
            "skills.toy-spatial.num_prompts=3",
            "images.steps=3",
            "train.steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=2",
            "evaluate.prompts_per_skill=2",
            "evaluate.seeds=[5]",
            "evaluate.report_prompts_per_skill=1",
            "dpo.steps=2",
            "dpo.batch_size=2",
            "dpo.pairs_per_prompt=3",
            "moe.steps=2",
            "moe.batch_size=2",
        ],
    )
    run_study(run, tmp_path, StudyOptions(kinds=("selma", "dpo", "moe")))
    replicate = tmp_path / "seed-5"
    variants = set(json.loads((replicate / "eval" / "scores.json").read_text())["variants"])
    skills = ["toy-count", "toy-color", "toy-spatial"]
    dpo_experts = {s for s in skills if (replicate / "selma" / "dpo" / "experts" / f"{s}.safetensors").is_file()}
    assert dpo_experts == set(skills)  # with 3 pairs a prompt, every skill has a pair that is no tie
    assert {"moe", "dpo", "merged:selma"} | {f"dpo-expert:{s}" for s in skills} <= variants
    assert not (tmp_path / "seed-5" / "dpo").exists() and not (tmp_path / "seed-5" / "moe").exists()
    summary = json.loads((tmp_path / "study.json").read_text())
    assert "moe" in summary["kinds"] and set(summary["gains"]["moe"]) == set(skills)
    versus = summary["table4_vs_merged"]["moe - merged:selma"]
    assert set(versus) == set(skills) and all(
        v["low"] <= v["mean"] <= v["high"] and v["n"] == 2 for v in versus.values()
    )
    # the paired difference is the mean over the same (seed, prompt) items of moe minus merged
    cells = {}
    for item in json.loads((replicate / "eval" / "scores.json").read_text())["items"]:
        cells[(item["variant"], item["skill"], item["prompt_id"])] = item["scores"]["toyworld"]
    for skill, stats in versus.items():
        ids = {p for (v, s, p) in cells if v == "moe" and s == skill}
        direct = sum(cells[("moe", skill, p)] - cells[("merged:selma", skill, p)] for p in ids) / len(ids)
        assert stats["mean"] == pytest.approx(direct)
    assert "## Table 4 baselines minus the merged experts (paired)" in (tmp_path / "study.md").read_text()

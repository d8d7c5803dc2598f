"""The toy base model: pretraining from a seed (reproducible, resumable), the shipped `toy:shapes`
pipeline, and a reduced study that checks the machinery (not the gains)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from selma_toolkit.toyworld.pretrain import PretrainSettings, pretrain
from selma_toolkit.toyworld.snapshots import export_base

TINY = dict(vae_steps=2, vae_batch_size=4, steps=4, batch_size=4, checkpoint_every=2, eval_every=0, warmup_steps=1)


def _same(a, b) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_pretraining_reproduces_from_its_seed_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = pretrain(tmp_path / "whole", PretrainSettings(**TINY))
    again = pretrain(tmp_path / "again", PretrainSettings(**TINY))
    assert _same(whole, again)
    # Stopped after 2 of 4 steps (as a kill after the checkpoint would leave it), then resumed.
    pretrain(tmp_path / "resumed", PretrainSettings(**{**TINY, "steps": 2}))
    resumed = pretrain(tmp_path / "resumed", PretrainSettings(**TINY))
    assert _same(whole, resumed)
    other = pretrain(tmp_path / "other", PretrainSettings(**{**TINY, "seed": 1}))
    assert not _same(whole, other)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4]


def test_web_caption_pretraining_resumes_bit_exact_and_exports_its_own_tokenizer(tmp_path):
    """toy:shapes-web's recipe: web captions, the VAE of toy:shapes reused (stage 1 skipped)."""
    from selma_toolkit.models import load_pipeline
    from selma_toolkit.toyworld.model import BASE_DIR

    web = {**TINY, "captions": "web", "vae_from": "toy:shapes"}
    whole = pretrain(tmp_path / "whole", PretrainSettings(**web))
    pretrain(tmp_path / "resumed", PretrainSettings(**{**web, "steps": 2}))
    resumed = pretrain(tmp_path / "resumed", PretrainSettings(**web))
    assert _same(whole, resumed)
    assert not _same(whole, pretrain(tmp_path / "explicit", PretrainSettings(**{**TINY, "vae_from": "toy:shapes"})))
    # The VAE is toy:shapes' own, so both bases share one latent space.
    shipped = load_file(str(BASE_DIR / "vae" / "diffusion_pytorch_model.safetensors"))
    copied = load_file(str(tmp_path / "whole" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(shipped[k].float(), copied[k]) for k in shipped)
    target = export_base(tmp_path / "whole", whole, tmp_path / "base")
    pipe = load_pipeline(str(target), device="cpu")
    assert len(pipe.tokenizer("a picture of two discs on black").input_ids) == 9  # each web word one token
    assert json.loads((target / "toyworld.json").read_text())["settings"]["captions"] == "web"
    assert "--captions web" in json.loads((target / "toyworld.json").read_text())["rebuild"][0]


def test_provenance_rebuilds_a_run_resumed_with_another_thread_count_exactly(tmp_path):
    from selma_toolkit.toyworld.snapshots import provenance

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pretrain(tmp_path / "run", PretrainSettings(**{**TINY, "steps": 2}))
        torch.set_num_threads(2)
        snapshot = pretrain(tmp_path / "run", PretrainSettings(**TINY))
        record = provenance(tmp_path / "run", snapshot)
        assert record["threads_history"] == [[0, 1], [2, 2]]
        first, second, export = record["rebuild"]
        assert "--steps 2 " in first and first.endswith("--threads 1")
        assert "--steps 4 " in second and second.endswith("--threads 2") and export.startswith("selma toyworld export")
        # Following the two commands (here as library calls) gives the same weights.
        torch.set_num_threads(1)
        pretrain(tmp_path / "again", PretrainSettings(**{**TINY, "steps": 2}))
        torch.set_num_threads(2)
        assert _same(snapshot, pretrain(tmp_path / "again", PretrainSettings(**TINY)))
    finally:
        torch.set_num_threads(before)


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(tmp_path):
    whole = pretrain(tmp_path / "whole", PretrainSettings(**TINY))
    pretrain(tmp_path / "cut", PretrainSettings(**{**TINY, "steps": 2}))
    # What a kill leaves after `checkpoint` became `.checkpoint.old` and before the new one took its name.
    (tmp_path / "cut" / "checkpoint").rename(tmp_path / "cut" / ".checkpoint.old")
    resumed = pretrain(tmp_path / "cut", PretrainSettings(**TINY))
    assert _same(whole, resumed)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "unet"] == [1, 2, 3, 4]  # steps 1-2 were not trained again


def test_resume_with_other_settings_is_refused_naming_the_change(tmp_path):
    from selma_toolkit.errors import TrainingError

    pretrain(tmp_path, PretrainSettings(**{**TINY, "steps": 2}))
    with pytest.raises(TrainingError, match="learning_rate"):
        pretrain(tmp_path, PretrainSettings(**{**TINY, "learning_rate": 1e-3}))


def test_exported_snapshot_is_a_stable_diffusion_pipeline_every_stage_can_load(tmp_path):
    from diffusers import StableDiffusionPipeline

    from selma_toolkit.models import detect_architecture, load_pipeline

    snapshot = pretrain(tmp_path / "run", PretrainSettings(**{**TINY, "steps": 2}))
    target = export_base(tmp_path / "run", snapshot, tmp_path / "base")
    assert detect_architecture(str(target)) == "sd1"
    pipe = load_pipeline(str(target), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    image = pipe("two red circles", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.mark.parametrize("spec", ["toy:shapes", "toy:shapes-web"])
def test_shipped_toy_base_generates_shapes_world_images(spec):
    from selma_toolkit.models import load_pipeline, resolve_model
    from selma_toolkit.toyworld.model import TOY_BASES

    assert resolve_model(spec) == str(TOY_BASES[spec])
    provenance = json.loads((TOY_BASES[spec] / "toyworld.json").read_text())
    assert provenance["settings"]["seed"] == 0
    assert provenance["settings"].get("captions", "explicit") == ("web" if spec.endswith("-web") else "explicit")
    pipe = load_pipeline(spec, device="cpu")
    images = pipe(
        ["three red circles"] * 2,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    ).images
    assert [image.size for image in images] == [(32, 32)] * 2


def test_reduced_study_writes_every_variant_report_and_summary(tmp_path):
    from selma_toolkit.lora import load_lora, metadata_value
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.scorer import score_image
    from selma_toolkit.toyworld.study import StudyOptions, run_study
    from selma_toolkit.toyworld.study_kinds import EXPERT_PREFIX, KINDS

    run = load_run_recipe(
        "toy-study",
        [
            "skills.toy-count.num_prompts=4",
            "skills.toy-color.num_prompts=4",
            "skills.toy-spatial.num_prompts=4",
            "images.steps=3",
            "train.steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=2",
            "evaluate.prompts_per_skill=2",
            "evaluate.seeds=[5]",
            "evaluate.report_prompts_per_skill=1",
            "images.judge=clipscore",
            "images.judge_model=tiny:clip",
        ],
    )
    kinds = tuple(kind for kind in KINDS if kind != "bon8")  # bon8 is bon4 with more candidates
    options = StudyOptions(
        kinds=kinds,
        merge_kinds=("selma", "bon4"),
        guidances=(1.0, 16.0),
        filter_min_score=0.0,
        filter_candidates=2,
        teacher="tiny:sd1",
    )
    summary_path = run_study(run, tmp_path, options)
    replicate = tmp_path / "seed-5"
    scores = json.loads((replicate / "eval" / "scores.json").read_text())
    skills = ["toy-count", "toy-color", "toy-spatial"]
    # The per-question filter keeps only images whose key questions are right: none of these
    # 3-step images may pass, and then that expert is left out (recorded as 0 images), not the study.
    record = json.loads((replicate / "replicate.json").read_text())
    keyq = [s for s in skills if record["train_images"]["keyq"][s] > 0]
    prefixes = [EXPERT_PREFIX[kind] for kind in kinds]
    on_all = {
        "base",
        "base-cfg1",
        "base-cfg16",
        "joint",
        "merged:selma",
        "merged:delta",
        "bon4-joint",
        "bon4-merged:selma",
        "bon4-merged:delta",
    }
    expected = on_all | {f"{prefix}:{s}" for prefix in prefixes for s in skills if prefix != "keyq-expert" or s in keyq}
    assert set(scores["variants"]) == expected
    # Experts on their own skill, everything else on all three: 2 prompts x 1 seed each.
    assert len(scores["items"]) == 2 * (len(on_all) * 3 + (len(prefixes) - 1) * 3 + len(keyq))
    assert all(item["scores"]["toyworld"] is not None for item in scores["items"])
    assert (replicate / "report" / "index.html").is_file()
    merged = load_lora(replicate / "selma" / "merged" / "selma.safetensors")
    assert "toy-count.safetensors" in metadata_value(merged, "selma.merge")
    # Ground-truth training data are renders that score 100; filtered data hold only self-generated images.
    gt_images = sorted((replicate / "gt" / "skills" / "toy-count" / "images").glob("*.png"))
    assert len(gt_images) == 4
    for path in gt_images:
        from PIL import Image

        with Image.open(path) as image:
            assert score_image(image.convert("RGB"), path.with_suffix(".txt").read_text()) == 100.0
    # Best of 4 / 8 by the judge: every candidate scored, the kept one the judge's best.
    for kind, n in (("bon4", 4),):
        rows = [
            json.loads(line)
            for line in (replicate / kind / "skills" / "toy-color" / "images" / "metadata.jsonl")
            .read_text()
            .splitlines()
        ]
        assert [len(row["candidates"]) for row in rows] == [n] * 4
        assert all(row["judge"] == "clipscore(tiny:clip)" for row in rows)
        assert all(
            row["candidates"][row["chosen"]]["score"] == max(c["score"] for c in row["candidates"]) for row in rows
        )
    # Round 2 draws with round 1's merged SELMA experts fused into the base.
    round2 = json.loads(
        (replicate / "round2" / "skills" / "toy-count" / "images" / "metadata.jsonl").read_text().splitlines()[0]
    )
    assert round2["model"].endswith("round1-model")
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["seeds"] == [5] and set(summary["kinds"]) == {
        *on_all,
        *(p for p in prefixes if p != "keyq-expert" or keyq),
    }
    # The mechanism table: every kind's training images scored; ground truth is perfect.
    assert summary["train_image_scores"]["gt"] == {s: 100.0 for s in skills}
    assert set(summary["train_image_scores"]) == set(kinds)
    assert set(summary["train_image_scores"]["keyq"]) == set(keyq)
    # The teacher kind's images come from the teacher model, the guidance kinds' at their guidance.
    teacher_rows = (replicate / "teacher" / "skills" / "toy-count" / "images" / "metadata.jsonl").read_text()
    assert "tiny" in teacher_rows
    assert any(row["target"].startswith("base on toy-count clearly worse at guidance 1") for row in summary["targets"])
    assert summary_path.read_text().startswith("# Shapes-world study") and (tmp_path / "study.png").stat().st_size > 0
    # The rule's table: every kind's training margin over the SELMA images of the same prompts;
    # ground truth's margin is 100 minus the SELMA images' mean score.
    margins = summary["training_margins"]
    assert set(margins) == set(kinds) - {"selma"}
    selma_mean = sum(summary["train_image_scores"]["selma"].values()) / 3
    gt_mean = sum(m["mean"] for m in margins["gt"].values()) / 3
    assert gt_mean == pytest.approx(100.0 - selma_mean, abs=0.02)
    assert {row["kind"] for row in summary["rule_check"]} == set(margins)
    assert (tmp_path / "study-rule.png").stat().st_size > 0
    # A rerun finds everything done and changes nothing.
    before = (replicate / "eval" / "scores.json").read_bytes()
    run_study(run, tmp_path, options)
    assert (replicate / "eval" / "scores.json").read_bytes() == before


def test_development_prompts_are_neither_train_nor_heldout_and_are_what_a_dev_study_scores(tmp_path):
    from selma_toolkit.dataset import read_prompts
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.study import StudyOptions, run_study
    from selma_toolkit.toyworld.study_data import DEV_ID_START

    run = load_run_recipe(
        "toy-study",
        [
            "skills.toy-count.num_prompts=30",
            "skills.toy-color.num_prompts=3",
            "skills.toy-spatial.num_prompts=3",
            "images.steps=2",
            "train.steps=1",
            "train.batch_size=2",
            "train.checkpoint_every=1",
            "evaluate.prompts_per_skill=20",
            "evaluate.seeds=[0]",
            "evaluate.report_prompts_per_skill=0",
        ],
    )
    run_study(run, tmp_path, StudyOptions(kinds=("gt",), merge_kinds=(), prompt_set="dev"))
    replicate = tmp_path / "seed-0"
    for skill in ("toy-count", "toy-color", "toy-spatial"):
        stream = read_prompts(replicate / "selma" / "skills" / skill / "prompts.jsonl")
        dev = read_prompts(replicate / "dev-prompts" / f"{skill}.jsonl")
        assert len(dev) == 20 and {p.split for p in dev} == {"dev"}
        texts = [p.prompt for p in dev]
        assert len(set(texts)) == 20 and not set(texts) & {p.prompt for p in stream}
        assert [p.id for p in dev] == list(range(DEV_ID_START, DEV_ID_START + 20))
    items = json.loads((replicate / "eval" / "scores.json").read_text())["items"]
    assert {item["variant"] for item in items} == {
        "base",
        "base-cfg1",
        "gt-expert:toy-count",
        "gt-expert:toy-color",
        "gt-expert:toy-spatial",
    }
    assert all(item["prompt_id"] >= DEV_ID_START for item in items)
    # No SELMA images or experts are made when the kind selma is not asked for.
    assert not (replicate / "selma" / "experts").exists()


def test_wheel_ships_both_toy_bases_and_the_judge_and_finds_them_outside_the_source_tree(tmp_path, repo_root):
    import subprocess
    import sys
    import zipfile

    from selma_toolkit.toyworld.model import TOY_BASES

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(repo_root), "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = zipfile.ZipFile(next(tmp_path.glob("selma_toolkit-*.whl")))
    site = tmp_path / "site"
    wheel.extractall(site)
    for spec, folder in TOY_BASES.items():
        shipped = {p.relative_to(repo_root).as_posix() for p in folder.rglob("*") if p.is_file()}
        name = folder.name
        assert (
            {
                f"selma_toolkit/toyworld/{name}/unet/diffusion_pytorch_model.safetensors",
                f"selma_toolkit/toyworld/{name}/model_index.json",
            }
            <= shipped
            <= set(wheel.namelist())
        )
        code = f"from selma_toolkit.models import resolve_model; print(resolve_model({spec!r}))"
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(site / "selma_toolkit" / "toyworld" / name)
    # toy:judge ships the same way and the clipscore scorer's model resolver finds it there.
    assert {
        "selma_toolkit/toyworld/judge/model.safetensors",
        "selma_toolkit/toyworld/judge/toyworld-judge.json",
        "selma_toolkit/toyworld/judge/tokenizer.json",
    } <= set(wheel.namelist())
    code = (
        "from selma_toolkit.evaluate.scorers import resolve_scorer_model; print(resolve_scorer_model('toy:judge', 'x'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(site / "selma_toolkit" / "toyworld" / "judge")


def test_unknown_toy_base_is_a_clear_error():
    from selma_toolkit.errors import ModelError
    from selma_toolkit.models import resolve_model

    with pytest.raises(
        ModelError, match="toy:circles: unknown toy base; the shipped ones are toy:shapes, toy:shapes-web"
    ):
        resolve_model("toy:circles")


def test_seeds_then_items_interval_covers_the_spread_between_replicates():
    from selma_toolkit.toyworld.study_stats import seed_item_bootstrap

    # Three replicates whose items agree within each: pooled items would give a narrow interval,
    # resampling the replicates gives every mean from 0 (seeds 0, 0, 0) to 3 (seed 2 thrice).
    mean, low, high = seed_item_bootstrap({0: [0.0] * 50, 1: [0.0] * 50, 2: [3.0] * 50})
    assert mean == pytest.approx(1.0) and low == pytest.approx(0.0) and high == pytest.approx(3.0)
    # One replicate: the items bootstrap of its mean.
    values = [float(v) for v in range(20)]
    mean, low, high = seed_item_bootstrap({0: values})
    assert mean == pytest.approx(9.5) and 6.0 < low < 9.5 < high < 13.0


def test_findings_say_when_self_generated_data_does_not_help_and_what_does():
    from selma_toolkit.toyworld.study_report import findings

    def gain(mean, low, high):
        return {"mean": mean, "low": low, "high": high, "n": 10}

    summary = {
        "skills": ["toy-count", "toy-color"],
        "gains": {
            "expert": {"toy-count": gain(-6.0, -9.0, -3.0), "toy-color": gain(4.0, 1.0, 7.0)},
            "gt-expert": {"toy-count": gain(2.0, 0.5, 3.5), "toy-color": gain(0.5, -1.0, 2.0)},
            "merged:selma": {"toy-count": gain(-1.0, -3.0, 1.0), "toy-color": gain(5.0, 2.0, 8.0)},
        },
    }
    count, color = findings(summary)
    assert count.startswith("toy-count: the SELMA expert (self-generated images) hurts (-6.0 [-9.0, -3.0])")
    assert count.endswith("; above the base: gt-expert +2.0.")
    assert color.startswith("toy-color: the SELMA expert (self-generated images) helps")
    assert color.endswith("; above the base: merged:selma +5.0, expert +4.0.")
    summary["gains"]["gt-expert"]["toy-count"] = gain(2.0, -0.5, 3.5)
    assert findings(summary)[0].endswith("; no variant beats the base (closest: gt-expert +2.0).")

"""`selma run tiny-demo` (every stage on the embedded tiny model) end to end, made smaller (32 px,
4 sampling steps, 6 training steps, 4 + 2 prompts per skill): killed with SIGKILL while training the
second expert, then run again. One run serves every test here; each test checks one promise of
`selma run` / `selma status` / checkpoint selection on what that run left behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from selma_toolkit.dataset import read_prompts
from selma_toolkit.recipe import load_run_folder
from selma_toolkit.run import run_pipeline
from selma_toolkit.stages import merge_inputs

SKILLS = ("count-grammar", "spatial-grammar", "color-grammar")
SMALL_DEMO = [
    "images.resolution=32",
    "images.steps=4",
    "images.batch_size=4",
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    *[f"skills.{skill}.num_prompts=4" for skill in SKILLS],
    "evaluate.prompts_per_skill=2",
    "evaluate.bootstrap_samples=200",
    "joint=true",  # the paper's mixture baseline too
]
VARIANTS = {"base", *(f"expert:{s}" for s in SKILLS), "joint", "merged:selma", "merged:delta"}


def demo_args(out: Path, *extra: str) -> list[str]:
    args = ["run", "tiny-demo", "--out", str(out)]
    for override in [*SMALL_DEMO, *extra]:
        args += ["--set", override]
    return args


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, sha256(p)) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the small demo, SIGKILL it once the second skill has its step-2 checkpoint, record what
    was on disk and `selma status`, run it again to the end, record its output and status."""
    root = tmp_path_factory.mktemp("demo") / "run"
    log = root.parent / "first-run.log"
    watched = root / "skills" / SKILLS[1] / "train" / "checkpoints" / "step-2" / "state.json"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "selma_toolkit", *demo_args(root)], stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while not watched.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    if not watched.exists():
        pytest.fail(f"the first run never reached {watched}:\n{log.read_text()[-3000:]}")
    assert process.returncode == -signal.SIGKILL, "the first run ended before it could be killed during training"
    steps_on_disk = sorted(
        int(p.name.split("-")[1]) for p in watched.parent.parent.iterdir() if p.name.startswith("step-")
    )
    assert steps_on_disk[-1] < 6, "the first run finished training the second expert before it could be killed"
    before = {
        "killed_at": steps_on_disk[-1],
        "prompts": {s: snapshot(root / "skills" / s) for s in SKILLS},
        "first_expert": snapshot(root / "skills" / SKILLS[0] / "train")
        | {
            "expert": (
                (root / "experts" / f"{SKILLS[0]}.safetensors").stat().st_mtime_ns,
                sha256(root / "experts" / f"{SKILLS[0]}.safetensors"),
            )
        },
        "second_step2": snapshot(watched.parent),
    }
    status_after_kill = run_cli("status", str(root))
    rerun = run_cli(*demo_args(root))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    status_after_rerun = run_cli("status", str(root))
    return {
        "root": root,
        "before": before,
        "status_after_kill": status_after_kill,
        "rerun": rerun,
        "status_after_rerun": status_after_rerun,
    }


class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img" and "src" in dict(attrs):
            self.sources.append(dict(attrs)["src"])


def tiny_pipeline():
    from diffusers import StableDiffusionPipeline

    from selma_toolkit.models import resolve_model

    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model("tiny:sd1"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_demo_writes_every_artifact_and_each_is_valid(demo_run):
    root = demo_run["root"]
    run, paths = load_run_folder(root)
    assert [s.name for s in run.skills] == list(SKILLS) and run.images.resolution == 32
    # Experts and merged LoRAs load in diffusers as they are, and change the UNet's output.
    pipe = tiny_pipeline()
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(sample, 10, encoder_hidden_states=context).sample
    for lora in [
        *(paths.expert(s) for s in SKILLS),
        paths.expert("joint"),
        paths.merged("selma"),
        paths.merged("delta"),
    ]:
        pipe.load_lora_weights(str(lora), adapter_name="check")
        with torch.no_grad():
            adapted = pipe.unet(sample, 10, encoder_hidden_states=context).sample
        pipe.unload_lora_weights()
        assert not torch.allclose(adapted, base), f"{lora} loaded but changes nothing"
    # The merged LoRA's metadata lists the experts it was made from.
    from selma_toolkit.lora import load_lora
    from selma_toolkit.lora.merge import merge_record

    record = merge_record(load_lora(paths.merged("selma")))
    assert record["method"] == "selma"
    assert [e["skill"] for e in record["experts"]] == list(SKILLS)
    # scores.json has every variant, on every skill's held-out prompts, with a number per scorer.
    scores = json.loads((paths.eval_dir / "scores.json").read_text())
    assert set(scores["variants"]) == VARIANTS
    assert set(scores["scorers"]) == {"clipscore", "vqascore"}
    for variant in VARIANTS:
        items = [i for i in scores["items"] if i["variant"] == variant]
        assert sorted((i["skill"], i["prompt_id"]) for i in items) == sorted(
            (s, p.id) for s in SKILLS for p in read_prompts(paths.prompts(s), split="heldout")
        )
        assert all(isinstance(i["scores"][m], float) for i in items for m in ("clipscore", "vqascore"))
    # The report shows images, and every image it references exists inside the report folder.
    parser = ImageSources()
    parser.feed(paths.report.read_text())
    assert len(parser.sources) >= len(VARIANTS)
    for source in parser.sources:
        target = (paths.report.parent / source).resolve()
        assert target.is_file() and paths.report.parent.resolve() in target.parents, source
    assert (paths.report.parent / "human-eval.html").is_file()
    assert "report" in demo_run["rerun"].stdout and str(paths.merged("selma")) in demo_run["rerun"].stdout


def test_rerun_after_kill_during_training_redoes_no_finished_work(demo_run):
    root, before = demo_run["root"], demo_run["before"]
    output = demo_run["rerun"].stdout + demo_run["rerun"].stderr  # stage lines go to stderr, results to stdout
    for skill in SKILLS:
        prompts_and_images = {
            k: v for k, v in snapshot(root / "skills" / skill).items() if k.startswith(("prompts.jsonl", "images/"))
        }
        assert prompts_and_images == {
            k: v for k, v in before["prompts"][skill].items() if k.startswith(("prompts.jsonl", "images/"))
        }, f"{skill}: prompts or images redone"
        assert f"skip prompts {skill}" in output and f"skip images {skill}" in output
    # The finished expert was not trained again: its checkpoints, loss log and file are untouched.
    first = SKILLS[0]
    assert f"skip train {first}" in output
    after = snapshot(root / "skills" / first / "train") | {
        "expert": (
            (root / "experts" / f"{first}.safetensors").stat().st_mtime_ns,
            sha256(root / "experts" / f"{first}.safetensors"),
        )
    }
    assert after == before["first_expert"]
    # The interrupted one resumed from its last checkpoint (step 2 not rewritten) and logged each step once.
    second = root / "skills" / SKILLS[1] / "train"
    assert snapshot(second / "checkpoints" / "step-2") == before["second_step2"]
    steps = [json.loads(line)["step"] for line in (second / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_status_shows_each_stage_after_the_kill_and_after_the_rerun(demo_run):
    killed = demo_run["status_after_kill"]
    assert killed.returncode == 0, killed.stderr
    lines = killed.stdout.splitlines()
    for skill in SKILLS:
        assert f"done prompts {skill}: 4/4 train, 2/2 held-out" in lines
        assert f"done images {skill}: 4/4 images" in lines
    assert any(line.startswith(f"done train {SKILLS[0]}: step 6/6") for line in lines)
    killed_at = demo_run["before"]["killed_at"]
    assert any(
        line.startswith(f"todo train {SKILLS[1]}: step {killed_at}/6, {killed_at // 2} checkpoint(s)") for line in lines
    )
    assert any(line.startswith(f"todo train {SKILLS[2]}: step 0/6") for line in lines)
    assert any(line.startswith("todo train joint: step 0/6") for line in lines)
    assert any(line.startswith("todo merge selma") for line in lines)
    assert not killed.stdout.rstrip().endswith("the run is complete")
    finished = demo_run["status_after_rerun"]
    assert "todo" not in finished.stdout
    assert finished.stdout.rstrip().endswith("14/14 stages done; the run is complete")


def test_checkpoint_selection_picks_the_best_scoring_checkpoint_on_heldout_prompts_only(demo_run):
    from selma_toolkit.evaluate import build_scorer
    from selma_toolkit.images import image_seed

    run, paths = load_run_folder(demo_run["root"])
    selection = json.loads((paths.eval_dir / "checkpoints" / "selection.json").read_text())["skills"]
    scorer = build_scorer("clipscore", run.evaluate)
    assert set(selection) == set(SKILLS)
    for skill in SKILLS:
        entry = selection[skill]
        heldout = {p.id: p.prompt for p in read_prompts(paths.prompts(skill), split="heldout")}
        trained = {p.prompt for p in read_prompts(paths.prompts(skill), split="train")}
        items = json.loads((paths.eval_dir / "checkpoints" / skill / "scores.json").read_text())["items"]
        assert {(i["prompt_id"], i["prompt"]) for i in items} == set(heldout.items())
        assert not {i["prompt"] for i in items} & trained
        # Every checkpoint was scored; recompute each mean with the scorer and pick the best again.
        assert [c["step"] for c in entry["checkpoints"]] == [2, 4, 6]
        means = {}
        for checkpoint in entry["checkpoints"]:
            mine = [i for i in items if i["variant"] == f"checkpoint:step-{checkpoint['step']}"]
            images = [Image.open(paths.eval_dir / "checkpoints" / skill / i["image"]).convert("RGB") for i in mine]
            means[checkpoint["step"]] = float(np.mean(scorer.score(images, [i["prompt"] for i in mine])))
            assert checkpoint["mean"] == pytest.approx(means[checkpoint["step"]], abs=1e-4)
        assert entry["best_step"] == max(means, key=lambda step: (means[step], step))
        assert entry["expert"] == f"skills/{skill}/train/checkpoints/step-{entry['best_step']}/{skill}.safetensors"
    # The images are the chosen checkpoint's: redraw one with diffusers' own LoRA loader and compare.
    skill = SKILLS[0]
    entry = selection[skill]
    item = next(i for i in items_of(paths, skill) if i["variant"] == f"checkpoint:step-{entry['best_step']}")
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(paths.root / entry["expert"]))
    redrawn = pipe(
        item["prompt"],
        num_inference_steps=run.images.steps,
        guidance_scale=run.images.guidance_scale,
        height=32,
        width=32,
        generator=torch.Generator("cpu").manual_seed(image_seed(item["seed"], item["prompt_id"])),
        output_type="np",
    ).images[0]
    stored = np.asarray(Image.open(paths.eval_dir / "checkpoints" / skill / item["image"]), dtype=np.float32) / 255
    assert np.abs(redrawn - stored).max() <= 2 / 255


def items_of(paths, skill):
    return json.loads((paths.eval_dir / "checkpoints" / skill / "scores.json").read_text())["items"]


def test_run_merges_the_selected_checkpoints_and_can_take_the_final_experts(demo_run):
    run, paths = load_run_folder(demo_run["root"])
    selection = json.loads((paths.eval_dir / "checkpoints" / "selection.json").read_text())["skills"]
    chosen = [paths.root / selection[s]["expert"] for s in SKILLS]
    from selma_toolkit.lora import load_lora
    from selma_toolkit.lora.merge import merge_record

    for method in ("selma", "delta"):
        record = merge_record(load_lora(paths.merged(method)))
        assert [e["sha256"] for e in record["experts"]] == [sha256(p) for p in chosen]
    assert [p for _, p in merge_inputs(run, paths, [], use_best=True)] == chosen
    assert [p for _, p in merge_inputs(run, paths, [], use_best=False)] == [paths.expert(s) for s in SKILLS]


def test_evaluate_checkpoints_command_reports_the_recorded_choice(demo_run, cli):
    root = demo_run["root"]
    selection = json.loads((root / "eval" / "checkpoints" / "selection.json").read_text())["skills"]
    result = cli("evaluate", str(root), "--checkpoints", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for skill in SKILLS:
        row = next(line for line in result.stdout.splitlines() if f" {skill} " in line)
        assert f" {selection[skill]['best_step']} " in row


def test_evaluate_command_on_a_finished_run_reuses_every_image_and_score(demo_run, cli):
    root = demo_run["root"]
    images = snapshot(root / "eval" / "images")
    scores = (root / "eval" / "item_scores.jsonl").read_bytes()
    result = cli("evaluate", str(root))
    assert result.returncode == 0, result.stderr
    assert f"report: {root / 'report' / 'index.html'}" in result.stdout
    assert snapshot(root / "eval" / "images") == images  # nothing drawn again
    assert (root / "eval" / "item_scores.jsonl").read_bytes() == scores  # nothing scored again


def test_changing_image_settings_of_a_run_with_images_is_refused_naming_the_change(demo_run, cli):
    root = demo_run["root"]
    recorded = (root / "recipe.toml").read_bytes()
    result = cli("run", str(root / "recipe.toml"), "--out", str(root), "--set", "images.steps=5")
    assert result.returncode == 2
    assert "images.steps: 4 -> 5" in result.stderr and "Traceback" not in result.stderr
    assert (root / "recipe.toml").read_bytes() == recorded


def test_listed_experts_are_merged_with_the_trained_ones(demo_run, tmp_path):
    from support_lora import random_lora

    from selma_toolkit.lora import load_lora, lora_metadata, save_lora
    from selma_toolkit.lora.merge import merge_record
    from selma_toolkit.recipe import load_run_recipe

    copy = tmp_path / "run"
    shutil.copytree(demo_run["root"], copy)
    extra = save_lora(
        random_lora(tiny_pipeline(), rank=8, alpha=8.0, seed=3),
        tmp_path / "extra.safetensors",
        metadata=lora_metadata(base_model="tiny:sd1", architecture="sd1", skill="extra-skill"),
    )
    # Adding an expert and changing evaluation settings mixes nothing: the run continues.
    run = load_run_recipe(
        copy / "recipe.toml",
        [f'experts=["{extra}"]', "evaluate.prompts_per_skill=0", "evaluate.select_checkpoints=false"],
    )
    events = []
    result = run_pipeline(
        run, load_run_folder(copy)[1], on_stage=lambda state, action: events.append((state.stage, action))
    )
    assert {action for stage, action in events if stage in ("prompts", "images", "train")} == {"skip"}
    record = merge_record(load_lora(result.merged["selma"]))
    assert [e["skill"] for e in record["experts"]] == [*SKILLS, "extra-skill"]
    assert record["experts"][-1]["sha256"] == sha256(extra)

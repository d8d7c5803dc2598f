"""Stage 3, LoRA expert training, on the tiny SD1 / SD2 (v-prediction) / SDXL models: the loss
falls, the expert loads in diffusers with the trained update, resume equals an uninterrupted
run, caches are exact and invalidate themselves, the joint baseline sees every skill, bad input
is refused clearly."""

from __future__ import annotations

import errno
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selma_toolkit.architectures import get_family
from selma_toolkit.cli.words import cli_message
from selma_toolkit.errors import DatasetError, RecipeError, TrainingError
from selma_toolkit.lora import load_lora, metadata_value
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import RunRecipe
from selma_toolkit.train import (
    TrainEvent,
    checkpoint_experts,
    loop,
    train_expert,
    train_joint,
)
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train.data import TrainSample, image_digests, sample_index


def write_dataset(
    folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (20, 24), word: str = "red"
) -> Path:
    """An imagefolder dataset of random images (height, width = ``size``) with metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"{['one', 'two', 'three'][i % 3]} {word} cube {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_run(base_model: Path | str, skills=("count",), **train) -> RunRecipe:
    settings = {"rank": 4, "batch_size": 4, "steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3, **train}
    return RunRecipe.model_validate(
        {
            "name": "t",
            "base_model": str(base_model),
            "skills": [{"name": s, "seeds": ["a", "b", "c"], "instruction": "x"} for s in skills],
            "images": {"resolution": 16},
            "train": settings,
        }
    )


def new_run_dir(tmp_path: Path, name: str = "run", skills=("count",), count: int = 8) -> RunPaths:
    paths = RunPaths(tmp_path / name)
    for index, skill in enumerate(skills):
        write_dataset(paths.images(skill), count, seed=index, word=["red", "blue", "green"][index])
    return paths


def losses(paths: RunPaths, skill: str = "count") -> list[dict]:
    return [json.loads(line) for line in (paths.train_dir(skill) / "loss.jsonl").read_text().splitlines()]


def expert_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_overfitting_a_fixed_batch_lowers_the_loss(arch, tiny_model_dirs, tmp_path, monkeypatch):
    # Field notes: on random data the loss only falls clearly on a fixed batch with a fixed
    # noise/timestep draw and lr >= 1e-3. Fix the sample order and the per-slot draws.
    monkeypatch.setattr(loop, "sample_index", lambda position, count, seed: position % count)
    monkeypatch.setattr(loop, "sample_generator", lambda seed, step, slot: torch.Generator().manual_seed(slot))
    paths = new_run_dir(tmp_path)
    run = make_run(tiny_model_dirs[arch], rank=8, batch_size=8, steps=20, checkpoint_every=100, learning_rate=1e-2)
    train_expert(run, "count", paths)
    curve = [r["loss"] for r in losses(paths)]
    assert [r["step"] for r in losses(paths)] == list(range(1, 21))
    assert curve[-1] < 0.85 * curve[0], curve
    assert all(later < earlier for earlier, later in itertools.pairwise(curve)), curve
    assert (paths.train_dir("count") / "loss.png").stat().st_size > 0


def test_targets_follow_the_models_scheduler_epsilon_or_velocity(tiny_model_dirs):
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([0, 500, 999])
    sd1 = parts.load_noise_scheduler(tiny_model_dirs["sd1"])
    assert torch.equal(parts.diffusion_target(sd1, latents, noise, timesteps), noise)
    sd2 = parts.load_noise_scheduler(tiny_model_dirs["sd2"])
    # Independent: SD's scaled_linear betas, alpha_bar = prod(1 - beta), v = sqrt(ab) eps - sqrt(1 - ab) x0.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[timesteps].float().view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(parts.diffusion_target(sd2, latents, noise, timesteps), velocity, atol=1e-6)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_cached_text_conditioning_equals_what_the_pipeline_encodes(arch, tiny_model_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    model_dir = tiny_model_dirs[arch]
    folder = write_dataset(tmp_path / "images", 2, size=(40, 48))
    samples = [
        TrainSample(folder / f"{i:03d}.png", text, "count") for i, text in enumerate(["two red cubes", "a blue ball"])
    ]
    root = tmp_path / "cache"
    names = parts.text_encoder_names(get_family(arch))
    latents = caches.ensure_cache(
        caches.latent_cache_spec(model_dir, 16, image_digests(samples)),
        root,
        2,
        lambda: caches.latent_encoder(samples, parts.load_vae(model_dir), 16),
    )

    def caption_encoder():
        tokenizers, encoders = parts.load_text_encoders(model_dir, get_family(arch), torch.float32)
        return caches.caption_encoder(samples, tokenizers, encoders, torch.device("cpu"), family=get_family(arch))

    texts = caches.ensure_cache(
        caches.text_cache_spec(model_dir, names, torch.float32, samples), root, 2, caption_encoder
    )
    source = caches.ConditionSource(
        samples,
        16,
        torch.device("cpu"),
        latents=caches.CachedTensors(latents),
        texts=caches.CachedTensors(texts),
        family=get_family(arch),
    )
    cond = source([1, 0])
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    for row, index in enumerate([1, 0]):
        if arch == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(
                samples[index].text, device="cpu", do_classifier_free_guidance=False
            )
            assert torch.allclose(cond.pooled[row], pooled[0], atol=1e-6)
        else:
            embeds, _ = pipe.encode_prompt(samples[index].text, "cpu", 1, False)
        assert torch.allclose(cond.prompt_embeds[row], embeds[0], atol=1e-6)
    if arch == "sdxl":
        # 40x48 image: shorter side 40 -> 16, width 48 -> 19, centre crop starts at column round(1.5) = 2.
        assert cond.time_ids.tolist() == [[40, 48, 0, 2, 16, 16]] * 2
    else:
        assert cond.pooled is None and cond.time_ids is None
    image = np.asarray(Image.open(samples[0].image).convert("RGB").resize((19, 16), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(image[:, 2:18].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    expected = pipe.vae.encode(pixels).latent_dist
    assert torch.allclose(cond.latent_mean[1], expected.mean[0], atol=1e-5)
    assert torch.allclose(cond.latent_std[1], expected.std[0], atol=1e-5)


# ------------------------------------------------------------------------------- expert files


def trained_deltas(checkpoint: Path, component_files: dict[str, str], scale: float) -> dict[str, torch.Tensor]:
    """scale * B @ A per module path from the raw peft parameters a checkpoint saved (lora_<i>)."""
    deltas = {}
    for component, file in component_files.items():
        state = load_file(str(checkpoint / file))
        for key, down in state.items():
            if ".lora_A." in key:
                path = key.split(".lora_A.")[0]
                deltas[f"{component}:{path}"] = scale * state[key.replace(".lora_A.", ".lora_B.")] @ down
    return deltas


@pytest.mark.parametrize(("lora_format", "text_encoder"), [("kohya", True), ("peft", False)])
def test_saved_expert_loads_in_diffusers_with_the_trained_update(lora_format, text_encoder, tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    paths = new_run_dir(tmp_path)
    run = make_run(
        tiny_sd1, steps=2, alpha=8, learning_rate=1e-2, lora_format=lora_format, train_text_encoder=text_encoder
    )
    expert = train_expert(run, "count", paths)
    files = {"unet": "lora_0.safetensors", **({"text_encoder": "lora_1.safetensors"} if text_encoder else {})}
    expected = trained_deltas(paths.train_dir("count") / "checkpoints" / "step-2", files, scale=8 / 4)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(
            "two red cubes",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = image()
    pipe.load_lora_weights(expert)
    loaded = {}
    for component in files:
        for path, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, LoraLayer):
                loaded[f"{component}:{path}"] = layer.get_delta_weight(layer.active_adapters[0])
    assert sorted(loaded) == sorted(expected)  # every trained layer loaded, nothing else
    for name, delta in expected.items():
        assert torch.allclose(loaded[name], delta, atol=1e-6), name
    assert np.abs(image() - before).max() > 1e-4
    metadata = load_lora(expert).metadata
    assert metadata_value(metadata, "skill") == "count"
    assert metadata_value(metadata, "base_model") == str(tiny_sd1)
    assert metadata_value(metadata, "architecture") == "sd1"
    assert metadata_value(metadata, "steps") == "2"
    assert metadata_value(metadata, "recipe_sha256")


# ------------------------------------------------------------------------------ checkpoints


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_sd1, tmp_path):
    # LoRA dropout draws from the global RNG: equality needs the RNG state restored as well.
    run = make_run(tiny_sd1, steps=6, checkpoint_every=2, dropout=0.1)
    straight = new_run_dir(tmp_path, "straight")
    train_expert(run, "count", straight)

    resumed = new_run_dir(tmp_path, "resumed")

    def crash_at_step_5(event: TrainEvent) -> None:
        if event.kind == "step" and event.done == 5:
            raise Crash

    with pytest.raises(Crash):
        train_expert(run, "count", resumed, progress=crash_at_step_5)
    assert [step for step, _ in checkpoint_experts(resumed.train_dir("count"))] == [2, 4]
    assert not resumed.expert("count").exists()
    train_expert(run, "count", resumed)

    want, got = expert_tensors(straight.expert("count")), expert_tensors(resumed.expert("count"))
    assert sorted(want) == sorted(got)
    assert all(torch.equal(want[key], got[key]) for key in want)
    assert [r["step"] for r in losses(resumed)] == list(range(1, 7))
    assert [r["loss"] for r in losses(resumed)] == [r["loss"] for r in losses(straight)]


def test_rerun_continues_only_what_is_missing(tiny_sd1, tmp_path):
    paths = new_run_dir(tmp_path)
    train_expert(make_run(tiny_sd1, steps=2), "count", paths)
    first = expert_tensors(paths.expert("count"))
    paths.expert("count").unlink()
    train_expert(make_run(tiny_sd1, steps=2), "count", paths)  # finished: only the expert is rewritten
    assert len(losses(paths)) == 2
    assert all(torch.equal(first[k], v) for k, v in expert_tensors(paths.expert("count")).items())
    train_expert(make_run(tiny_sd1, steps=4), "count", paths)  # more steps: continues from step 2
    assert [r["step"] for r in losses(paths)] == [1, 2, 3, 4]
    assert [step for step, _ in checkpoint_experts(paths.train_dir("count"))] == [2, 4]


def test_resuming_with_a_changed_recipe_is_refused_naming_what_changed(tiny_model_dirs, tmp_path):
    paths = new_run_dir(tmp_path)
    train_expert(make_run(tiny_model_dirs["sd1"], steps=2), "count", paths)
    with pytest.raises(RecipeError) as refused:
        train_expert(make_run(tiny_model_dirs["sd2"], steps=4, rank=8), "count", paths)
    message = str(refused.value)
    assert "train.rank: 4 -> 8" in message
    assert f"base_model: {str(tiny_model_dirs['sd1'])!r} -> {str(tiny_model_dirs['sd2'])!r}" in message
    assert "choose another --out" in cli_message(refused.value)
    assert not any(line.strip().startswith("train.steps") for line in message.splitlines())  # more steps: allowed
    write_dataset(paths.images("count"), 9)  # the images stage ran again with more prompts
    with pytest.raises(RecipeError, match="dataset"):
        train_expert(make_run(tiny_model_dirs["sd1"], steps=4), "count", paths)


def test_out_of_disk_while_saving_a_checkpoint_keeps_the_previous_one(tiny_sd1, tmp_path, monkeypatch):
    paths = new_run_dir(tmp_path)
    run = make_run(tiny_sd1, steps=4, checkpoint_every=2)
    real_save = loop.save_lora

    def disk_full_in_step_4(weights, path, **kwargs):
        if ".step-4.partial" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(weights, path, **kwargs)

    monkeypatch.setattr(loop, "save_lora", disk_full_in_step_4)
    with pytest.raises(TrainingError, match="step-2 is intact"):
        train_expert(run, "count", paths)
    folder = paths.train_dir("count") / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
    step_2 = load_lora(folder / "step-2" / "count.safetensors")
    monkeypatch.setattr(loop, "save_lora", real_save)
    train_expert(run, "count", paths)
    assert [r["step"] for r in losses(paths)] == [1, 2, 3, 4]
    again = load_lora(folder / "step-2" / "count.safetensors")
    assert all(torch.equal(step_2.modules[k].up, again.modules[k].up) for k in step_2.modules)


# -------------------------------------------------------------------------- caches and batches


def test_training_from_the_cache_matches_training_through_the_encoders(tiny_model_dirs, tmp_path):
    cached, direct = new_run_dir(tmp_path, "cached"), new_run_dir(tmp_path, "direct")
    train_expert(make_run(tiny_model_dirs["sdxl"], steps=2), "count", cached)
    train_expert(make_run(tiny_model_dirs["sdxl"], steps=2, cache=False), "count", direct)
    assert len(list((cached.train_dir("count") / "cache").iterdir())) == 2
    assert not (direct.train_dir("count") / "cache").exists()
    assert_same_training(cached, direct)


def assert_same_training(a: RunPaths, b: RunPaths, lr: float = 1e-3) -> None:
    """Same samples, same draws, same math, only another float summation order: the losses agree
    to ~1e-7, and Adam turns the ulp-level gradient noise into weight differences of a small
    fraction of one lr-sized step, while training itself moved the weights by several steps."""
    assert [r["loss"] for r in losses(a)] == pytest.approx([r["loss"] for r in losses(b)], rel=1e-5)
    first, second = expert_tensors(a.expert("count")), expert_tensors(b.expert("count"))
    assert sorted(first) == sorted(second)
    assert all(torch.allclose(first[k], second[k], atol=0.2 * lr, rtol=0) for k in first)
    assert max(second[k].abs().max() for k in second if "lora_up" in k) > lr


def test_gradient_accumulation_gives_the_full_batch_update(tiny_sd1, tmp_path):
    full, accumulated = new_run_dir(tmp_path, "full"), new_run_dir(tmp_path, "accumulated")
    train_expert(make_run(tiny_sd1, steps=2, batch_size=4), "count", full)
    train_expert(make_run(tiny_sd1, steps=2, batch_size=4, micro_batch_size=1), "count", accumulated)
    assert_same_training(full, accumulated)


def test_cache_is_rebuilt_exactly_when_model_resolution_or_data_change(tiny_sd1, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_sd1, model_dir)
    folder = write_dataset(tmp_path / "images", 3)
    samples = [TrainSample(folder / f"{i:03d}.png", f"caption {i}", "count") for i in range(3)]
    root = tmp_path / "cache"
    calls = []

    def encoder():
        calls.append(1)
        return caches.latent_encoder(samples, parts.load_vae(model_dir), 16)

    def build(resolution=16):
        return caches.ensure_cache(
            caches.latent_cache_spec(model_dir, resolution, image_digests(samples)), root, 3, encoder
        )

    first = build()
    assert build() == first and len(calls) == 1  # unchanged: reused
    text_spec = caches.text_cache_spec(model_dir, ["text_encoder"], torch.float32, samples)
    samples[1] = TrainSample(samples[1].image, "another caption", "count")
    assert build() == first  # a caption is not an input of the latents
    assert caches.text_cache_spec(model_dir, ["text_encoder"], torch.float32, samples).key != text_spec.key
    second = build(resolution=24)
    assert second != first and not first.exists() and len(calls) == 2  # old cache removed
    Image.new("RGB", (20, 24), "white").save(samples[0].image)
    third = build(resolution=24)
    assert third != second and len(calls) == 3
    config = json.loads((model_dir / "vae" / "config.json").read_text())
    (model_dir / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    assert build(resolution=24) != third and len(calls) == 4
    assert sorted(p.name for p in root.iterdir()) == [build(resolution=24).name]


def test_joint_training_sees_every_skills_data(tiny_sd1, tmp_path):
    skills = ("count", "spatial", "color")
    paths = new_run_dir(tmp_path, skills=skills, count=4)
    run = make_run(tiny_sd1, skills=skills, steps=3, batch_size=8, checkpoint_every=3)  # 24 samples = 2 epochs of 12
    expert = train_joint(run, paths)
    assert expert == paths.expert(JOINT)
    seen = {skill: sum(r["sources"].get(skill, 0) for r in losses(paths, JOINT)) for skill in skills}
    assert seen == {"count": 8, "spatial": 8, "color": 8}
    # Each epoch is a permutation of all 12 samples, so every sample of every skill is drawn.
    assert sorted(sample_index(position, 12, run.train.seed) for position in range(12, 24)) == list(range(12))
    metadata = load_lora(expert).metadata
    assert metadata_value(metadata, "skill") == JOINT
    assert json.loads(metadata_value(metadata, "skills")) == list(skills)
    index = json.loads(next((paths.train_dir(JOINT) / "cache").glob("latents-*/index.json")).read_text())
    assert index["count"] == 12


# --------------------------------------------------------------------------------- bad input


def test_dataset_problems_are_named(tiny_sd1, tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.images("count").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no metadata.jsonl"):
        train_expert(make_run(tiny_sd1), "count", paths)
    write_dataset(paths.images("count"), 3)
    (paths.images("count") / "001.png").unlink()
    with pytest.raises(DatasetError, match=r"missing: 001\.png"):
        train_expert(make_run(tiny_sd1), "count", paths)
    (paths.images("count") / "001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"001\.png: cannot read the image"):
        train_expert(make_run(tiny_sd1), "count", paths)
    with pytest.raises(RecipeError, match="no skill 'counting'"):
        train_expert(make_run(tiny_sd1), "counting", paths)


def test_bad_training_settings_are_recipe_errors(tiny_sd1, tmp_path):
    from selma_toolkit.recipe import load_run_recipe

    recipe = tmp_path / "run.toml"
    recipe.write_text(f'name = "r"\nbase_model = "{tiny_sd1}"\nskills = ["countbench"]\n')
    with pytest.raises(RecipeError, match=r"overrides 'train.rank=0': expected 1 or more"):
        load_run_recipe(recipe, ["train.rank=0"])
    with pytest.raises(RecipeError, match=r"batch_size \(64\) must be a multiple of micro_batch_size \(5\)"):
        load_run_recipe(recipe, ["train.micro_batch_size=5"])
    with pytest.raises(RecipeError, match=r"multiple of micro_batch_size \(4\) x processes \(3\)"):
        loop.micro_batching(make_run(tiny_sd1, batch_size=8, micro_batch_size=4).train, 3)
    paths = new_run_dir(tmp_path, count=2)
    with pytest.raises(RecipeError, match=r"train.target_modules = \['to_qq'\]"):
        train_expert(make_run(tiny_sd1, target_modules=["to_qq"]), "count", paths)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="needs a CUDA GPU"):
            train_expert(make_run(tiny_sd1, mixed_precision="fp16"), "count", paths)


def test_cli_trains_an_expert_and_refuses_bad_arguments(tiny_sd1, tmp_path, cli):
    recipe = tmp_path / "run.toml"
    recipe.write_text(
        f'name = "r"\nbase_model = "{tiny_sd1}"\n'
        'skills = [{ recipe = "count-grammar" }]\n[images]\nresolution = 16\n'
        "[train]\nrank = 4\nbatch_size = 2\nsteps = 2\ncheckpoint_every = 2\n"
    )
    out = tmp_path / "out"
    write_dataset(RunPaths(out).images("count-grammar"), 2)
    result = cli("train", str(recipe), "--skill", "count-grammar", "--out", str(out), "--set", "train.steps=3")
    assert result.returncode == 0, result.stderr
    assert RunPaths(out).expert("count-grammar").is_file()
    assert "experts/count-grammar.safetensors" in result.stdout.replace("\n", "")
    both = cli("train", str(recipe), "--skill", "count-grammar", "--joint", "--out", str(out))
    assert both.returncode == 2 and "Traceback" not in both.stderr
    assert "give one of --skill NAME (one expert), --joint (the mixture baseline)" in both.stderr

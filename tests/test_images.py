"""Stage 2 (`selma images`): one image per train prompt into an imagefolder dataset that is
seeded, resumable after kill -9, shared between processes without overlap, and refuses bad input."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

from selma_toolkit.dataset import read_image_dataset
from selma_toolkit.errors import DatasetError, ModelError, RecipeError
from selma_toolkit.images import generate_images
from selma_toolkit.images.shard import batches_for_process
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_recipe, recipe_hash

SKILL = "count"
# These compare images with ones drawn on the CPU (by plain diffusers, or by a subprocess); on a
# machine with CUDA, generate_images in this process draws on the GPU in float16 instead.
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares with CPU-drawn images; here images are drawn on CUDA"
)


def write_recipe(folder: Path, base_model, *, images_model=None, **images) -> Path:
    """A run recipe with one inline skill and small image settings (32 px, 2 steps, batch 2)."""
    settings = {"steps": 2, "resolution": 32, "batch_size": 2, **images}
    if images_model is not None:
        settings["model"] = str(images_model)
    data = {
        "name": "t",
        "base_model": str(base_model),
        "skills": [
            {"name": SKILL, "instruction": "Write counting prompts.", "seeds": ["one cat", "two dogs", "three cups"]}
        ],
        "images": settings,
    }
    path = folder / "recipe.in.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def write_prompts(root: Path, count: int, heldout: tuple[int, ...] = ()) -> list[str]:
    """prompts.jsonl in the stage-1 format; returns the train prompts' texts by id order."""
    path = RunPaths(root).prompts(SKILL)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = [f"{i + 1} red apples on a table, photo {i}" for i in range(count)]
    rows = [
        {"id": i, "skill": SKILL, "prompt": t, "source": "llm", "split": "heldout" if i in heldout else "train"}
        for i, t in enumerate(texts)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [t for i, t in enumerate(texts) if i not in heldout]


def make_run(tmp_path: Path, base_model, count: int, *, heldout=(), images_model=None, **images):
    root = tmp_path / "run"
    texts = write_prompts(root, count, heldout)
    run = load_run_recipe(write_recipe(tmp_path, base_model, images_model=images_model, **images))
    return run, RunPaths(root), texts


def documented_seed(base_seed: int, prompt_id: int) -> int:
    """The seed formula the metadata promises: 31 bits of sha256("<base_seed>:<prompt_id>")."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{prompt_id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every visible file of a dataset folder, by name (hidden files are run state, not data)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def reference_image(model_dir: Path, prompt: str, seed: int, steps: int, resolution: int) -> np.ndarray:
    """The image plain diffusers draws for one prompt and seed, without selma-toolkit's loader."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=resolution,
        width=resolution,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------- dataset layout


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_each_architecture_writes_an_imagefolder_that_datasets_and_our_reader_load(arch, tiny_model_dirs, tmp_path):
    import datasets

    run, paths, texts = make_run(tmp_path, tiny_model_dirs[arch], 6, heldout=(2,))
    stats = generate_images(run, SKILL, paths)
    folder = paths.images(SKILL)

    assert (stats.prompts, stats.images, stats.generated, stats.skipped, stats.blacked_out) == (5, 5, 5, 0, [])
    assert not (folder / "000002.png").exists() and not (folder / "000002.txt").exists(), "held-out prompt was drawn"
    records = read_image_dataset(folder)
    assert [r.text for r in records] == texts
    for record in records:
        prompt_id = record.extra["prompt_id"]
        assert record.path.name == f"{prompt_id:06d}.png"
        assert record.path.with_suffix(".txt").read_text() == record.text
        assert record.extra["seed"] == documented_seed(0, prompt_id)
        assert (record.extra["model"], record.extra["steps"], record.extra["guidance"]) == (
            str(tiny_model_dirs[arch]),
            2,
            7.5,
        )
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 5 and sorted(loaded["text"]) == sorted(texts)
    assert sorted(loaded["prompt_id"]) == [0, 1, 3, 4, 5]
    assert loaded[0]["image"].size == (32, 32)
    assert recipe_hash(load_run_recipe(paths.recipe)) == recipe_hash(run), "resolved recipe not written"


def test_batches_are_dealt_to_processes_without_overlap_or_gaps():
    items = list(range(23))
    for processes in (1, 2, 3, 5):
        shares = [batches_for_process(items, 4, index, processes) for index in range(processes)]
        drawn = sorted(i for share in shares for batch in share for i in batch)
        assert drawn == items
        # A batch holds the same prompts whatever the number of processes.
        assert sorted(tuple(b) for share in shares for b in share) == sorted(
            tuple(b) for b in batches_for_process(items, 4, 0, 1)
        )


# ------------------------------------------------------------------------------------ seeding


@cpu_only
def test_image_is_reproduced_bit_for_bit_by_diffusers_from_its_metadata_seed(tiny_sd1, tmp_path):
    run, paths, _texts = make_run(tmp_path, tiny_sd1, 3, batch_size=1, seed=7)
    generate_images(run, SKILL, paths)
    for record in read_image_dataset(paths.images(SKILL)):
        assert record.extra["seed"] == documented_seed(7, record.extra["prompt_id"])
        expected = reference_image(tiny_sd1, record.text, record.extra["seed"], steps=2, resolution=32)
        assert np.array_equal(pixels(record.path), expected)


@cpu_only
def test_batched_images_match_single_images_up_to_float_rounding(tiny_sd1, tmp_path):
    single_run, single_paths, _ = make_run(tmp_path / "single", tiny_sd1, 5, batch_size=1)
    batched_run, batched_paths, _ = make_run(tmp_path / "batched", tiny_sd1, 5, batch_size=4)
    generate_images(single_run, SKILL, single_paths)
    generate_images(batched_run, SKILL, batched_paths)
    single = {r.path.name: pixels(r.path) for r in read_image_dataset(single_paths.images(SKILL))}
    batched = {r.path.name: pixels(r.path) for r in read_image_dataset(batched_paths.images(SKILL))}
    assert single.keys() == batched.keys()
    others = list(single.values())
    for name, image in single.items():
        # CPU kernels round differently for another batch shape: a few 8-bit levels at most.
        assert np.abs(image - batched[name]).max() <= 3, name
        # ...far below the difference between two seeds.
        assert all(
            np.abs(image - other).mean() > 5 * np.abs(image - batched[name]).mean()
            for other in others
            if other is not image
        )


@cpu_only
def test_weak_to_strong_draws_with_the_images_model_not_the_base_model(tiny_model_dirs, tmp_path):
    run, paths, _texts = make_run(
        tmp_path, tiny_model_dirs["sdxl"], 2, images_model=tiny_model_dirs["sd1"], batch_size=1
    )
    generate_images(run, SKILL, paths)
    for record in read_image_dataset(paths.images(SKILL)):
        assert record.extra["model"] == str(tiny_model_dirs["sd1"])
        expected = reference_image(tiny_model_dirs["sd1"], record.text, record.extra["seed"], steps=2, resolution=32)
        assert np.array_equal(pixels(record.path), expected)


def test_jpg_format_writes_jpeg_files_that_both_readers_load(tiny_model_dirs, tmp_path):
    import datasets

    run, paths, texts = make_run(tmp_path, tiny_model_dirs["sd2"], 3, image_format="jpg")
    generate_images(run, SKILL, paths)
    records = read_image_dataset(paths.images(SKILL))
    assert [r.path.name for r in records] == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert all(Image.open(r.path).format == "JPEG" for r in records)
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=str(paths.images(SKILL)), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(loaded["text"]) == sorted(texts)


def test_memory_options_are_applied_and_change_speed_not_images(tiny_sd1, tmp_path):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from selma_toolkit.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd1), device="cpu", attention_slicing=True, vae_tiling=True)
    assert pipe.vae.use_tiling
    assert all(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    plain_run, plain_paths, _ = make_run(tmp_path / "plain", tiny_sd1, 2)
    saving_run, saving_paths, _ = make_run(tmp_path / "saving", tiny_sd1, 2, attention_slicing=True, vae_tiling=True)
    generate_images(plain_run, SKILL, plain_paths)
    generate_images(saving_run, SKILL, saving_paths)
    for record in read_image_dataset(saving_paths.images(SKILL)):
        assert np.abs(pixels(record.path) - pixels(plain_paths.images(SKILL) / record.path.name)).max() <= 3


@cpu_only
def test_cpu_offload_without_cuda_is_a_clear_error(tiny_sd1, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_sd1, 1, cpu_offload=True)
    with pytest.raises(ModelError, match="cpu_offload.*Set images.cpu_offload = false"):
        generate_images(run, SKILL, paths)


# ----------------------------------------------------------------------------- resume, kill -9


@cpu_only
def test_resume_after_kill_equals_an_uninterrupted_run(tiny_sd1, tmp_path):
    settings = dict(steps=6, batch_size=2)
    count = 24
    reference_run, reference_paths, _ = make_run(tmp_path / "reference", tiny_sd1, count, **settings)
    generate_images(reference_run, SKILL, reference_paths)

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    recipe = write_recipe(killed_dir, tiny_sd1, **settings)
    write_prompts(killed_dir / "run", count)
    folder = RunPaths(killed_dir / "run").images(SKILL)
    process = subprocess.Popen(
        [sys.executable, "-m", "selma_toolkit", "images", str(recipe), "--out", str(killed_dir / "run")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and len(list(folder.glob("*.txt"))) < 4:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    finished = sorted(folder.glob("*.txt"))
    assert 4 <= len(finished) < count
    assert not (folder / "metadata.jsonl").exists()

    # Damage of the kinds a kill or a bad disk leaves: a truncated image, an image without its
    # caption (killed between the two writes), a temporary file of an unfinished write.
    truncated = finished[0].with_suffix(".png")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    finished[1].unlink()
    (folder / ".000023.png.x1y2.tmp").write_bytes(b"partial")

    resumed_run = load_run_recipe(recipe)
    stats = generate_images(resumed_run, SKILL, RunPaths(killed_dir / "run"))
    assert stats.skipped == len(finished) - 2 and stats.generated == count - stats.skipped
    assert folder_contents(folder) == folder_contents(reference_paths.images(SKILL))
    assert not list(folder.glob(".*.tmp"))
    ids = [row["prompt_id"] for row in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())]
    assert ids == list(range(count))


def test_resume_with_other_settings_is_refused(tiny_sd1, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_sd1, 2)
    generate_images(run, SKILL, paths)
    changed = load_run_recipe(write_recipe(tmp_path, tiny_sd1, steps=3))
    with pytest.raises(DatasetError, match=r"other settings \(steps: 2 -> 3\).*choose another folder \(out\)"):
        generate_images(changed, SKILL, paths)


# ------------------------------------------------------------------------------ two processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@cpu_only
def test_two_processes_draw_every_prompt_exactly_once_and_match_one_process(tiny_sd1, tmp_path):
    count = 9
    single_run, single_paths, _ = make_run(tmp_path / "single", tiny_sd1, count)
    generate_images(single_run, SKILL, single_paths)

    shared = tmp_path / "shared"
    shared.mkdir()
    recipe = write_recipe(shared, tiny_sd1)
    write_prompts(shared / "run", count)
    # On a machine without GPUs only --multi_gpu starts several processes (see shard.py).
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "selma_toolkit",
        "images",
        str(recipe),
        "--out",
        str(shared / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "drawn per process: [5, 4]" in result.stdout, result.stdout
    folder = RunPaths(shared / "run").images(SKILL)
    ids = [row["prompt_id"] for row in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())]
    assert ids == list(range(count))
    # Batches hold the same prompts whatever the number of processes, so the images are the same.
    assert folder_contents(folder) == folder_contents(single_paths.images(SKILL))


# ------------------------------------------------------------------------------ safety checker


def add_tiny_safety_checker(model_dir: Path, out: Path) -> Path:
    """A copy of a tiny SD1 model with a tiny random safety checker (SD 1.x's real class)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    components = {**pipe.components, "safety_checker": checker, "feature_extractor": extractor}
    StableDiffusionPipeline(**components, requires_safety_checker=True).save_pretrained(out)
    return out


@cpu_only
def test_safety_checker_is_off_by_default_and_blacked_out_images_are_counted_never_written(tiny_sd1, tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    model = add_tiny_safety_checker(tiny_sd1, tmp_path / "sd1-checker")
    count = 8
    plain_run, plain_paths, _ = make_run(tmp_path / "plain", model, count, batch_size=1)
    plain = generate_images(plain_run, SKILL, plain_paths)
    assert plain.images == count and plain.blacked_out == []  # the model has a checker; it is off by default

    # Set the checker's threshold inside the widest gap of the images' concept similarities, computed
    # here from the written images, so that we know which images it must black out.
    checker = StableDiffusionSafetyChecker.from_pretrained(model / "safety_checker")
    extractor = CLIPImageProcessor.from_pretrained(model / "feature_extractor")
    records = read_image_dataset(plain_paths.images(SKILL))
    with torch.no_grad():
        clip_input = extractor([Image.open(r.path) for r in records], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        similarity = torch.nn.functional.cosine_similarity(embeds, checker.concept_embeds[:1]).numpy()
    order = np.sort(similarity)
    gap = int(np.argmax(np.diff(order)))
    assert order[gap + 1] - order[gap] > 0.01, "no clear gap to put a threshold in"
    threshold = float(order[gap] + order[gap + 1]) / 2
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(10.0)
    checker.save_pretrained(model / "safety_checker")
    expected = sorted(r.extra["prompt_id"] for r, s in zip(records, similarity) if s > threshold)
    assert 0 < len(expected) < count

    checked_run, checked_paths, _ = make_run(tmp_path / "checked", model, count, batch_size=1, safety_checker=True)
    stats = generate_images(checked_run, SKILL, checked_paths)
    folder = checked_paths.images(SKILL)
    assert stats.blacked_out == expected
    assert stats.images == stats.generated == count - len(expected)
    for prompt_id in expected:
        assert not (folder / f"{prompt_id:06d}.png").exists() and not (folder / f"{prompt_id:06d}.txt").exists()
    kept = read_image_dataset(folder)
    assert sorted(r.extra["prompt_id"] for r in kept) == sorted(set(range(count)) - set(expected))
    for record in kept:  # the images that passed are the same as without the checker
        assert record.path.read_bytes() == (plain_paths.images(SKILL) / record.path.name).read_bytes()


def test_safety_checker_on_for_a_model_without_one_is_a_clear_error(tiny_model_dirs, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_model_dirs["sd2"], 1, safety_checker=True)
    with pytest.raises(ModelError, match="has no safety checker.*images.safety_checker = false"):
        generate_images(run, SKILL, paths)


# ---------------------------------------------------------------------------------- bad input


def test_missing_prompt_file_names_the_file_and_the_next_step(tiny_sd1, tmp_path):
    run = load_run_recipe(write_recipe(tmp_path, tiny_sd1))
    paths = RunPaths(tmp_path / "run")
    with pytest.raises(DatasetError, match=r"prompts\.jsonl: prompt file not found; run `selma prompts`"):
        generate_images(run, SKILL, paths)


def test_malformed_prompt_line_is_named_by_line_number(tiny_sd1, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_sd1, 3)
    lines = paths.prompts(SKILL).read_text().splitlines()
    lines[1] = '{"id": 1, "prompt": "two cats"'
    paths.prompts(SKILL).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"prompts\.jsonl:2: not valid JSON"):
        generate_images(run, SKILL, paths)


def test_only_heldout_prompts_is_a_clear_error(tiny_sd1, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_sd1, 2, heldout=(0, 1))
    with pytest.raises(DatasetError, match="no prompts with split 'train'"):
        generate_images(run, SKILL, paths)


@pytest.mark.parametrize(
    "kind", ["no_model_index", "unknown_architecture", "ckpt", "bin", "single_file_without_config"]
)
def test_unusable_models_are_refused_before_any_work(kind, tmp_path):
    model = tmp_path / "model"
    if kind == "no_model_index":
        model.mkdir()
        (model / "unet").mkdir()
        expected = "no model_index.json"
    elif kind == "unknown_architecture":
        model.mkdir()
        (model / "model_index.json").write_text(
            json.dumps({"_class_name": "HunyuanDiTPipeline", "transformer": ["diffusers", "HunyuanDiT2DModel"]})
        )
        expected = r"none of the supported families; expected SD 1.x, SD 2.x, SDXL, SD 3, Flux, .* or FLUX.2 \[klein\]"
    elif kind in ("ckpt", "bin"):
        model = tmp_path / f"model.{kind}"
        model.write_bytes(b"\x80\x04not really a pickle")
        expected = "pickle files.*only from .safetensors"
    else:
        model = tmp_path / "model.safetensors"
        model.write_bytes(b"{}")
        expected = "single-file checkpoint; set images.single_file_config"
    run, paths, _ = make_run(tmp_path, "tiny:sd1", 1, images_model=model)
    with pytest.raises(ModelError, match=expected):
        generate_images(run, SKILL, paths)
    assert not paths.images(SKILL).exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("images.steps=0", r"overrides 'images\.steps=0': expected 1 or more"),
        ("images.resolution=30", r"overrides 'images\.resolution=30': must be a multiple of 8"),
        ("images.guidance_scale=-1", r"images\.guidance_scale"),
        ("images.stpes=3", r"overrides 'images\.stpes=3': unknown key; did you mean 'steps'"),
    ],
)
def test_out_of_range_image_settings_are_recipe_errors(override, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        load_run_recipe(write_recipe(tmp_path, "tiny:sd1"), [override])


def test_cli_prints_bad_input_without_traceback_and_exits_2(cli, tiny_sd1, tmp_path):
    recipe = write_recipe(tmp_path, tiny_sd1)
    prompt_file = RunPaths(tmp_path / "run").prompts(SKILL)
    prompt_file.parent.mkdir(parents=True)
    prompt_file.write_text('{"id": 0, "prompt": "one cat"}\n{"id": 0, "prompt": "two cats"}\n')
    result = cli("images", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "id 0 appears twice" in result.stderr and "Traceback" not in result.stderr
    assert not RunPaths(tmp_path / "run").images(SKILL).exists()


def test_unknown_skill_is_a_recipe_error_listing_the_skills(tiny_sd1, tmp_path):
    run, paths, _ = make_run(tmp_path, tiny_sd1, 1)
    with pytest.raises(RecipeError, match=r"has no skill 'colour'; its skills are \['count'\]"):
        generate_images(run, "colour", paths)

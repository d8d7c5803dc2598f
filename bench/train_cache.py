"""Benchmark: CPU seconds per optimizer step of `selma train` with and without the latent/text cache.

Both runs train the same LoRA (rank 128 on the attention projections, as the paper) at the same
batch on a model with SD 1.5 layer widths (UNet 320/640/1280/1280, CLIP-L-sized text encoder, SD
VAE) and random weights, at a small resolution so it fits in a few minutes on a CPU: on the tiny
model the ratio would only reflect its config. Each run is a separate process, so its peak RSS is
its own; the cached run starts from a cache built beforehand (in a third process), so it never
loads the VAE or the text encoder.

Steps are timed in CPU seconds of the training process, with one torch thread: on a shared
machine wall time swings by several times with other load (an oversubscribed thread pool
especially), CPU time measures the work a step does. Prints CPU s/step (the median after the
warm-up step) and peak RSS of both, and as its last line `train_cache ratio=R goal=>=1.3` with
R = (CPU s/step without cache) / (CPU s/step with cache).

    python bench/train_cache.py [--resolution 256] [--batch 2] [--steps 5] [--model-dir DIR]

``--flux``: the same measurement on the tiny Flux model (`tiny:flux`, rank 8 on the joint
attention, the recipe's Flux defaults) at 32 px, batch 4, 6 steps; last line `train_cache_flux
ratio=R goal=>=1.3`. On the tiny model the T5's 512-token prompts and the VAE are a large share of
a step, so the ratio says what the cache saves on the Flux code path (packed latents, T5 + pooled
CLIP conditioning), not on a real FLUX.1 (there the transformer dominates; bench/gpu.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GOAL = 1.3
SKILL = "bench"


def build_sd15_sized_model(folder: Path) -> None:
    """Random SD 1.5-sized parts in float32 (what training loads on a CPU: an fp16 file would be
    upcast while loading, and that transient copy would dominate both peaks), tiny tokenizer."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from selma_toolkit.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # SD 1.5 defaults
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14 text tower, full vocabulary size
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def write_dataset(folder: Path, count: int, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"{i % 3 + 1} red cubes next to a blue ball on a wooden table"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_phase(args: argparse.Namespace) -> None:
    """In a child process: train (or only build the cache) and print step seconds and peak RSS as JSON."""
    import resource
    import time

    import torch

    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import RunRecipe
    from selma_toolkit.train import train_expert

    run = RunRecipe.model_validate(
        {
            "name": "bench",
            "base_model": args.model_dir,
            "skills": [{"name": SKILL, "instruction": "x", "seeds": ["a", "b", "c"]}],
            "images": {"resolution": args.resolution, **({"guidance_scale": 3.5} if args.flux else {})},
            "train": {
                "rank": 8 if args.flux else 128,
                "batch_size": args.batch,
                "steps": 1 if args.phase == "build" else args.steps,
                "checkpoint_every": 10_000,
                "cache": args.phase != "direct",
                "mixed_precision": "no",
            },
        }
    )
    torch.set_num_threads(1)
    marks: list[float] = []  # CPU time at the end of each step: differences are whole steps after the first
    train_expert(
        run,
        SKILL,
        RunPaths(Path(args.run_dir)),
        progress=lambda event: marks.append(time.process_time()) if event.kind == "step" else None,
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": [b - a for a, b in itertools.pairwise(marks)], "peak_rss_mib": peak_mib}))


def child(phase: str, run_dir: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--run-dir",
        str(run_dir),
        "--model-dir",
        str(args.model_dir),
        "--resolution",
        str(args.resolution),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
    ]
    command += ["--flux"] if args.flux else []
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"broken: the {phase} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 256 px (32x32 latents): small enough for minutes on a CPU, large enough that the UNet's
    # compute, not reading its weights, dominates a step, as it does at 512 px on a GPU.
    parser.add_argument(
        "--flux", action="store_true", help="measure the tiny Flux model instead (defaults 32 px, batch 4, 6 steps)"
    )
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, help="optimizer steps per run; the first is warm-up (default 5; --flux 6)")
    parser.add_argument(
        "--model-dir", help="where the SD 1.5-sized model is (built there if missing; default: a temp folder)"
    )
    parser.add_argument("--phase", choices=["build", "cached", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (32, 4, 6) if args.flux else (256, 2, 5)
    args.resolution, args.batch, args.steps = (
        given or default for given, default in zip((args.resolution, args.batch, args.steps), defaults)
    )
    if args.phase:
        return run_phase(args)
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the first step is warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.model_dir = Path(args.model_dir or root / ("tiny-flux" if args.flux else "sd15-sized"))
        if args.flux and not (args.model_dir / "model_index.json").is_file():
            from selma_toolkit.tiny import create_tiny_model

            create_tiny_model(args.model_dir, "flux")
        elif not (args.model_dir / "model_index.json").is_file():
            print(f"building a random SD 1.5-sized model in {args.model_dir} ...", flush=True)
            build_sd15_sized_model(args.model_dir)
        cached_run, direct_run = root / "cached", root / "direct"
        for run in (cached_run, direct_run):
            write_dataset(run / "skills" / SKILL / "images", 8, args.resolution)
        child("build", cached_run, args)
        # Start the measured run fresh, keeping only the cache the build run wrote.
        shutil.rmtree(cached_run / "skills" / SKILL / "train" / "checkpoints")
        os.remove(cached_run / "skills" / SKILL / "train" / "loss.jsonl")
        cached = child("cached", cached_run, args)
        direct = child("direct", direct_run, args)
    per_step = {name: statistics.median(result["seconds"]) for name, result in (("cached", cached), ("direct", direct))}
    for name, key, result in (("with cache", "cached", cached), ("without cache", "direct", direct)):
        print(
            f"{name:>14}: {per_step[key]:.4f} CPU s/step (median of {len(result['seconds'])}; "
            f"all {[round(x, 2) for x in result['seconds']]}), peak RSS {result['peak_rss_mib']:.0f} MiB"
        )
    less = "less" if cached["peak_rss_mib"] < direct["peak_rss_mib"] else "NOT less"
    print(f"the cached run needs {less} memory: {cached['peak_rss_mib']:.0f} vs {direct['peak_rss_mib']:.0f} MiB")
    name = "train_cache_flux" if args.flux else "train_cache"
    print(f"{name} ratio={per_step['direct'] / per_step['cached']:.2f} goal=>={GOAL}")


if __name__ == "__main__":
    main()

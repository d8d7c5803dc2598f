"""Benchmark: CPU seconds per optimizer step of `selma train` on the tiny Flux model (`tiny:flux`),
with and without the latent / text cache.

The same expert (the recipe defaults for Flux: LoRA on the joint attention, to_q/to_k/to_v/to_out.0
and add_q_proj/add_k_proj/add_v_proj/to_add_out) is trained at the same batch twice, each run in
its own process: once from a latent + text cache built beforehand in a third process (the run
never loads the VAE, CLIP-L or the T5), once encoding every batch through them. On the tiny model
the T5's 512-token prompts and the VAE are a large share of a step, so the ratio says what the
cache saves on the Flux code path (packed latents, T5 + pooled CLIP conditioning), not on a real
FLUX.1 (there the 12B transformer dominates; bench/gpu.py measures real sizes).

Steps are timed in CPU seconds of the training process with one torch thread (wall time on a
shared machine swings with other load). Prints the median CPU s/step after the warm-up step of
both runs and, as its last line, `train_cache_flux ratio=R goal=>=1.3` with
R = (CPU s/step without cache) / (CPU s/step with cache).

    python bench/train_cache_flux.py [--resolution 32] [--batch 4] [--steps 6]
"""

from __future__ import annotations

import argparse
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
    """In a child process: train (or only build the cache) and print the step CPU seconds as JSON."""
    import time

    import torch

    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import RunRecipe
    from selma_toolkit.train import train_expert

    run = RunRecipe.model_validate({
        "name": "bench", "base_model": args.model_dir,
        "skills": [{"name": SKILL, "instruction": "x", "seeds": ["a", "b", "c"]}],
        "images": {"resolution": args.resolution, "guidance_scale": 3.5},
        "train": {"rank": 8, "batch_size": args.batch, "steps": 1 if args.phase == "build" else args.steps,
                  "checkpoint_every": 10_000, "cache": args.phase != "direct", "mixed_precision": "no"},
    })
    torch.set_num_threads(1)
    marks: list[float] = []
    train_expert(run, SKILL, RunPaths(Path(args.run_dir)),
                 progress=lambda event: marks.append(time.process_time()) if event.kind == "step" else None)
    print(json.dumps({"seconds": [b - a for a, b in zip(marks, marks[1:])]}))


def child(phase: str, run_dir: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--run-dir", str(run_dir), "--model-dir", str(args.model_dir),
               "--resolution", str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"broken: the {phase} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is warm-up")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=["build", "cached", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return run_phase(args)
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the first step is warm-up)")
    from selma_toolkit.tiny import create_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.model_dir = create_tiny_model(root / "tiny-flux", "flux")
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
        print(f"{name:>14}: {per_step[key]:.4f} CPU s/step (median of {len(result['seconds'])}; "
              f"all {[round(x, 3) for x in result['seconds']]})")
    print(f"train_cache_flux ratio={per_step['direct'] / per_step['cached']:.2f} goal=>={GOAL}")


if __name__ == "__main__":
    main()

"""Benchmark: images per second of `selma images` at batch 1 versus batch 8 on the tiny model.

Both are measured in the same run, through the real stage (generate_images: pipeline, seeding,
atomic PNG + caption writes, metadata), with model loading excluded. Each round draws the same
images at batch 1 and then at batch 8, back to back, and gives one ratio; the median over the
rounds is reported, so load from other programs on a shared machine, which comes and goes,
weighs on both sides of a ratio alike. Prints as its last line `images_batch ratio=R goal=>=G`
where R = (images/s at batch 8) / (images/s at batch 1).

    python bench/images_batch.py [--model tiny:sd1] [--images 8] [--rounds 5] [--resolution 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import tomli_w

from selma_toolkit.images import generate_images
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import load_run_recipe

GOAL = 1.3
SKILL = "bench"


def images_per_second(root: Path, model: str, count: int, batch_size: int, resolution: int, steps: int) -> float:
    """Draw ``count`` images into a fresh run folder under ``root``; the stage's drawing rate."""
    recipe = root / f"batch{batch_size}.toml"
    recipe.write_text(
        tomli_w.dumps(
            {
                "name": "bench",
                "base_model": model,
                "skills": [{"name": SKILL, "instruction": "x", "seeds": ["a", "b", "c"]}],
                "images": {"steps": steps, "resolution": resolution, "batch_size": batch_size},
            }
        )
    )
    paths = RunPaths(root / f"run-batch{batch_size}")
    prompt_file = paths.prompts(SKILL)
    prompt_file.parent.mkdir(parents=True)
    prompt_file.write_text(
        "".join(
            json.dumps({"id": i, "skill": SKILL, "prompt": f"{i % 5 + 1} red cubes next to a blue ball, view {i}"})
            + "\n"
            for i in range(count)
        )
    )
    stats = generate_images(load_run_recipe(recipe), SKILL, paths)
    if stats.generated != count:
        raise SystemExit(f"broken: drew {stats.generated} of {count} images")
    return stats.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:sd1")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "warmup").mkdir()
        # First calls pay one-off costs (kernel selection, allocator); neither measurement should.
        images_per_second(root / "warmup", args.model, 2, 1, args.resolution, 2)
        for round_index in range(args.rounds):
            rates = {}
            for batch_size in (1, 8):
                folder = root / f"round{round_index}-batch{batch_size}"
                folder.mkdir()
                rates[batch_size] = images_per_second(
                    folder, args.model, args.images, batch_size, args.resolution, args.steps
                )
            ratios.append(rates[8] / rates[1])
            print(
                f"round {round_index + 1}: batch 1 {rates[1]:.2f} images/s, batch 8 {rates[8]:.2f} images/s, "
                f"ratio {ratios[-1]:.2f}",
                file=sys.stderr,
            )
    print(f"images_batch ratio={statistics.median(ratios):.2f} goal=>={GOAL}")


if __name__ == "__main__":
    main()

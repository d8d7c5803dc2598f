"""Benchmark: the shapes-world study's time per seed, against the SELMA pipeline alone.

One replicate (`run_replicate`, one seed) of a reduced `toy-study-web` recipe is run twice in the
same process, into fresh folders: once with the data kind "selma" only (prompts, self-generated
images, the three experts and the mixture LoRA, the merges, evaluation: what `selma run` does,
plus the mixture baseline) and once with every data kind of the study (ground truth, two
filters over extra candidates, guidance 1 and 8, a teacher base). The ratio says what the
study's extra variants cost per seed; each extra kind trains three more experts, so about 1 + 6 x
(expert share of the pipeline) is expected. Prints the seconds of both and, as its last line,
`toyworld_study ratio=R goal=<=6`.

    python bench/toyworld_study.py [--prompts 12] [--train-steps 20] [--eval-prompts 6] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

GOAL = 6.0


def replicate_seconds(out: Path, kinds: tuple[str, ...], args) -> float:
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.study import StudyOptions, run_replicate

    run = load_run_recipe(
        "toy-study-web",
        [
            *(f"skills.{s}.num_prompts={args.prompts}" for s in ("toy-count", "toy-color", "toy-spatial")),
            f"train.steps={args.train_steps}",
            f"train.checkpoint_every={args.train_steps}",
            f"evaluate.prompts_per_skill={args.eval_prompts}",
            "evaluate.seeds=[0]",
            "evaluate.report_prompts_per_skill=1",
        ],
    )
    options = StudyOptions(kinds=kinds, filter_min_score=0.0, filter_candidates=2, teacher="toy:shapes")
    began = time.perf_counter()
    run_replicate(run, out, 0, options)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12, help="train prompts per skill")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=6, help="held-out prompts per skill")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from selma_toolkit.toyworld.study_kinds import KINDS

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        alone = replicate_seconds(Path(tmp) / "selma-only", ("selma",), args)
        full = replicate_seconds(Path(tmp) / "every-kind", tuple(KINDS), args)
    print(f"one seed, SELMA pipeline alone: {alone:.1f} s; every study kind ({len(KINDS)}): {full:.1f} s")
    print(f"toyworld_study ratio={full / alone:.2f} goal=<={GOAL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (issue 22, item 2): `selma run` killed with SIGKILL at seeded points, resumed each time.

A small tiny-demo run (32 px, 2 sampling steps, 4 training steps, 2 + 1 prompts per skill: the
suite's `small_tiny_run`) is run once without a kill, then killed at ``--points`` points drawn
from ``--seed`` (on a file appearing, or on a clock) and started again on the same folder after
each kill; a run that ends before its kill completes that folder and the next point starts a new
one. Every folder is compared with the uninterrupted run: prompts, image rows and PNGs,
checkpoints, loss rows, scores and files lost, duplicated or extra, files cut short after a kill,
experts and merges that do not load with the same modules and shapes, `selma status` not saying
the run is complete (tests/support_kill.py, shared with tests/test_kill_resume.py).

    python bench/kill_resume.py [--points 20] [--seed 0] [--train-steps 4] [--keep DIR]

Prints one line per kill point, every problem found, and as its last line
`kill_resume ratio=R goal===0`, R the number of items lost, duplicated, extra or damaged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20, help="kill points")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points")
    parser.add_argument("--train-steps", type=int, default=4, help="training steps per expert (a checkpoint every 2)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    # conftest pins one torch thread for every `selma` process and points SELMA_CACHE / HF_HOME
    # at a temporary folder, as the suite does.
    from conftest import small_tiny_run
    from support_kill import kill_and_resume

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="selma-kill-resume-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        tally = kill_and_resume(
            workdir,
            args.seed,
            args.points,
            small_tiny_run(train_steps=args.train_steps),
            say=lambda line: print(line, flush=True),
        )
    for problem in tally.problems:
        print(f"  {problem}")
    print(
        f"{args.points} points (seed {args.seed}): {tally.kills} kills landed, {tally.finished_before_kill} runs ended "
        f"first; {tally.folders} run folders checked; lost {tally.lost}, duplicated {tally.duplicated}, extra "
        f"{tally.extra}, damaged {tally.damaged}; {time.monotonic() - began:.0f} s"
    )
    print(f"kill_resume ratio={tally.total} goal===0")
    return 0 if tally.total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""bench/judge.py runs (a small size) and prints its ratio line last; its goal lives in the script."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_judge_bench_compares_batched_with_one_question_at_a_time(repo_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(repo_root / "bench" / "judge.py"),
            "--images",
            "3",
            "--questions",
            "2",
            "--batch",
            "6",
            "--rounds",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 1: one at a time" in result.stderr
    assert re.fullmatch(r"judge_batch ratio=\d+\.\d\d goal=>=3", result.stdout.strip().splitlines()[-1])

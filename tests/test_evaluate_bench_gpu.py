"""bench/gpu.py can only measure on a CUDA machine: here its clean refusal without CUDA is checked,
and its --smoke mode runs every measurement's code on the tiny SDXL model and the tiny PaliGemma
judge on the CPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def run_bench(repo_root, *args):
    # One thread: the tiny models gain nothing from more, and on a busy 2-core machine threads spin.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(repo_root / "bench" / "gpu.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_gpu_bench_without_cuda_fails_cleanly_with_a_message(repo_root):
    result = run_bench(repo_root)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--smoke" in result.stderr
    assert "Traceback" not in result.stderr and "ratio=" not in result.stdout


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_measurement_on_the_tiny_sdxl(repo_root):
    result = run_bench(repo_root, "--smoke", "--archs", "sdxl", "--experts", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    for row in (
        "generation 64px",
        "with cache",
        "without cache",
        "runtime adapters",
        "merged fused, unloaded",
        "runtime adapters / merged (fused, unloaded)",
        "judge tiny:paligemma: 16 images x 8 questions",
    ):
        assert any(row in line for line in lines), row
    assert re.fullmatch(r"gpu_fused_overhead ratio=\d+\.\d+ goal=<=1\.01", lines[-1])


def test_gpu_bench_smoke_measures_the_judge_in_images_and_questions_per_second(repo_root):
    result = run_bench(
        repo_root,
        "--smoke",
        "--archs",
        "sd15",
        "--experts",
        "2",
        "--judge-images",
        "3",
        "--judge-questions",
        "2",
        "--judge-batch",
        "4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    [judge] = [line for line in lines if "judge tiny:paligemma: 3 images x 2 questions, batch 4" in line]
    questions, images = re.search(r"(\d+\.\d) questions/s \((\d+\.\d+) images/s\)", judge).groups()
    assert float(questions) == pytest.approx(2 * float(images), rel=0.02)  # two questions per image
    assert re.fullmatch(r"gpu_fused_overhead ratio=\d+\.\d+ goal=<=1\.01", lines[-1])

"""Kill -9 at seeded points and resume (issue 22, item 2): `selma run`, `selma merge` and
`selma hub pull` killed with SIGKILL while they work, then run again. Nothing is lost or duplicated,
and no file cut short by a kill is left where it would later look finished (every write goes to a
hidden temporary file first: selma_toolkit/io.py; Hub downloads to huggingface_hub's
``.incomplete`` blobs). The suite runs 3 points of `selma run`; bench/kill_resume.py runs 20 with
the same code (tests/support_kill.py)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_tiny_run
from support_kill import TEMPORARY, Tally, check_run, kill_and_resume, run_until_killed, torn_files

from selma_toolkit.io import sha256_file

KILLED = -signal.SIGKILL
SELMA = [sys.executable, "-m", "selma_toolkit"]


# ------------------------------------------------------------------------------------- selma run


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory) -> tuple[Path, Tally]:
    """An uninterrupted small run, then 3 seeded kills of another (seed 0: a kill on the clock while
    it draws images, on a new training cache, on a new evaluation image) and its final rerun."""
    workdir = tmp_path_factory.mktemp("kill-resume")
    return workdir, kill_and_resume(workdir, seed=0, points=3, overrides=small_tiny_run(train_steps=4))


def test_selma_run_killed_at_seeded_points_and_resumed_loses_and_duplicates_nothing(killed_runs):
    workdir, tally = killed_runs
    assert tally.kills >= 2, (
        f"the kills must land while the run works ({tally.kills} of 3 did; see {workdir / 'runs.log'})"
    )
    assert tally.folders >= 1 and tally.problems == [] and tally.total == 0, tally.problems


def test_the_resume_check_counts_a_lost_a_duplicated_an_extra_and_a_torn_item(killed_runs, tmp_path):
    # The check above must be able to fail: the uninterrupted run's folder, damaged four ways.
    workdir, _ = killed_runs
    reference = workdir / "reference"
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    prompts = damaged / "skills" / "count-grammar" / "prompts.jsonl"
    lines = prompts.read_text().splitlines(keepends=True)
    prompts.write_text("".join([*lines, lines[0]]))  # a prompt twice
    (damaged / "skills" / "spatial-grammar" / "images" / "000001.png").unlink()  # an image lost
    (damaged / "merged" / "extra.safetensors").write_bytes(
        (damaged / "merged" / "selma.safetensors").read_bytes()[:100]
    )
    tally = Tally()
    check_run(damaged, reference, tally)
    assert tally.duplicated >= 1 and tally.lost >= 1 and tally.extra >= 1, tally.problems
    assert [t.split(" ")[0] for t in torn_files(damaged)] == ["merged/extra.safetensors"]
    assert torn_files(reference) == []


# ----------------------------------------------------------------------------------- selma merge


def big_expert(path: Path, seed: int) -> Path:
    """A LoRA of 64 rank-32 modules (about 5 MiB), so that writing a merge takes long enough to be killed in."""
    from selma_toolkit.lora import LoraModule, LoraWeights, save_lora

    generator = torch.Generator().manual_seed(seed)
    modules = {
        f"unet.down_blocks.0.attentions.{i}.transformer_blocks.0.attn1.to_q": LoraModule(
            down=torch.randn(32, 320, generator=generator), up=torch.randn(320, 32, generator=generator), alpha=32.0
        )
        for i in range(64)
    }
    return save_lora(LoraWeights(modules=modules), path)


def same_lora(path: Path, reference: Path) -> bool:
    """The same tensors and metadata (not bytes: the order of metadata keys varies from process to process)."""
    from selma_toolkit.lora import read_safetensors

    (tensors, metadata), (wanted, wanted_metadata) = read_safetensors(path), read_safetensors(reference)
    return (
        metadata == wanted_metadata
        and tensors.keys() == wanted.keys()
        and all(torch.equal(tensors[k], wanted[k]) for k in wanted)
    )


def test_selma_merge_killed_at_seeded_points_never_leaves_a_file_that_looks_like_a_merge(tmp_path):
    big_expert(tmp_path / "a.safetensors", 1)
    big_expert(tmp_path / "b.safetensors", 2)
    merge = [*SELMA, "merge", "a.safetensors", "b.safetensors", "--out"]
    began = time.monotonic()
    assert (
        subprocess.run([*merge, "reference.safetensors"], cwd=tmp_path, capture_output=True, timeout=300).returncode
        == 0
    )
    seconds = time.monotonic() - began
    reference = tmp_path / "reference.safetensors"
    rng, kills, log = random.Random(0), 0, tmp_path.parent / f"{tmp_path.name}-merge.log"
    for pattern in (".m.safetensors.*.tmp", None, ".m.safetensors.*.tmp", None):
        # Half the points 0-50 ms after the merge's temporary file appears (while it is written), half
        # on the clock; the delays drawn from the seed.
        delay = rng.uniform(0.0, 0.05) if pattern else rng.uniform(0.5, seconds)
        status = run_until_killed([*merge, "m.safetensors"], pattern, delay, tmp_path, log, cwd=tmp_path)
        kills += status == KILLED
        assert status in (KILLED, 0), log.read_text()[-2000:]
        names = {p.name for p in tmp_path.iterdir()} - {"a.safetensors", "b.safetensors", "reference.safetensors"}
        assert all(TEMPORARY.match(n) for n in names - {"m.safetensors"}), names  # only hidden temporaries
        if "m.safetensors" in names:  # a merge that is there is the whole merge
            assert same_lora(tmp_path / "m.safetensors", reference)
    assert kills >= 2, f"the kills must land while merging ({kills} of 4 did)"
    assert subprocess.run([*merge, "m.safetensors"], cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    assert same_lora(tmp_path / "m.safetensors", reference)  # the same merge as one never killed


# -------------------------------------------------------------------------------- selma hub pull


def test_selma_hub_pull_killed_at_seeded_points_leaves_no_partial_file_that_looks_valid(tmp_path):
    from safetensors.torch import save
    from support_hub import OlahHub, commit_files, init_repo

    olah = OlahHub(tmp_path / "hub").start()
    try:
        data = save(
            {
                "lora_unet_conv_in.lora_down.weight": torch.randn(2048, 4096),  # 32 MiB: a download to kill in
                "lora_unet_conv_in.lora_up.weight": torch.randn(8, 2048),
                "lora_unet_conv_in.alpha": torch.tensor(2.0),
            }
        )
        commit_files(init_repo(olah.mirrors, "alice/big"), {"big.safetensors": data}, "a big expert")
        wanted = hashlib.sha256(data).hexdigest()
        home, loras = tmp_path / "hf-home", tmp_path / "loras"
        pull = [*SELMA, "hub", "pull", "alice/big", "--to", str(loras)]
        env = {**os.environ, "HF_ENDPOINT": olah.endpoint, "HF_HOME": str(home)}
        cache = home / "hub" / "models--alice--big"

        def start_over() -> None:  # a finished pull leaves nothing to kill in: the next point starts from nothing
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(loras, ignore_errors=True)

        began = time.monotonic()
        assert subprocess.run(pull, env=env, capture_output=True, timeout=300).returncode == 0
        seconds = time.monotonic() - began
        start_over()
        rng, kills, log = random.Random(0), 0, tmp_path / "pull.log"
        for kind in (0, 1, 2, 0, 1):
            # While downloading (0-0.3 s after the .incomplete blob appears), while copying into --to
            # (0-20 ms after its hidden temporary appears), on the clock; the delays drawn from the seed.
            pattern = ["hf-home/hub/models--alice--big/blobs/*.incomplete", "loras/.big.safetensors.*.tmp", None][kind]
            delay = rng.uniform(*[(0.0, 0.3), (0.0, 0.02), (0.5, seconds)][kind])
            status = run_until_killed(pull, pattern, delay, tmp_path, log, env=env)
            kills += status == KILLED
            assert status in (KILLED, 0), log.read_text()[-2000:]
            # What a later command would take as a finished file is the whole file: the cache's
            # snapshot link and blobs (not the .incomplete one), and what is in --to (not hidden temporaries).
            copied = [p for p in loras.glob("*") if not TEMPORARY.match(p.name)]
            assert [p.name for p in copied] in ([], ["big.safetensors"])
            blobs = [p for p in cache.glob("blobs/*") if not p.name.endswith(".incomplete")]
            finished = [*cache.glob("snapshots/*/big.safetensors"), *blobs, *copied]
            assert all(sha256_file(p) == wanted for p in finished), [p for p in finished if sha256_file(p) != wanted]
            if status == 0:
                start_over()
        assert kills >= 3, f"the kills must land while pulling ({kills} of 5 did)"
        again = subprocess.run(pull, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        assert (
            sha256_file(loras / "big.safetensors") == wanted and Path(again.stdout.strip()) == loras / "big.safetensors"
        )
    finally:
        olah.stop()

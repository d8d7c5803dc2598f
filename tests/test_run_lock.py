"""One process at a time in a run folder (issue 22, item 4): a second `selma run` on a folder in use
is refused with a message naming the folder and the holder; the lock of a killed run never blocks
(an OS lock, io.folder_lock) and is taken over with a log line; the first run's outputs stay whole.

The end-to-end test runs `selma run tiny-demo` made small (32 px, 2 sampling steps, 4 training
steps, 2 + 1 prompts per skill) as real processes, as a user would start them from two shells."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN_SKILLS, run_cli, small_tiny_run

from selma_toolkit.errors import FolderLockedError, OutputError
from selma_toolkit.io import LOCK_NAME, folder_lock

SKILLS = TINY_RUN_SKILLS
SMALL_RUN = small_tiny_run(train_steps=4)
# Wide rich output: a log line is not wrapped, so tests can find its words on one line.
WIDE = {"COLUMNS": "400"}

HOLDER = textwrap.dedent("""
    import sys, time
    from selma_toolkit.io import folder_lock
    with folder_lock(sys.argv[1], "test holder"):
        print("held", flush=True)
        time.sleep(600)
""")


def run_args(out: Path) -> list[str]:
    args = ["run", "tiny-demo", "--out", str(out)]
    for override in SMALL_RUN:
        args += ["--set", override]
    return args


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def start_holder(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until killed (the lowest entry point: io.folder_lock)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def wait_for_holder(folder: Path, pid: int, process: subprocess.Popen, timeout: float = 300) -> dict:
    """The lock record of ``folder`` once process ``pid`` has written it (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            record = json.loads((folder / LOCK_NAME).read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            record = None
        if record and record.get("pid") == pid:
            return record
        time.sleep(0.05)
    pytest.fail(f"process {pid} never took the lock of {folder} (exit code {process.poll()})")


# ------------------------------------------------------------------------------ the lock itself


def test_second_holder_in_another_process_is_refused_naming_the_folder_pid_and_host(tmp_path):
    folder = tmp_path / "run"
    holder = start_holder(folder)
    try:
        with pytest.raises(FolderLockedError) as refused, folder_lock(folder, "selma run"):
            pytest.fail("the lock was taken twice")
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{folder}: this run folder is in use by another process")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "`test holder`" in message
        assert "Wait for it to finish or stop it" in message
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_released_cleanly_leaves_an_empty_record_and_is_taken_again_without_a_warning(tmp_path, caplog):
    folder = tmp_path / "run"
    with folder_lock(folder, "selma run") as lock:
        record = json.loads(lock.read_text())
        assert record["pid"] == os.getpid() and record["command"] == "selma run"
    assert lock.read_text() == ""
    with caplog.at_level(logging.WARNING, logger="selma_toolkit.io"), folder_lock(folder, "selma run"):
        pass
    assert not caplog.records


def test_lock_of_a_killed_process_never_blocks_and_is_taken_over_with_a_log_line(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid  # the record it never cleared
    with caplog.at_level(logging.WARNING, logger="selma_toolkit.io"), folder_lock(folder, "selma run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    [line] = [r.getMessage() for r in caplog.records]
    assert f"{folder}: taking over the lock left by a process that ended without releasing it (pid {holder.pid}" in line


def test_lock_in_a_folder_under_a_file_is_an_output_error_naming_the_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with (
        pytest.raises(
            OutputError,
            match="^" + re.escape(f"{blocker}/run: cannot be created because {blocker} is a file, not a folder"),
        ),
        folder_lock(blocker / "run", "selma run"),
    ):
        pass


def test_selma_evaluate_on_a_run_folder_in_use_is_refused_naming_the_holder(tmp_path):
    from selma_toolkit.recipe import load_run_recipe, write_resolved_recipe

    folder = tmp_path / "run"
    write_resolved_recipe(load_run_recipe("tiny-demo", ["evaluate.select_checkpoints=false"]), folder)
    holder = start_holder(folder)
    try:
        result = run_cli("evaluate", str(folder), env=WIDE, timeout=300)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: {folder}: this run folder is in use by another process (pid {holder.pid} on host")
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "recipe.sha256", "recipe.toml"]  # nothing written


# --------------------------------------------------------------------------- two real selma runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Start `selma run` (A); once it holds the folder's lock, start the same command (B) and let it
    fail; let A finish. Then leave a killed holder's lock behind and run the command again (C)."""
    root = tmp_path_factory.mktemp("lock") / "run"
    log = root.parent / "a.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            [sys.executable, "-m", "selma_toolkit", *run_args(root)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **WIDE},
        )
        try:
            record = wait_for_holder(root, first.pid, first)
            second = run_cli(*run_args(root), env=WIDE, timeout=300)
            first_running_after_second = first.poll() is None
            first.wait(timeout=900)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait(timeout=30)
    lock_after_first = (root / LOCK_NAME).read_text()
    stale = start_holder(root)
    stale.send_signal(signal.SIGKILL)
    stale.wait(timeout=30)
    third = run_cli(*run_args(root), env=WIDE, timeout=600)
    return {
        "root": root,
        "first": first,
        "first_log": log.read_text(),
        "record": record,
        "second": second,
        "first_running_after_second": first_running_after_second,
        "lock_after_first": lock_after_first,
        "stale_pid": stale.pid,
        "third": third,
    }


def test_second_selma_run_on_a_folder_in_use_is_refused_with_one_line_naming_folder_and_holder(two_runs):
    second, first = two_runs["second"], two_runs["first"]
    assert two_runs["first_running_after_second"], "the first run ended before the second could be refused"
    assert second.returncode == 1 and "Traceback" not in second.stderr
    [line] = error_lines(second.stderr)
    assert line.startswith(f"error: {two_runs['root']}: this run folder is in use by another process")
    assert f"pid {first.pid} on host {socket.gethostname()}, `selma run`" in line
    assert two_runs["record"]["host"] == socket.gethostname()


def test_first_run_finishes_whole_beside_a_refused_second_and_releases_its_lock(two_runs):
    root = two_runs["root"]
    assert two_runs["first"].returncode == 0, two_runs["first_log"][-3000:]
    assert two_runs["lock_after_first"] == ""
    status = run_cli("status", str(root))
    assert status.returncode == 0 and "the run is complete" in status.stdout, status.stdout
    from selma_toolkit.lora import load_lora

    for skill in SKILLS:
        assert load_lora(root / "experts" / f"{skill}.safetensors").modules
    assert load_lora(root / "merged" / "selma.safetensors").modules
    no_temporaries = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not no_temporaries


def test_rerun_after_a_killed_holder_takes_the_lock_over_with_a_log_line_and_skips_every_stage(two_runs):
    third = two_runs["third"]
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the lock left by a process that ended without releasing it" in third.stderr
    assert f"pid {two_runs['stale_pid']} on host {socket.gethostname()}, `test holder`" in third.stderr
    assert not re.search(r"^run  ", third.stderr, re.M)  # every stage was complete: skipped, none redone
    assert re.search(r"^skip evaluate", third.stderr, re.M)
    assert (two_runs["root"] / LOCK_NAME).read_text() == ""


# ------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_says_the_run_was_interrupted_and_that_the_same_command_resumes(tmp_path):
    """A real SIGINT (what Ctrl-C sends) to `selma run` once its first image exists: exit code 130, one
    line naming the run folder and the command to run again, the lock released; that command finishes
    the run, skipping the stages that were complete."""
    root = tmp_path / "run"
    command = [sys.executable, "-m", "selma_toolkit", *run_args(root)]
    # A shell starts a background job (`pytest ... &`) with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the run is given the default disposition, as in a terminal.
    started = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **WIDE},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not list(root.glob("skills/*/images/*.png")) and started.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.poll() is None, "the run ended before it could be interrupted"
        started.send_signal(signal.SIGINT)
        _, stderr = started.communicate(timeout=300)
    finally:
        if started.poll() is None:
            started.kill()
            started.wait(timeout=30)
    assert started.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert line == (
        f"interrupted: what finished is kept in {root}; run the same command again to resume: "
        f"selma {' '.join(run_args(root))}"
    )
    assert (root / LOCK_NAME).read_text() == ""
    again = run_cli(*run_args(root), env=WIDE, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^skip prompts count-grammar", again.stderr, re.M)  # finished before the interrupt: kept
    assert "report:" in again.stdout

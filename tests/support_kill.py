"""Kill -9 at seeded points of `selma run`, then resume, and count what was lost or duplicated.

Shared by tests/test_kill_resume.py (a few points) and bench/kill_resume.py (20 points). A kill
point is drawn from a seed: either "when one more file matching a pattern appears" (a prompt
file, an image, a checkpoint, an expert, a merge, an evaluation image), then a short random delay,
or "after a random number of seconds". Each killed run is started again on the same folder until
it finishes; a run that finishes before its kill uses up that folder and the next point starts a
new one. Every finished folder is compared with an uninterrupted run of the same recipe.

What counts (every count should be 0): prompts lost or duplicated (prompts.jsonl ids), image rows
and PNGs lost, duplicated or left unlisted (metadata.jsonl), checkpoints, loss rows and scores lost
or duplicated, files missing or extra beside the uninterrupted run's, and after every kill any file
that looks finished but does not read back (a safetensors, PNG, JSON or JSON-lines file cut short).
Experts and merges are loaded with selma_toolkit.lora and must have the uninterrupted run's
modules and shapes.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What a run writes, in about the order it writes it (globs under the run folder).
EVENTS = (
    "skills/*/prompts.jsonl",
    "skills/*/images/*.png",
    "skills/*/train/cache/*/index.json",
    "skills/*/train/checkpoints/step-*/state.json",
    "experts/*.safetensors",
    "merged/*.safetensors",
    "eval/images/*/*/*.png",
    "report/index.html",
)
# Hidden leftovers of a write cut short: never matched by a stage's globs, so never taken as done.
TEMPORARY = re.compile(r"^\..*\.(tmp|partial|old)$")
LOCK = ".selma.lock"


@dataclass(frozen=True)
class KillPoint:
    """Kill ``delay`` s after one more file matches an event's glob than at the start, the event
    picked by ``event`` (a draw in [0, 1)) among those the run has still to write (so that the kill
    lands); or, with no event, ``delay`` s after the start."""

    event: float | None
    delay: float

    def pattern(self, root: Path, reference: Path) -> str | None:
        """The glob to wait for in ``root``: one of the events with fewer files than in ``reference``."""
        if self.event is None:
            return None
        pending = [e for e in EVENTS if _count(root, e) < _count(reference, e)] or list(EVENTS)
        return pending[int(self.event * len(pending))]


@dataclass
class Tally:
    """What went wrong, summed over every checked run folder; ``total`` is the bench's ratio."""

    lost: int = 0
    duplicated: int = 0
    extra: int = 0
    damaged: int = 0
    problems: list[str] = field(default_factory=list)
    kills: int = 0
    finished_before_kill: int = 0
    folders: int = 0

    @property
    def total(self) -> int:
        return self.lost + self.duplicated + self.extra + self.damaged

    def add(self, kind: str, count: int, what: str) -> None:
        if count:
            setattr(self, kind, getattr(self, kind) + count)
            self.problems.append(f"{kind} {count}: {what}")

    def items(self, what: str, found: Iterable, wanted: Iterable) -> None:
        """Compare a list of item keys with the uninterrupted run's: lost, duplicated, extra."""
        found, wanted = list(found), set(wanted)
        counts = Counter(found)
        self.add("lost", len(wanted - set(found)), f"{what}: {sorted(map(str, wanted - set(found)))[:5]}")
        self.add(
            "duplicated", sum(c - 1 for c in counts.values()), f"{what}: {[k for k, c in counts.items() if c > 1][:5]}"
        )
        self.add("extra", len(set(found) - wanted), f"{what}: {sorted(map(str, set(found) - wanted))[:5]}")


def run_command(root: Path, overrides: Sequence[str]) -> list[str]:
    args = [sys.executable, "-m", "selma_toolkit", "run", "tiny-demo", "--out", str(root)]
    for override in overrides:
        args += ["--set", override]
    return args


def reference_run(root: Path, overrides: Sequence[str], log: Path) -> float:
    """Run the recipe once without a kill; return its wall time."""
    start = time.monotonic()
    with open(log, "ab") as out:
        result = subprocess.run(run_command(root, overrides), stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {result.returncode}); see {log}")
    return time.monotonic() - start


def plan_kills(seed: int, points: int, run_seconds: float) -> list[KillPoint]:
    """``points`` kill points drawn from ``seed``: half on a file appearing, half on a clock."""
    rng = random.Random(seed)
    plan = []
    for _ in range(points):
        if rng.random() < 0.5:
            plan.append(KillPoint(rng.random(), rng.uniform(0.0, 0.3)))
        else:
            plan.append(KillPoint(None, rng.uniform(1.0, max(1.5, run_seconds))))
    return plan


def _count(root: Path, pattern: str) -> int:
    return sum(1 for _ in root.glob(pattern))


def run_until_killed(
    command: Sequence[str],
    pattern: str | None,
    delay: float,
    root: Path,
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> int:
    """Start ``command`` (in ``cwd``, with ``env``); SIGKILL it ``delay`` s after one more file matches
    ``pattern`` under ``root`` (or, with no pattern, ``delay`` s after its start). Return its exit
    status (-9 when killed)."""
    at_start = _count(root, pattern) if pattern else 0
    with open(log, "ab") as out:
        out.write(f"\n=== kill {delay:.2f} s after {f'a new {pattern}' if pattern else 'the start'}\n".encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        start = time.monotonic()
        deadline = None if pattern else start + delay
        while process.poll() is None and time.monotonic() - start < timeout:
            now = time.monotonic()
            if deadline is None and _count(root, pattern) > at_start:
                deadline = now + delay
            if deadline is not None and now >= deadline:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait(timeout=60)
    return process.returncode


def torn_files(root: Path) -> list[str]:
    """Files that look finished (not hidden temporaries) but do not read back whole."""
    from PIL import Image

    from selma_toolkit.lora import read_safetensors

    torn = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not TEMPORARY.match(p.name) and p.name != LOCK):
        try:
            if path.suffix == ".safetensors":
                read_safetensors(path)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                # An appended JSON-lines file may end in a torn line (the resumed stage drops it:
                # io.read_jsonl(repair_tail=True)); every line before it must be whole.
                for line in path.read_text().split("\n")[:-1]:
                    json.loads(line)
        except Exception as exc:
            torn.append(f"{path.relative_to(root)} ({type(exc).__name__}: {str(exc)[:120]})")
    return torn


def _files(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not TEMPORARY.match(p.name) and p.name != LOCK
    }


def _jsonl(path: Path) -> list[dict]:
    from selma_toolkit.io import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def _shapes(path: Path) -> dict[str, tuple]:
    from selma_toolkit.lora import load_lora

    return {name: (tuple(m.down.shape), tuple(m.up.shape)) for name, m in load_lora(path).modules.items()}


def _steps(skill_dir: Path) -> list[str]:
    return [p.name for p in (skill_dir / "train" / "checkpoints").glob("step-*")]


def _score_key(row: dict) -> tuple:
    return row["variant"], row["skill"], row["index"], row["scorer"]


def check_run(root: Path, reference: Path, tally: Tally) -> None:
    """Count into ``tally`` how a resumed run folder differs from the uninterrupted ``reference``."""
    tally.folders += 1
    status = subprocess.run(
        [sys.executable, "-m", "selma_toolkit", "status", str(root)], capture_output=True, text=True, timeout=300
    )
    tally.add(
        "damaged",
        int(status.returncode != 0 or "the run is complete" not in status.stdout),
        f"{root.name}: `selma status` does not say the run is complete: {status.stdout[-300:]}{status.stderr[-300:]}",
    )
    tally.items(f"{root.name}: files", _files(root), _files(reference))
    for skill in sorted(p.name for p in (reference / "skills").iterdir()):
        mine, theirs = root / "skills" / skill, reference / "skills" / skill
        prompts, wanted = _jsonl(mine / "prompts.jsonl"), _jsonl(theirs / "prompts.jsonl")
        tally.items(f"{skill} prompts", [r["id"] for r in prompts], [r["id"] for r in wanted])
        if [r["prompt"] for r in prompts] != [r["prompt"] for r in wanted]:
            tally.problems.append(f"{skill}: prompts differ from the uninterrupted run's")
        rows = _jsonl(mine / "images" / "metadata.jsonl")
        tally.items(
            f"{skill} image rows",
            [r["file_name"] for r in rows],
            [r["file_name"] for r in _jsonl(theirs / "images" / "metadata.jsonl")],
        )
        tally.items(f"{skill} PNGs", [p.name for p in (mine / "images").glob("*.png")], [r["file_name"] for r in rows])
        tally.items(f"{skill} checkpoints", _steps(mine), _steps(theirs))
        tally.items(
            f"{skill} loss rows",
            [r["step"] for r in _jsonl(mine / "train" / "loss.jsonl")],
            [r["step"] for r in _jsonl(theirs / "train" / "loss.jsonl")],
        )
    tally.items(
        "eval scores",
        map(_score_key, _jsonl(root / "eval" / "item_scores.jsonl")),
        map(_score_key, _jsonl(reference / "eval" / "item_scores.jsonl")),
    )
    for lora in sorted([*(reference / "experts").glob("*.safetensors"), *(reference / "merged").glob("*.safetensors")]):
        mine = root / lora.relative_to(reference)
        try:
            if _shapes(mine) != _shapes(lora):
                tally.add(
                    "damaged", 1, f"{mine.relative_to(root)}: other modules or shapes than the uninterrupted run's"
                )
        except Exception as exc:
            tally.add("damaged", 1, f"{mine.relative_to(root)}: does not load ({exc})")


def kill_and_resume(
    workdir: Path, seed: int, points: int, overrides: Sequence[str], say: Callable[[str], None] = lambda _: None
) -> Tally:
    """The whole procedure: an uninterrupted run, then ``points`` seeded kills and resumes (new
    folders as runs finish), each folder run to its end and checked; torn files checked after each kill."""
    log = workdir / "runs.log"
    reference = workdir / "reference"
    seconds = reference_run(reference, overrides, log)
    say(f"uninterrupted run: {seconds:.1f} s")
    tally = Tally()
    index, root = 0, workdir / "run-0"
    for number, point in enumerate(plan_kills(seed, points, seconds), 1):
        pattern = point.pattern(root, reference)
        where = f"{point.delay:.2f} s after a new {pattern}" if pattern else f"at {point.delay:.2f} s"
        status = run_until_killed(run_command(root, overrides), pattern, point.delay, root, log)
        killed = status == -signal.SIGKILL
        if killed:
            tally.kills += 1
            torn = torn_files(root)
            tally.add("damaged", len(torn), f"after kill {number} ({where}): {torn[:3]}")
        else:
            tally.finished_before_kill += 1
            tally.add("damaged", int(status != 0), f"{root.name}: a resumed run failed (exit {status}); see {log}")
        say(
            f"point {number}/{points}, {where}: {'killed' if killed else f'ended first (exit {status})'} in {root.name}"
        )
        if not killed:  # this folder is done: check it, continue in a new one
            check_run(root, reference, tally)
            index += 1
            root = workdir / f"run-{index}"
    if root.exists():  # the last folder was killed: finish it
        with open(log, "ab") as out:
            result = subprocess.run(run_command(root, overrides), stdout=out, stderr=subprocess.STDOUT, timeout=900)
        if result.returncode != 0:
            tally.add("damaged", 1, f"{root.name}: the final rerun failed (exit {result.returncode}); see {log}")
        check_run(root, reference, tally)
    return tally

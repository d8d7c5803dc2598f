"""mypy with a baseline that may only shrink: the type errors each file had when checking began are
allowed, no file may gain one, and a file that loses some must have its count lowered here.

    python .ci/mypy_baseline.py            # check (CI, pre-commit)
    python .ci/mypy_baseline.py --update   # write the counts after fixing errors (never to raise one)

mypy itself has no per-file error budget (its options are per module and all-or-nothing), hence this
script; the settings are pyproject.toml's [tool.mypy]."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.json"
TARGETS = ["selma_toolkit", "comfyui_nodes"]
ERROR = re.compile(r"^(?P<file>[^:\n]+\.py):\d+(?::\d+)?: error: ")


def run_mypy() -> tuple[Counter[str], list[str]]:
    """Error counts per file (paths relative to the repository) and mypy's output lines."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *TARGETS], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if result.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        sys.exit(f"mypy failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    lines = result.stdout.splitlines()
    counts = Counter(m["file"] for line in lines if (m := ERROR.match(line)))
    return counts, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="write the current counts (they may only go down)")
    args = parser.parse_args()
    counts, lines = run_mypy()
    baseline: dict[str, int] = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    grown = {f: n for f, n in counts.items() if n > baseline.get(f, 0)}
    shrunk = {f: n for f, n in baseline.items() if counts.get(f, 0) < n}
    if args.update:
        if grown and BASELINE.is_file():
            print("refusing to raise the baseline; fix these first:", file=sys.stderr)
        else:
            BASELINE.write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
            print(f"{BASELINE.relative_to(ROOT)}: {sum(counts.values())} errors in {len(counts)} files")
            return 0
    for file, n in sorted(grown.items()):
        print(f"{file}: {n} mypy errors, the baseline allows {baseline.get(file, 0)}:")
        print("\n".join(f"  {line}" for line in lines if line.startswith(f"{file}:")))
    if shrunk and not grown:
        listed = ", ".join(f"{f} {baseline[f]} -> {counts.get(f, 0)}" for f in sorted(shrunk))
        print(f"fewer mypy errors than the baseline ({listed}): run `python .ci/mypy_baseline.py --update`")
        return 1
    if not grown:
        print(f"mypy: {sum(counts.values())} errors in {len(counts)} files, none beyond the baseline")
    return 1 if grown else 0


if __name__ == "__main__":
    sys.exit(main())

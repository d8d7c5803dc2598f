"""What a refused `selma` command must look like (tests/test_bad_input.py, test_faults.py): one
`error: ...` line, the last of stderr, no traceback, the exit code of its kind (selma_toolkit/errors.py:
2 for bad input, 1 for a runtime failure)."""

from __future__ import annotations

from pathlib import Path


def one_error_line(result, exit_code: int = 2) -> str:
    """The error line of a refused command, after checking it is the only one, the last line of
    stderr (so the message has no continuation lines), without a traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*"))

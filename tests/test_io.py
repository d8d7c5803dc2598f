"""Atomic writes and resumable JSON lines."""

from __future__ import annotations

import json

import pytest

from selma_toolkit.errors import DatasetError
from selma_toolkit.io import JsonlAppender, atomic_open, atomic_write_text, read_jsonl


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_appender_cuts_a_torn_last_line_and_continues(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": 0}) + "\n" + '{"id": 1, "pro')
    assert read_jsonl(path, repair_tail=True) == [{"id": 0}]
    with JsonlAppender(path) as out:
        out.append({"id": 1})
    assert read_jsonl(path) == [{"id": 0}, {"id": 1}]


def test_malformed_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(DatasetError, match=r"p\.jsonl:2"):
        read_jsonl(path, repair_tail=True)


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert os.stat(atomic).st_mode & 0o777 == os.stat(plain).st_mode & 0o777

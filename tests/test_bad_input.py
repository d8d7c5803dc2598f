"""Malformed input and unwritable outputs (issue 22, item 1, part): each is refused through the CLI
with one line that names the file and says what was found and what was expected, exit code 2 (an
InputError, like click's usage errors; 1 is for runtime failures such as a full disk), no
traceback, nothing written. docs/reliability.md lists these cases with the test that checks each."""

from __future__ import annotations

import os
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN_SKILLS, run_cli, small_tiny_run
from safetensors.torch import save_file
from support_cli import files_under, one_error_line

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import read_safetensors

HUGE = 10**15  # a header length no file has: it must be refused, never allocated


# ---------------------------------------------------------------------------------------- recipes

RECIPE_SYNTAX_ERRORS = {
    # name: (text, expected message after "FILE: ")
    "unclosed_array": (
        'name = "r"\nbase_model = "tiny:sd1"\nskills = [\n  "count-grammar",\n',
        "line 5, column 1: TOML syntax error: Invalid value at the end of the file (an unclosed [ array, "
        "{ table or quoted string?)",
    ),
    "unclosed_array_without_newline": (
        'name = "r"\nskills = ["count-grammar"',
        "line 2, column 26: TOML syntax error: Unclosed array at the end of the file",
    ),
    "doubled_equals": (
        'name = "r"\nbase_model = = "tiny:sd1"\n',
        "line 2, column 14: TOML syntax error: Invalid value",
    ),
    "unterminated_string": (
        'name = "r\nbase_model = "tiny:sd1"\n',
        "line 1, column 10: TOML syntax error: Illegal character '\\n'",
    ),
    "duplicate_key": ('name = "r"\nname = "s"\n', "line 2, column 11: TOML syntax error: Cannot overwrite a value"),
    "bad_table_header": (
        'name = "r"\n[train\nsteps = 1\n',
        "line 2, column 7: TOML syntax error: Expected ']' at the end of a table declaration",
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPE_SYNTAX_ERRORS))
def test_recipe_toml_syntax_error_names_file_line_and_column_in_one_line(cli, tmp_path, case):
    text, expected = RECIPE_SYNTAX_ERRORS[case]
    recipe = tmp_path / "broken.toml"
    recipe.write_text(text)
    line = one_error_line(cli("recipe", "validate", str(recipe)))
    assert line.startswith(f"error: {recipe}: {expected}"), line


def test_run_recipe_whose_skill_file_has_a_syntax_error_names_the_skill_file(cli, tmp_path):
    (tmp_path / "skill.toml").write_text('name = "s"\nseeds = ["a", "b",\n')
    recipe = tmp_path / "run.toml"
    recipe.write_text('name = "r"\nbase_model = "tiny:sd1"\nskills = ["skill.toml"]\n')
    line = one_error_line(cli("run", str(recipe), "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: {tmp_path / 'skill.toml'}: line 3, column 1: TOML syntax error:"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ("# a comment\n\n# another\n", "the file holds only comments and blank lines"),
    ],
)
def test_empty_recipe_file_says_it_is_empty_and_what_to_start_from(cli, tmp_path, text, what):
    recipe = tmp_path / "empty.toml"
    recipe.write_text(text)
    line = one_error_line(cli("recipe", "validate", str(recipe)))
    assert (
        line == f"error: {recipe}: {what}; expected a TOML recipe (see `selma recipe show tiny-demo` for a run recipe, "
        "`selma skill new NAME` for a skill recipe)"
    )


def test_recipe_that_is_not_utf8_text_is_refused_by_name(cli, tmp_path):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    line = one_error_line(cli("recipe", "validate", str(recipe)))
    assert line == f"error: {recipe}: not UTF-8 text (byte 11); expected a TOML recipe file"


def test_unknown_option_is_a_usage_error_with_exit_code_2(cli):
    result = cli("run", "tiny-demo", "--no-such-option")
    assert result.returncode == 2 and "No such option" in result.stderr and "Traceback" not in result.stderr


RECIPE_VALUE_ERRORS = {
    # --set override: expected message after "error: " (the override is named, not the shipped file it changes)
    'train.steps="ten"': "--set 'train.steps=\"ten\"': expected an integer",
    "train.steps=ten": "--set train.steps=ten: expected an integer",
    "train.steps=0": "--set train.steps=0: expected 1 or more",
    "train.setps=1": "--set train.setps=1: unknown key; did you mean 'steps'?",
    "merge.method=average": "--set merge.method=average: expected 'selma', 'delta', 'svd', 'ties' or 'dare'",
    "skills.count-grammar.num_prompts=x": "--set skills.count-grammar.num_prompts=x: expected an integer",
    "skills.nope.num_prompts=2": "--set skills.nope.num_prompts=2: no such skill in this run; its skills are "
    "['count-grammar', 'spatial-grammar', 'color-grammar']",
    "trainsteps": "--set trainsteps: expected KEY=VALUE, e.g. train.steps=100",
    "train.steps.x=1": "--set train.steps.x=1: 'steps' is a value, not a table",
}


@pytest.mark.parametrize("override", sorted(RECIPE_VALUE_ERRORS))
def test_recipe_value_of_wrong_type_range_or_key_names_the_override_and_what_was_expected(cli, override):
    result = cli("recipe", "validate", "tiny-demo", "--set", override)
    assert one_error_line(result) == "error: " + RECIPE_VALUE_ERRORS[override]


def test_several_wrong_overrides_are_listed_one_a_line_and_a_wrong_file_value_names_the_file(cli, tmp_path):
    result = cli("recipe", "validate", "tiny-demo", "--set", "train.steps=0", "--set", "images.steps=x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-3:] == [
        "error: --set: invalid values",
        "  --set images.steps=x: expected an integer",
        "  --set train.steps=0: expected 1 or more",
    ]
    recipe = tmp_path / "run.toml"
    recipe.write_text('name = "r"\nbase_model = "tiny:sd1"\nskills = ["count-grammar"]\n[train]\nsteps = "a"\n')
    result = cli("recipe", "validate", str(recipe), "--set", "images.steps=x")
    assert result.stderr.strip().splitlines()[-3:] == [
        f"error: {recipe}: invalid recipe",
        "  --set images.steps=x: expected an integer",
        "  train.steps: expected an integer (found 'a')",
    ]


# ------------------------------------------------------------------------------- safetensors files


def tiny_lora_bytes(folder: Path) -> bytes:
    """A small valid kohya-layout LoRA file's bytes (one module, rank 2)."""
    path = folder / "valid.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 1, 1),
            "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
            "lora_unet_conv_in.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    return path.read_bytes()


def broken_safetensors(folder: Path) -> dict[str, tuple[bytes, str]]:
    """name: (file bytes, what the error says after "FILE: ")."""
    valid = tiny_lora_bytes(folder)
    (header_size,) = struct.unpack("<Q", valid[:8])
    return {
        "empty": (b"", "0 bytes, too short for a safetensors file (truncated or empty)"),
        "five_bytes": (b"\x01\x02\x03\x04\x05", "5 bytes, too short for a safetensors file (truncated or empty)"),
        "huge_header_length": (
            struct.pack("<Q", HUGE) + b"{}" + b"\0" * 30,
            f"not a safetensors file, or truncated: its first 8 bytes announce a {HUGE}-byte header "
            "but the file has 40 bytes",
        ),
        "header_cut_short": (
            valid[: 8 + header_size // 2],
            f"not a safetensors file, or truncated: its first 8 bytes announce a {header_size}-byte header",
        ),
        "header_not_json": (
            struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16,
            "the safetensors header is not valid JSON; the file is damaged or not safetensors",
        ),
        "tensor_data_cut_short": (valid[:-7], "truncated: the header needs"),
        "random_bytes": (os.urandom(8) + b"\x00" * 64, "not a safetensors file, or truncated"),
    }


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("broken")
    files = {}
    for name, (raw, expected) in broken_safetensors(folder).items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(raw)
        files[name] = (path, expected)
    return files


def test_every_broken_safetensors_file_is_refused_in_one_line_naming_the_file(broken_files):
    # One `selma lora info` per file (each a process that imports torch): in one test to keep it quick.
    for name, (path, expected) in broken_files.items():
        line = one_error_line(run_cli("lora", "info", str(path)))
        assert line.startswith(f"error: {path}: {expected}"), (name, line)


def test_broken_expert_given_to_merge_is_refused_before_anything_is_written(broken_files, tmp_path):
    path, expected = broken_files["huge_header_length"]
    out = tmp_path / "merged.safetensors"
    line = one_error_line(run_cli("merge", str(path), str(broken_files["empty"][0]), "--out", str(out)))
    assert line.startswith(f"error: {path}: {expected}"), line
    assert files_under(tmp_path) == []


def test_huge_header_length_is_refused_without_allocating_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", HUGE) + b"{}" + b"\0" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(LoraFormatError, match=f"announce a {HUGE}-byte header"):
            read_safetensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"reading a refused header allocated {peak} bytes"


def test_valid_tiny_lora_file_used_by_these_cases_is_read(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(tiny_lora_bytes(tmp_path))
    tensors, _ = read_safetensors(path)
    assert set(tensors) == {
        "lora_unet_conv_in.lora_down.weight",
        "lora_unet_conv_in.lora_up.weight",
        "lora_unet_conv_in.alpha",
    }


def tiny_lora(path: Path, rank: int = 2, scale: float = 1.0) -> Path:
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(rank, 4, 1, 1) * scale,
            "lora_unet_conv_in.lora_up.weight": torch.ones(8, rank, 1, 1),
            "lora_unet_conv_in.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    return path


@pytest.fixture(scope="module")
def wrong_loras(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wrong-loras")
    tiny_lora(folder / "a.safetensors")
    tiny_lora(folder / "b.safetensors", scale=2.0)
    tiny_lora(folder / "rank4.safetensors", rank=4)
    save_file({"model.weight": torch.ones(3, 3)}, str(folder / "full-model.safetensors"))
    torch.save({"x": torch.ones(2)}, folder / "zipped.safetensors")
    torch.save({"x": torch.ones(2)}, folder / "expert.bin")
    return folder


WRONG_LORA_USES = {
    # name: (selma arguments, start of the expected message after "error: ")
    "non_lora_safetensors": (
        ["lora", "info", "full-model.safetensors"],
        "full-model.safetensors: not a LoRA: none of its 1 tensors has a LoRA key (e.g. 'model.weight')",
    ),
    "pickle_named_safetensors": (
        ["lora", "info", "zipped.safetensors"],
        "zipped.safetensors: this is a PyTorch pickle/zip file named .safetensors, not safetensors; "
        "it is refused because unpickling can run arbitrary code",
    ),
    "pickle_bin": (
        ["lora", "info", "expert.bin"],
        "expert.bin: .bin files are Python pickles and loading one can run arbitrary code",
    ),
    "ranks_differ_for_selma": (
        ["merge", "a.safetensors", "rank4.safetensors", "--out", "m.safetensors"],
        "module unet.conv_in: method selma averages the A and B factors and needs equal ranks; "
        "found a.safetensors: rank 2, rank4.safetensors: rank 4. Use --method delta",
    ),
    "rank_for_selma": (
        ["merge", "a.safetensors", "b.safetensors", "--rank", "4", "--out", "m.safetensors"],
        "--rank 4: only svd, ties and dare choose an output rank; selma keeps the experts' rank. Drop "
        "--rank or use --method svd.",
    ),
    "weight_count": (
        ["merge", "a.safetensors", "b.safetensors", "--weights", "0.5", "--out", "m.safetensors"],
        "weights: got 1 weight(s) for 2 expert(s); give one weight per expert in the same order",
    ),
    "weight_nan": (
        ["merge", "a.safetensors", "b.safetensors", "--weights", "1,nan", "--out", "m.safetensors"],
        "weights: [1.0, nan] contains a non-finite value; expected finite numbers",
    ),
    "weight_not_a_number": (
        ["merge", "a.safetensors", "b.safetensors", "--weights", "1,x", "--out", "m.safetensors"],
        "--weights '1,x': expected comma-separated numbers, one per expert, e.g. 0.2,0.8",
    ),
    "unknown_method": (
        ["merge", "a.safetensors", "b.safetensors", "--method", "average", "--out", "m.safetensors"],
        "--method 'average': expected one of selma, delta, svd, ties, dare",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_LORA_USES))
def test_wrong_lora_file_or_merge_setting_is_one_line_and_writes_no_merge(wrong_loras, case):
    args, expected = WRONG_LORA_USES[case]
    line = one_error_line(run_cli(*args, cwd=wrong_loras))
    assert line.startswith(f"error: {expected}"), line
    assert not (wrong_loras / "m.safetensors").exists()


# ---------------------------------------------------------------------------------- output paths

SMALL = ["--set", "images.resolution=32", "--set", "train.steps=2"]


def test_run_out_that_is_an_existing_file_is_refused_and_the_file_kept(cli, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    line = one_error_line(cli("run", "tiny-demo", "--out", str(blocker), *SMALL))
    assert line == (
        f"error: --out {blocker}: an existing file; expected a folder (or a path that does not exist yet). "
        "Choose another --out or move the file away."
    )
    assert blocker.read_text() == "keep me" and files_under(tmp_path) == [blocker]


def test_run_out_under_a_file_is_refused_naming_the_file_in_the_way(cli, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    line = one_error_line(cli("run", "tiny-demo", "--out", str(blocker / "runs" / "demo"), *SMALL))
    assert line == (
        f"error: {blocker / 'runs' / 'demo'}: cannot be created because {blocker} is a file, not a "
        "folder. Choose another --out."
    )
    assert blocker.read_text() == "keep me" and files_under(tmp_path) == [blocker]


def test_merge_out_that_is_an_existing_folder_is_refused_before_reading_the_experts(cli, tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    line = one_error_line(cli("merge", "a.safetensors", "b.safetensors", "--out", str(folder)))
    assert line == (
        f"error: --out {folder}: an existing folder; expected a file name such as {folder / 'merged.safetensors'}"
    )
    assert files_under(tmp_path) == [folder]


def test_merge_out_under_a_file_is_refused_naming_the_file_in_the_way(cli, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker / "merged.safetensors"
    line = one_error_line(cli("merge", "a.safetensors", "b.safetensors", "--out", str(out)))
    assert line == f"error: {out}: cannot be created because {blocker} is a file, not a folder. Choose another --out."
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root ignores mode bits, so a 0555 folder is writable for it; the "
    "path-under-a-file tests above cover an output that cannot be created",
)
def test_run_out_in_a_read_only_folder_is_refused_naming_the_folder(cli, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        line = one_error_line(cli("run", "tiny-demo", "--out", str(read_only / "run"), *SMALL))
        assert line == (
            f"error: {read_only / 'run'}: cannot write here (its nearest existing folder {read_only}): "
            "permission denied or a read-only file system. Choose another --out or change its permissions."
        )
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


# ------------------------------------------------------------------------- damaged outputs of a run

SKILLS = TINY_RUN_SKILLS
SMALL_RUN = small_tiny_run(train_steps=2)


def test_damaged_merged_lora_in_a_run_folder_is_reported_by_status_and_merged_again_by_run(tmp_path):
    root = tmp_path / "run"
    args = ["run", "tiny-demo", "--out", str(root), *[a for o in SMALL_RUN for a in ("--set", o)]]
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    merged = root / "merged" / "selma.safetensors"
    merged.write_bytes(struct.pack("<Q", HUGE) + b"{}")  # e.g. overwritten by a broken copy
    status = run_cli("status", str(root))
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert "selma.safetensors is damaged" in status.stdout and "the run is complete" not in status.stdout
    again = run_cli(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run  merge selma" in again.stderr and "skip merge delta" in again.stderr and "skip train" in again.stderr
    assert read_safetensors(merged)[0]
    assert "the run is complete" in run_cli("status", str(root)).stdout


# ----------------------------------------------------------------------------- full disk (simulated)

# `selma` with every fsync failing as on a full disk (ENOSPC): the last step of each atomic write.
FULL_DISK = """
import errno, os, sys
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full
from selma_toolkit.cli import main
sys.argv = ["selma", *sys.argv[1:]]
main()
"""


def selma_on_a_full_disk(*args: str, cwd: Path, script: str = FULL_DISK):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_merge_on_a_full_disk_is_one_line_and_leaves_no_file_and_an_older_merge_intact(tmp_path):
    tiny_lora(tmp_path / "a.safetensors")
    tiny_lora(tmp_path / "b.safetensors", scale=2.0)
    merge = ["merge", "a.safetensors", "b.safetensors", "--out", "m.safetensors"]
    line = one_error_line(selma_on_a_full_disk(*merge, cwd=tmp_path), exit_code=1)  # a runtime error
    assert line.startswith("error: m.safetensors: No space left on device while writing it (") and line.endswith(
        "; nothing was written over it. Free some space, then run the command again or choose another --out."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no partial, no temporary
    assert run_cli(*merge, cwd=tmp_path).returncode == 0
    before = (tmp_path / "m.safetensors").read_bytes()
    one_error_line(selma_on_a_full_disk(*merge, "--method", "delta", cwd=tmp_path), exit_code=1)
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# `selma` killed with SIGKILL at its first fsync: a merge written but not yet renamed into place.
KILLED_AT_FSYNC = FULL_DISK.replace('raise OSError(errno.ENOSPC, "No space left on device")', "os.kill(os.getpid(), 9)")


def test_merge_killed_before_its_rename_leaves_no_file_that_looks_like_a_lora(tmp_path):
    import signal

    tiny_lora(tmp_path / "a.safetensors")
    tiny_lora(tmp_path / "b.safetensors", scale=2.0)
    merge = ["merge", "a.safetensors", "b.safetensors", "--out", "m.safetensors"]
    killed = selma_on_a_full_disk(*merge, cwd=tmp_path, script=KILLED_AT_FSYNC)  # SIGKILL where the rename would follow
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("a.safetensors", "b.safetensors")]
    assert leftovers and all(
        name.startswith(".m.safetensors.") and name.endswith(".tmp") for name in leftovers
    )  # hidden, not *.safetensors
    again = run_cli(*merge, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert read_safetensors(tmp_path / "m.safetensors")[0]


def test_jsonl_append_on_a_full_disk_is_a_disk_full_error_and_keeps_earlier_records(tmp_path, monkeypatch):
    from selma_toolkit.errors import DiskFullError, SelmaError
    from selma_toolkit.io import JsonlAppender, read_jsonl

    path = tmp_path / "prompts.jsonl"
    with JsonlAppender(path) as out:
        out.append({"id": 1})

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(
            DiskFullError,
            match=r"prompts\.jsonl: No space left on device while writing it .*the records "
            r"before this one are kept",
        ) as refused:
            out.append({"id": 2})
    assert isinstance(refused.value, SelmaError) and isinstance(refused.value, OSError) and refused.value.errno == 28
    assert read_jsonl(path, repair_tail=True)[0] == {"id": 1}


RELIABILITY_MODULES = (
    "test_bad_input.py",
    "test_faults.py",
    "test_kill_resume.py",
    "test_run_lock.py",
    "test_secrets.py",
)


def test_reliability_table_lists_every_test_of_its_modules():
    # docs/reliability.md names the test behind each row: a renamed test must be renamed there too.
    tests = Path(__file__).resolve().parent
    doc = (tests.parent / "docs" / "reliability.md").read_text()
    names = [
        name
        for module in RELIABILITY_MODULES
        for name in re.findall(r"^def (test_\w+)", (tests / module).read_text(), flags=re.M)
    ]
    missing = [
        name for name in names if name != "test_reliability_table_lists_every_test_of_its_modules" and name not in doc
    ]
    assert len(names) > 25 and not missing, f"docs/reliability.md does not list {missing}"

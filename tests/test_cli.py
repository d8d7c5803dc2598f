"""The CLI as a user runs it: help, version, recipe commands, tiny create, clean errors."""

from __future__ import annotations

from selma_toolkit import __version__


def test_help_and_version(cli):
    result = cli("--help")
    assert result.returncode == 0 and "recipe" in result.stdout and "tiny" in result.stdout
    result = cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_recipe_validate_and_show(cli, repo_root):
    result = cli("recipe", "validate", str(repo_root / "recipes/runs/sd2-selma.toml"))
    assert result.returncode == 0 and "OK" in result.stdout
    result = cli("recipe", "show", "tiny-demo", "--set", "train.steps=100")
    assert result.returncode == 0 and "steps = 100" in result.stdout and "[[skills]]" in result.stdout


def test_user_errors_exit_nonzero_without_traceback(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "r"\nbase_model = "tiny:sd1"\nskills = ["countbench"]\n[train]\nsetps = 1\n')
    result = cli("recipe", "validate", str(bad))
    assert result.returncode == 2  # an input error (selma_toolkit/errors.py)
    assert "did you mean 'steps'" in result.stderr and "Traceback" not in result.stderr


def test_tiny_create_writes_a_loadable_model(cli, tmp_path):
    out = tmp_path / "t"
    result = cli("tiny", "create", str(out), "--arch", "sdxl")
    assert result.returncode == 0, result.stderr
    assert (out / "model_index.json").is_file() and (out / "text_encoder_2").is_dir()
    # transformers' note that it falls back to the PIL image processor (no torchvision) is noise here.
    assert "requires torchvision" not in result.stderr
    again = cli("tiny", "create", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr

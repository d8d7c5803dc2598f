"""The CLI as a user runs it: help, version, recipe commands, tiny create, clean errors."""

from __future__ import annotations

import re

import torch

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


def test_help_shows_plain_metavars_and_the_set_options_own_examples(cli):
    """typer 0.2x would show Python types: `<bool>`, `<list[str]>`, `{recipe}`."""
    pages = {
        command: cli(*command.split(), "--help", env={"COLUMNS": "200"})
        for command in ("run", "merge", "evaluate", "skill new", "skill propose", "hub pull", "recipe validate")
    }
    for command, page in pages.items():
        assert page.returncode == 0, page.stderr
        python_types = re.search(r"<(bool|str|int|float|path|Path|list\[\w+\])>|\{\w+\}", page.stdout)
        assert not python_types, (command, page.stdout)
    spaced = {command: re.sub(r" +", "  ", page.stdout) for command, page in pages.items()}
    assert "Usage: python -m selma_toolkit run [OPTIONS] RECIPE" in pages["run"].stdout
    assert "--set  KEY=VALUE" in spaced["run"]
    assert "[OPTIONS] [EXPERTS...]" in pages["merge"].stdout and "--rank  INTEGER" in spaced["merge"]
    assert "[OPTIONS] [RUN]" in pages["evaluate"].stdout
    propose = pages["skill propose"].stdout
    assert "A scorer setting of a run recipe's evaluate section, e.g. --set clip_model=tiny:clip" in propose
    assert "Set a skill field, e.g. --set num_prompts=200" in pages["skill new"].stdout
    assert "train.steps" not in pages["skill new"].stdout


def test_output_and_logs_piped_to_a_file_keep_each_line_whole(cli, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / ("a-folder-name-long-enough-that-a-path-in-it-passes-eighty-columns-" * 2)
    folder.mkdir()
    source = folder / "expert-with-bias-differences.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 1, 1),
            "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
            "lora_unet_conv_in.diff_b": torch.ones(8),
        },
        str(source),
    )
    out = folder / "converted.safetensors"
    result = cli("lora", "convert", str(source), str(out), "--drop-bias-diffs")  # stdout and stderr are pipes
    assert result.returncode == 0, result.stderr
    assert f"to {out}\n" in result.stdout  # the console line, unwrapped
    [warning] = [line for line in result.stderr.splitlines() if "dropped 1 non-zero bias" in line]
    assert f"{source}: dropped 1 non-zero bias / norm differences" in warning and "WARNING" in warning

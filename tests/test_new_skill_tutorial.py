"""docs/tutorial-new-skill.md cannot rot: every fenced bash block of its tiny section (part A) runs
here, in order, in an empty folder, with the `selma` of this environment; then what the page says
each step leaves behind is checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from selma_toolkit.io import sha256_file
from selma_toolkit.lora import load_lora
from selma_toolkit.lora.merge import merge_record

TINY_SECTION = "## A: on the tiny default"
GPU_SECTION = "## B: the same path for SDXL on a GPU"


def section(text: str, heading: str) -> str:
    assert heading in text, f"the tutorial lost its section {heading!r}"
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def tutorial(repo_root, tmp_path_factory):
    """Run part A's blocks one after another in one folder (exports carry over, as in one shell)."""
    text = (repo_root / "docs" / "tutorial-new-skill.md").read_text()
    blocks = bash_blocks(section(text, TINY_SECTION))
    folder = tmp_path_factory.mktemp("tutorial")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "COLUMNS": "200"}
    exports, outputs = "", []
    for block in blocks:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", exports + block],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, (
            f"tutorial block failed:\n{block}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        outputs.append(result.stdout)
        exports += "".join(line + "\n" for line in block.splitlines() if line.startswith("export "))
    return {"text": text, "blocks": blocks, "folder": folder, "outputs": outputs}


def test_every_command_of_the_tiny_section_runs_as_written(tutorial):
    commands = [line for block in tutorial["blocks"] for line in block.splitlines() if line.startswith("selma ")]
    used = {" ".join(line.split()[: 3 if line.split()[1] in ("skill", "lora", "recipe") else 2]) for line in commands}
    assert used >= {
        "selma run",
        "selma status",
        "selma skill new",
        "selma recipe validate",
        "selma merge",
        "selma evaluate",
    }


def test_the_tiny_section_leaves_what_it_says_it_does(tutorial):
    runs = tutorial["folder"] / "runs"
    assert sorted(p.name for p in (runs / "with-shapes" / "experts").iterdir()) == ["shape-count.safetensors"]
    assert sorted(p.name for p in (runs / "with-shapes" / "skills").iterdir()) == ["shape-count"]
    record = merge_record(load_lora(runs / "with-shapes" / "merged" / "selma.safetensors"))
    assert [e["skill"] for e in record["experts"]] == ["shape-count", "count-grammar", "color-grammar"]
    added = merge_record(load_lora(tutorial["folder"] / "with-shapes-selma.safetensors"))
    assert [e["sha256"] for e in added["experts"]] == [
        sha256_file(runs / "old-skills" / "experts" / "count-grammar.safetensors"),
        sha256_file(runs / "old-skills" / "experts" / "color-grammar.safetensors"),
        sha256_file(runs / "with-shapes" / "experts" / "shape-count.safetensors"),
    ]
    comparison = (runs / "with-shapes" / "eval" / "before-after" / "comparison.md").read_text()
    for skill, kind in [("shape-count", "new"), ("count-grammar", "old"), ("color-grammar", "old")]:
        assert f"| {skill} | {kind} | clipscore |" in comparison
    assert (runs / "with-shapes" / "eval" / "before-after" / "report" / "index.html").is_file()
    assert "Gained:" in tutorial["outputs"][-1] and "Lost:" in tutorial["outputs"][-1]


def test_the_gpu_section_uses_the_same_commands_and_a_valid_sdxl_run_recipe(tutorial, tmp_path):
    from selma_toolkit.recipe import load_run_recipe

    gpu = "\n".join(bash_blocks(section(tutorial["text"], GPU_SECTION)))
    for command in ("selma skill new", "selma recipe validate", "selma run", "selma merge --add", "selma evaluate"):
        assert command in gpu
    assert "--before" in gpu
    recipe = re.search(r"cat > sdxl-with-shapes.toml <<'EOF'\n(.*?)^EOF$", gpu, flags=re.DOTALL | re.MULTILINE).group(1)
    (tmp_path / "sdxl-with-shapes.toml").write_text(recipe)
    shutil.copy(tutorial["folder"] / "shape-count.toml", tmp_path / "shape-count.toml")
    run = load_run_recipe(tmp_path / "sdxl-with-shapes.toml")  # parsed and validated; nothing is downloaded
    assert run.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and [s.name for s in run.skills] == [
        "shape-count"
    ]
    assert len(run.experts) == 3 and run.train.rank == 128 and run.images.steps == 50

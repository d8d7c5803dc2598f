"""A non-editable install (a wheel) ships every recipe, the hub templates and the ComfyUI templates as package
data, and the node pack's web extension."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(repo_root), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("selma_toolkit-*.whl"))


def test_wheel_contains_every_shipped_recipe_hub_file_and_comfyui_template(wheel, repo_root):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("recipes", "hub", "example_workflows"):
        for path in (repo_root / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"selma_toolkit/_shipped/{path.relative_to(repo_root).as_posix()}" in names
    assert {
        "comfyui_nodes/__init__.py",
        "comfyui_nodes/web/selma.js",
        "comfyui_nodes/workflows_api/selma-flux.api.json",
    } <= names


def test_installed_wheel_finds_recipes_outside_the_source_tree(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = (
        "import selma_toolkit.resources as r, selma_toolkit.recipe as rc; "
        "print(r.shipped_dir('recipes')); print(rc.load_run_recipe('demo').name)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shipped, name = result.stdout.split()
    assert shipped.startswith(str(target)) and "_shipped" in shipped and name == "demo"

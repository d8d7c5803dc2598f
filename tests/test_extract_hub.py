"""Catalog entries of kind ``extract`` end to end through the local Hub mirror (olah, as the Hub tests
use it): `selma hub pull` downloads only what the extraction reads (the fp16 variant of the UNet),
extracts, caches by both commits, and serves the second pull from the cache; `selma hub list`,
`load_experts` and the ComfyUI Hub node take the names; the shipped catalog's SELMA entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support_extract import fused_model, known_lora, total_update
from support_hub import OlahHub, commit_files, head, init_repo

from selma_toolkit.errors import HubError
from selma_toolkit.hub import load_catalog, read_catalog
from selma_toolkit.lora import load_lora
from selma_toolkit.tiny import build_tiny_pipeline

MODEL, BASE = "alice/tiny-selma", "alice/tiny-sd1"


def _folder_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skip)
    }


@pytest.fixture(scope="module")
def hub(tiny_model_dirs, tmp_path_factory):
    """olah serving the tiny SD 1.x base and the same model with a known LoRA fused in (fp32 UNet plus
    its fp16 variant, as diffusers repos publish them)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("extract-hub")
    base = tiny_model_dirs["sd1"]
    lora = known_lora(build_tiny_pipeline("sd1"), "sd1", rank=4, seed=21)
    fused = fused_model(base, [lora], root / "fused")
    UNet2DConditionModel.from_pretrained(fused / "unet").half().save_pretrained(fused / "unet", variant="fp16")
    olah = OlahHub(root / "hub")
    commit_files(init_repo(olah.mirrors, BASE), _folder_files(base), "base")
    model_commit = commit_files(init_repo(olah.mirrors, MODEL), _folder_files(fused), "fused")
    olah.start()
    try:
        yield olah, lora, model_commit
    finally:
        olah.stop()


def _catalog(path: Path, name: str, **pins: str) -> Path:
    extra = "".join(f', {key} = "{value}"' for key, value in pins.items())
    path.write_text(
        f'[{name}]\narchitecture = "sd1"\nskill = "tiny"\n'
        f'extract = {{ model = "{MODEL}", base = "{BASE}", components = ["unet"]{extra} }}\n'
    )
    return path


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "COLUMNS": "200", **env}
    return subprocess.run(
        [sys.executable, "-m", "selma_toolkit", *args], capture_output=True, text=True, env=full, timeout=300
    )


def test_pull_extracts_once_from_the_fp16_unet_only_and_serves_the_second_pull_from_the_cache(hub, tmp_path):
    olah, lora, model_commit = hub
    catalog = _catalog(tmp_path / "c.toml", "tiny-selma")
    env = {"HF_ENDPOINT": olah.endpoint, "HF_HOME": str(tmp_path / "hf"), "SELMA_CACHE": str(tmp_path / "cache")}
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    first = _cli("hub", "pull", "tiny-selma", "--catalog", str(catalog), "--to", str(loras), env=env)
    assert first.returncode == 0, first.stderr
    assert Path(first.stdout.strip()) == loras / "tiny-selma.safetensors"
    extracted = load_lora(loras / "tiny-selma.safetensors")
    assert set(extracted.modules) == set(lora.modules) and extracted.ranks() == {4}
    for name, want in total_update([lora], [1.0]).items():  # from the fp16 variant: at fp16's rounding floor,
        assert float((extracted.modules[name].delta(torch.float64) - want).norm() / want.norm()) < 3e-2  # ~1e-2 here
    snapshot = tmp_path / "hf" / "hub" / "models--alice--tiny-selma" / "snapshots" / model_commit
    downloaded = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert downloaded == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    (cached,) = (tmp_path / "cache" / "extractions" / "tiny-selma").glob("*/tiny-selma.safetensors")
    made = cached.stat().st_mtime_ns

    second = _cli("hub", "pull", "tiny-selma", "--catalog", str(catalog), "--to", str(loras), env=env)
    assert second.returncode == 0, second.stderr
    assert "taken from the cache" in second.stderr and cached.stat().st_mtime_ns == made
    assert (loras / "tiny-selma.safetensors").read_bytes() == cached.read_bytes()

    # A new commit of the fine-tuned model is another extraction, kept beside the first.
    commit_files(olah.mirrors / "models" / MODEL, {"README.md": b"v2\n"}, "readme")
    third = _cli("hub", "pull", "tiny-selma", "--catalog", str(catalog), env=env)
    assert third.returncode == 0, third.stderr
    assert len(list((tmp_path / "cache" / "extractions" / "tiny-selma").glob("*/tiny-selma.safetensors"))) == 2

    listed = _cli("hub", "list", "--catalog", str(catalog), env=env)
    row = next(line for line in listed.stdout.splitlines() if "tiny-selma" in line)
    assert "extract" in row and "sd1" in row and MODEL in row and BASE in row
    shipped = [line for line in listed.stdout.splitlines() if "selma-sdxl " in line]
    assert shipped and "extract" in shipped[0] and "sdxl" in shipped[0]


def test_load_experts_and_the_comfyui_node_take_catalog_names_the_node_only_from_cache(hub, tmp_path, monkeypatch):
    from support_comfyui import FakeFolderPaths
    from support_nodes import pull as hub_expert_node

    from selma_toolkit.adapters.diffusers import load_experts
    from selma_toolkit.experts import cached_catalog_experts
    from selma_toolkit.hub.extraction import pull_extraction

    olah, lora, model_commit = hub
    monkeypatch.setenv("SELMA_CACHE", str(tmp_path / "cache"))
    base_commit = head(olah.mirrors / "models" / BASE)
    catalog = _catalog(tmp_path / "c.toml", "tiny-pinned", model_revision=model_commit, base_revision=base_commit)
    _catalog(tmp_path / "other.toml", "tiny-never-pulled")
    monkeypatch.setenv("SELMA_CATALOG", os.pathsep.join([str(catalog), str(tmp_path / "other.toml")]))
    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setitem(sys.modules, "folder_paths", FakeFolderPaths(loras))

    with pytest.raises(HubError) as info:  # nothing extracted yet: the node downloads nothing
        hub_expert_node("tiny-pinned", 1.0, "", olah.endpoint)
    assert "inside a graph. Run `selma hub pull tiny-pinned` (once, in a terminal: it downloads both" in str(info.value)
    assert str(info.value).startswith("SELMA Hub Expert: tiny-pinned:") and not list(loras.iterdir())

    assert "tiny-pinned" not in cached_catalog_experts()  # what the LoRA Loader's lists offer
    pull_extraction(load_catalog()["tiny-pinned"], endpoint=olah.endpoint)  # what `selma hub pull` does
    offered = cached_catalog_experts()
    assert "tiny-pinned" in offered and "tiny-never-pulled" not in offered
    assert (
        offered["tiny-pinned"].path.read_bytes()
        == next((tmp_path / "cache" / "extractions").rglob("*.safetensors")).read_bytes()
    )
    experts = hub_expert_node("tiny-pinned", 0.5, "", olah.endpoint)
    assert [(e.name, e.weight) for e in experts] == [("tiny-pinned.safetensors", 0.5)]
    assert set(experts[0].lora.modules) == set(lora.modules)
    with pytest.raises(HubError, match=r"Run `selma hub pull tiny-never-pulled` \(once, in a terminal"):
        hub_expert_node("tiny-never-pulled", 1.0, "", olah.endpoint)

    pipe = build_tiny_pipeline("sd1")  # the base: the pinned revisions resolve from the cache, no request
    names = load_experts(pipe, ["tiny-pinned"], fuse=True)
    assert names == ["selma"]
    base = build_tiny_pipeline("sd1").unet
    for name, want in total_update([lora], [1.0]).items():
        path = name.split(".", 1)[1]
        fused = (pipe.unet.get_submodule(path).weight - base.get_submodule(path).weight).detach().double()
        assert float((fused - want).norm() / want.norm()) < 3e-2  # the fp16 variant's rounding floor


def test_lora_extract_takes_hub_ids_and_records_revisions_commits_and_file_hashes(hub, tmp_path):
    import json

    olah, lora, model_commit = hub
    env = {"HF_ENDPOINT": olah.endpoint, "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "x.safetensors"
    result = _cli(
        "lora",
        "extract",
        "--model",
        MODEL,
        "--base",
        BASE,
        "--revision",
        model_commit,
        "--components",
        "unet",
        "--out",
        str(out),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"{MODEL}@{model_commit} ({model_commit[:10]})" in result.stdout
    record = json.loads(load_lora(out).metadata["selma.extract"])
    base_commit = head(olah.mirrors / "models" / BASE)
    assert (record["model"]["ref"], record["model"]["revision"], record["model"]["commit"]) == (
        MODEL,
        model_commit,
        model_commit,
    )
    assert (record["base"]["revision"], record["base"]["commit"]) == ("main", base_commit)
    # The files' sha256 are the Hub's (the cache names each downloaded file by it).
    blob = (
        tmp_path
        / "hf"
        / "hub"
        / "models--alice--tiny-sd1"
        / "snapshots"
        / base_commit
        / "unet"
        / "diffusion_pytorch_model.safetensors"
    )
    from selma_toolkit.io import sha256_file

    assert record["base"]["files"] == {"unet/diffusion_pytorch_model.safetensors": sha256_file(blob)}
    assert set(record["layers"]) == set(lora.modules)


def test_extract_entries_are_checked_naming_the_file_entry_and_key(tmp_path):
    cases = {
        'extract.rank 0: expected "auto" or a positive integer': 'extract = { model = "a/b", base = "c/d", rank = 0 }',
        "extract.components ['vae']: expected a list of model parts of sd1: unet, text_encoder": (
            'extract = { model = "a/b", base = "c/d", components = ["vae"] }'
        ),
        "repo id 'nobody': not a valid repo id": 'extract = { model = "nobody", base = "c/d" }',
        "expected a table with model and base": 'extract = { model = "a/b" }',
        "found unknown key(s) ['repo']": 'repo = "a/b"\nextract = { model = "a/b", base = "c/d" }',
    }
    for expected, body in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(f'[bad]\narchitecture = "sd1"\n{body}\n')
        with pytest.raises(HubError) as info:
            read_catalog(path)
        assert str(path) in str(info.value) and "[bad]" in str(info.value) and expected in str(info.value)


def test_the_shipped_catalog_names_the_selma_authors_models_as_unconfirmed_extractions():
    from selma_toolkit.resources import shipped_dir

    path = shipped_dir("hub") / "catalog.toml"
    entries = read_catalog(path)
    pairs = {name: (e.architecture, e.extract.model, e.extract.base) for name, e in entries.items() if e.extract}
    assert pairs == {
        "selma-sd14": ("sd1", "jialuliluka/selma-v1-4", "CompVis/stable-diffusion-v1-4"),
        "selma-sd2": ("sd2", "jialuliluka/selma-v2", "stabilityai/stable-diffusion-2"),
        "selma-sdxl": ("sdxl", "jialuliluka/selma-xl", "stabilityai/stable-diffusion-xl-base-1.0"),
        "selma-sdxl-512": ("sdxl", "jialuliluka/selma-xl-res512", "stabilityai/stable-diffusion-xl-base-1.0"),
    }
    assert "NOT CONFIRMED" in path.read_text()

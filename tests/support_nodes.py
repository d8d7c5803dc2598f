"""Support for the node-pack tests that run without ComfyUI: the nodes' classic classes, called as ComfyUI
calls them (every input a keyword), and pytest fixtures for the FAKE ComfyUI modules of support_comfyui.py
(registered in tests/conftest.py)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
from support_comfyui import FakeFolderPaths, fake_comfy, full_size_models

from comfyui_nodes.nodes import NODES
from comfyui_nodes.v1 import NODE_CLASS_MAPPINGS

(
    SelmaLoraLoader,
    SelmaExpertLoader,
    SelmaHubExpert,
    SelmaMergeExperts,
    SelmaApplyLora,
    SelmaMergeLoraStack,
    SelmaSaveLora,
) = (NODE_CLASS_MAPPINGS[spec.node_id] for spec in NODES)


@pytest.fixture
def loras(tmp_path, monkeypatch) -> Path:
    """An empty loras folder, served by the FAKE folder_paths module."""
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "folder_paths", FakeFolderPaths(folder))
    return folder


@pytest.fixture(scope="module")
def models():
    """Full-size SD 1.5 and SDXL UNets and CLIPs on the meta device (names and shapes only)."""
    return {arch: full_size_models(arch) for arch in ("sd1", "sdxl")}


@pytest.fixture
def sd15_comfy(models, monkeypatch):
    """The FAKE comfy modules over the full-size SD 1.5 UNet and CLIP-L: (MODEL, CLIP, load_lora_for_models calls)."""
    unet, text = models["sd1"]
    modules, model, clip, calls = fake_comfy(unet, text, "SD15")
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return model, clip, calls


def run(node: type, **inputs):
    """Run a node's classic class as ComfyUI does (every input a keyword); its outputs' values."""
    out = node().run(**inputs)
    return out["result"] if isinstance(out, dict) else out


def load(name: str, weight: float = 1.0, experts=None):
    """SELMA Expert Loader: the stack it returns."""
    (stacked,) = run(SelmaExpertLoader, lora_name=name, weight=weight, **({"experts": experts} if experts else {}))
    return stacked


def stack(*names_and_weights):
    """Chain SELMA Expert Loader nodes as a graph does; return the final stack."""
    experts = None
    for name, weight in names_and_weights:
        experts = load(name, weight, experts)
    return experts


def merge(experts, method="selma", rank=0, normalize=True, **options):
    """SELMA Merge Experts: (LORA_MODEL, summary)."""
    return run(SelmaMergeExperts, experts=experts, method=method, rank=rank, normalize_weights=normalize, **options)


def apply(model, clip, lora, strength_model=1.0, strength_clip=1.0):
    """SELMA Apply LoRA: (MODEL, CLIP, the LoRA)."""
    return run(
        SelmaApplyLora, model=model, clip=clip, lora=lora, strength_model=strength_model, strength_clip=strength_clip
    )


def save(lora, filename_prefix="merged", format="kohya", **fit):
    """SELMA Save LoRA: its whole answer ({"ui": ..., "result": ...})."""
    return SelmaSaveLora().run(lora=lora, filename_prefix=filename_prefix, format=format, **fit)


def pull(ref, weight, revision, endpoint, experts=None, **optional):
    """SELMA Hub Expert: the stack it returns."""
    (stacked,) = run(
        SelmaHubExpert,
        ref=ref,
        weight=weight,
        revision=revision,
        endpoint=endpoint,
        **({"experts": experts} if experts else {}),
        **optional,
    )
    return stacked


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

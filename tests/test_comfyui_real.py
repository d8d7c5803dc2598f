"""The node pack inside a real ComfyUI (opt-in: set COMFYUI_PATH to a ComfyUI checkout; see docs/comfyui.md).

ComfyUI runs headless with --cpu on 127.0.0.1, in its own Python environment (torch and ComfyUI's
requirements, no peft), with the repository linked into custom_nodes/ as a git clone would be. The
checkpoint is a random full-size SD 1.5 (ComfyUI recognises SD 1.5 only at full size), built once and
cached outside the repository; the experts are random kohya-layout LoRAs for its UNet and CLIP-L.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from support_comfyui import (
    CHECKPOINT_NAME,
    ComfyServer,
    FakeFolderPaths,
    cached_sd15_checkpoint,
    comfyui_install,
    execution_error,
    full_size_expert,
    full_size_models,
    load_pack_like_comfyui,
    run_in_comfyui,
    write_two_small_experts,
)
from support_lora import COMFY_CLIP_LAYERS

import comfyui_nodes
from comfyui_nodes.nodes import SelmaExpertLoader, SelmaMergeExperts
from selma_toolkit.lora import load_lora, merge_experts, save_lora

INSTALL = comfyui_install()
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(INSTALL is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tests"),
]
WORKFLOW = Path(comfyui_nodes.__file__).parent / "workflows" / "selma-merge-experts.api.json"
EXPERTS = ("countbench", "whoops", "localized-narratives")  # the file names the example workflow uses


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, repo_root):
    """ComfyUI with the pack linked into custom_nodes, the random checkpoint, three SD 1.5 experts,
    an SDXL expert and a pickled file in its loras folder."""
    comfyui, python = INSTALL
    checkpoint = cached_sd15_checkpoint(python, comfyui)
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "selma-toolkit").symlink_to(repo_root, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT_NAME).symlink_to(checkpoint)
    loras = base / "models" / "loras"
    (loras / "selma").mkdir(parents=True)
    models = full_size_models("sd1")
    for seed, skill in enumerate(EXPERTS):
        save_lora(full_size_expert("sd1", seed=seed, rank=4, models=models), loras / "selma" / f"{skill}.safetensors")
    save_lora(full_size_expert("sdxl", seed=9, unet_layers=("attn2.to_k",), text_layers=()), loras / "sdxl-expert.safetensors")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, loras / "pickled.pt")
    server = ComfyServer(comfyui, python, base).start()
    yield server
    server.stop()


def example_prompt(strength: float = 1.0, **changes) -> dict:
    """The API-format example workflow, made small and fast: 64 x 64 px, 1 step, the test checkpoint."""
    prompt = copy.deepcopy(json.loads(WORKFLOW.read_text()))
    prompt["1"]["inputs"]["ckpt_name"] = CHECKPOINT_NAME
    prompt["9"]["inputs"].update(width=64, height=64)
    prompt["10"]["inputs"].update(steps=1, seed=7)
    prompt["6"]["inputs"].update(strength_model=strength, strength_clip=strength)
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def run(comfy: ComfyServer, prompt: dict) -> dict:
    return comfy.wait(comfy.queue(prompt))


def image(comfy: ComfyServer, entry: dict) -> np.ndarray:
    (saved,) = entry["outputs"]["12"]["images"]
    return np.asarray(Image.open(comfy.base / "output" / saved["subfolder"] / saved["filename"]), dtype=np.int16)


def test_pack_loads_in_comfyui_and_merges_in_its_python_without_diffusers_peft_or_transformers(comfy, repo_root, tmp_path):
    _, python = INSTALL
    write_two_small_experts(tmp_path)
    loaded = load_pack_like_comfyui(repo_root, tmp_path, python)
    assert "selma merge of 2 experts" in loaded["summary"]
    info = comfy.get("/object_info")
    for name in ("SelmaExpertLoader", "SelmaHubExpert", "SelmaMergeExperts", "SelmaApplyLora", "SelmaSaveLora"):
        assert info[name]["category"] == "SELMA", name
    assert "selma/countbench.safetensors" in info["SelmaExpertLoader"]["input"]["required"]["lora_name"][0]
    log = comfy.log()
    assert re.search(r"seconds: \S*custom_nodes/selma-toolkit\n", log) and "IMPORT FAILED): " + str(comfy.base) not in log


def test_example_workflow_completes_and_the_merged_lora_changes_the_image(comfy):
    with_lora = run(comfy, example_prompt(1.0))
    assert with_lora["status"]["status_str"] == "success", execution_error(with_lora)
    without = run(comfy, example_prompt(0.0))
    again = run(comfy, example_prompt(1.0))
    assert without["status"]["status_str"] == again["status"]["status_str"] == "success"
    first, base, repeat = image(comfy, with_lora), image(comfy, without), image(comfy, again)
    assert np.array_equal(first, repeat)  # the run is deterministic, so the difference below is the LoRA's
    assert np.abs(first - base).mean() > 1.0, np.abs(first - base).mean()

    log = comfy.log()
    assert "lora key not loaded" not in log
    assert len(re.findall(r"SELMA Merge Experts: selma merge of 3 experts", log)) == 1  # re-queuing reused the merge
    assert "selma merge of 3 experts" in with_lora["outputs"]["14"]["text"][0]
    # SELMA Save LoRA wrote (once) what the library's merge of the three files gives.
    saved = sorted((comfy.base / "models" / "loras" / "selma").glob("merged_*.safetensors"))
    assert [p.name for p in saved] == ["merged_00001_.safetensors"]
    files = [comfy.base / "models" / "loras" / "selma" / f"{skill}.safetensors" for skill in EXPERTS]
    expected = merge_experts([load_lora(path) for path in files], "selma")
    written = load_lora(saved[0])
    assert set(written.modules) == set(expected.modules)
    for name, module in expected.modules.items():
        torch.testing.assert_close(written.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-7)


def test_node_errors_reach_comfyui_as_readable_messages(comfy):
    pickled = run(comfy, example_prompt(**{"2": {"lora_name": "pickled.pt"}}))
    error = execution_error(pickled)
    assert error["node_type"] == "SelmaExpertLoader" and "arbitrary code" in error["exception_message"]

    mixed = run(comfy, example_prompt(**{"4": {"lora_name": "sdxl-expert.safetensors"}}))
    error = execution_error(mixed)
    assert error["node_type"] == "SelmaMergeExperts"
    assert "is a LoRA for sd1 but sdxl-expert.safetensors is one for sdxl" in error["exception_message"]

    prompt = example_prompt(**{"2": {"lora_name": "sdxl-expert.safetensors"}})
    del prompt["3"], prompt["4"]
    prompt["5"]["inputs"]["experts"] = ["2", 0]
    wrong_model = run(comfy, prompt)
    error = execution_error(wrong_model)
    assert error["node_type"] == "SelmaApplyLora"
    assert "the LoRA is for sdxl but the MODEL is SD15 (sd1)" in error["exception_message"]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merge_node_output_is_loaded_whole_by_comfyui_key_maps(arch, tmp_path, monkeypatch):
    comfyui, python = INSTALL
    monkeypatch.setitem(sys.modules, "folder_paths", FakeFolderPaths(tmp_path))
    models = full_size_models(arch)
    experts = None
    for seed in range(2):
        expert = full_size_expert(arch, seed=seed, rank=1, unet_layers=None, text_layers=COMFY_CLIP_LAYERS, models=models)
        save_lora(expert, tmp_path / f"e{seed}.safetensors")
        (experts,) = SelmaExpertLoader().load(f"e{seed}.safetensors", 1.0, experts)
    lora = SelmaMergeExperts().merge(experts, "selma", 0, True)["result"][0]
    save_file(dict(lora), tmp_path / "merged.safetensors")
    answer = run_in_comfyui(python, comfyui, "key-check", str(tmp_path / "merged.safetensors"), arch)
    assert answer["model"] == {"sd1": "SD15", "sdxl": "SDXL"}[arch]
    assert answer["unloaded"] == [] and answer["patched"] == len(lora) // 3
    assert answer["unfit"] == []  # SELMA Apply LoRA's own check agrees with ComfyUI's key maps


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_an_extracted_lora_is_loaded_whole_by_comfyui_key_maps(arch, tmp_path):
    """`selma lora extract` on two full-size models that differ in every UNet layer and every CLIP layer
    ComfyUI maps (written in fp16: about 2 x 1.7 GB for SD 1.5, 2 x 5 GB for SDXL): ComfyUI patches every module."""
    from support_extract import full_size_pair

    from selma_toolkit.lora.extract import extract_lora, save_extraction

    comfyui, python = INSTALL
    base, model = full_size_pair(arch, tmp_path / "models")
    extraction = extract_lora(model, base)
    assert {layer.found for layer in extraction.changed} == {1}
    file = save_extraction(extraction, tmp_path / "extracted.safetensors")
    shutil.rmtree(tmp_path / "models")
    answer = run_in_comfyui(python, comfyui, "key-check", str(file), arch, timeout=600)
    assert answer["model"] == {"sd1": "SD15", "sdxl": "SDXL"}[arch]
    assert answer["unloaded"] == [] and answer["patched"] == len(extraction.weights.modules) and answer["unfit"] == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_ui_workflow_becomes_the_api_workflow_in_the_comfyui_frontend(comfy):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    ui = json.loads((WORKFLOW.parent / "selma-merge-experts.json").read_text())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            page = browser.new_page()
            page.goto(comfy.url, timeout=120_000)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            # What the frontend's "Save (API)" and "Queue" do with the loaded graph.
            converted = page.evaluate(
                "async (workflow) => { await window.app.loadGraphData(workflow); return (await window.app.graphToPrompt()).output; }",
                ui,
            )
        finally:
            browser.close()
    api = json.loads(WORKFLOW.read_text())
    converted["14"]["inputs"].pop("preview")  # Preview Any's display widget, not an input of the node
    assert {i: (n["class_type"], n["inputs"]) for i, n in converted.items()} == {
        i: (n["class_type"], n["inputs"]) for i, n in api.items()
    }

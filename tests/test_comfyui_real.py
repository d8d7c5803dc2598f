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
from comfyui_nodes.v1 import NODE_CLASS_MAPPINGS
from selma_toolkit.lora import load_lora, merge_experts, save_lora

INSTALL = comfyui_install()
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(INSTALL is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tests"),
]
API_WORKFLOWS = Path(comfyui_nodes.__file__).parent / "workflows_api"
WORKFLOW = API_WORKFLOWS / "selma-merge-experts.api.json"
EXPERTS = ("countbench", "whoops", "localized-narratives")  # the file names the example workflows use
# FAKEs of Comfyroll's CR LoRA Stack and CR Apply LoRA Stack (the same outputs and the same calls: a list of
# (file name under models/loras, model weight, clip weight), each entry applied with comfy.sd.load_lora_for_models),
# installed as a custom node pack beside ours: LORA_STACK in and out in a real ComfyUI.
FAKE_STACK_PACK = """
import comfy.sd, comfy.utils, folder_paths

class FakeCRLoraStack:
    RETURN_TYPES = ("LORA_STACK",)
    FUNCTION = "stack"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": ("STRING", {}), "weight": ("FLOAT", {"default": 1.0})},
                "optional": {"lora_stack": ("LORA_STACK",)}}

    def stack(self, lora_name, weight, lora_stack=None):
        return (list(lora_stack or []) + [(lora_name, weight, weight)],)

class FakeCRApplyLoraStack:
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "lora_stack": ("LORA_STACK",)}}

    def apply(self, model, clip, lora_stack):
        for name, strength_model, strength_clip in lora_stack:
            lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
            model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        return (model, clip)

NODE_CLASS_MAPPINGS = {"FakeCRLoraStack": FakeCRLoraStack, "FakeCRApplyLoraStack": FakeCRApplyLoraStack}
"""


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, repo_root):
    """ComfyUI with the pack linked into custom_nodes, the random checkpoint, three SD 1.5 experts,
    an SDXL expert and a pickled file in its loras folder."""
    comfyui, python = INSTALL
    checkpoint = cached_sd15_checkpoint(python, comfyui)
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "selma-toolkit").symlink_to(repo_root, target_is_directory=True)
    (base / "custom_nodes" / "fake_lora_stack").mkdir()
    (base / "custom_nodes" / "fake_lora_stack" / "__init__.py").write_text(FAKE_STACK_PACK)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT_NAME).symlink_to(checkpoint)
    loras = base / "models" / "loras"
    (loras / "selma").mkdir(parents=True)
    models = full_size_models("sd1")
    for seed, skill in enumerate(EXPERTS):
        save_lora(full_size_expert("sd1", seed=seed, rank=4, models=models), loras / "selma" / f"{skill}.safetensors")
    save_lora(
        full_size_expert("sdxl", seed=9, unet_layers=("attn2.to_k",), text_layers=()), loras / "sdxl-expert.safetensors"
    )
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, loras / "pickled.pt")
    server = ComfyServer(comfyui, python, base).start()
    yield server
    server.stop()


def small(prompt: dict) -> dict:
    """An API-format SD 1.5 example workflow made small and fast: 64 x 64 px, 1 step, the test checkpoint."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        changes = {
            "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT_NAME},
            "EmptyLatentImage": {"width": 64, "height": 64},
            "KSampler": {"steps": 1, "seed": 7},
        }.get(node["class_type"], {})
        node["inputs"].update(changes)
    return prompt


def example_prompt(strength: float = 1.0, **changes) -> dict:
    """The API-format merge-experts example workflow, made small (:func:`small`), Apply LoRA at ``strength``."""
    prompt = small(json.loads(WORKFLOW.read_text()))
    prompt["6"]["inputs"].update(strength_model=strength, strength_clip=strength)
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def run(comfy: ComfyServer, prompt: dict) -> dict:
    return comfy.wait(comfy.queue(prompt))


def image(comfy: ComfyServer, entry: dict, node: str = "12") -> np.ndarray:
    (saved,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(comfy.base / "output" / saved["subfolder"] / saved["filename"]), dtype=np.int16)


def test_pack_loads_in_comfyui_as_v3_nodes_and_merges_in_its_python_without_diffusers_peft_or_transformers(
    comfy, repo_root, tmp_path
):
    _, python = INSTALL
    write_two_small_experts(tmp_path)
    loaded = load_pack_like_comfyui(repo_root, tmp_path, python)  # ComfyUI's Python, without ComfyUI on sys.path
    assert "selma merge of 2 experts" in loaded["summary"] and not loaded["entrypoint"]
    info = comfy.get("/object_info")
    from comfyui_nodes.nodes import NODES

    for spec in NODES:
        assert info[spec.node_id]["category"] == "SELMA" and info[spec.node_id]["display_name"] == spec.display_name
    # Registered through comfy_entrypoint as V3 nodes: their combos are COMBO inputs with options (V1: lists).
    kind, options = info["SelmaExpertLoader"]["input"]["required"]["lora_name"]
    assert kind == "COMBO" and "selma/countbench.safetensors" in options["options"]
    assert "selma/countbench.safetensors" in info["SelmaLoraLoader"]["input"]["required"]["expert_3"][1]["options"]
    log = comfy.log()
    assert (
        re.search(r"seconds: \S*custom_nodes/selma-toolkit\n", log) and "IMPORT FAILED): " + str(comfy.base) not in log
    )
    assert "/extensions/selma-toolkit/selma.js" in json.dumps(comfy.get("/extensions"))
    # The template browser lists the four templates, served from the pack's example_workflows/.
    assert sorted(comfy.get("/workflow_templates")["selma-toolkit"]) == sorted(
        p.stem for p in (repo_root / "example_workflows").glob("*.json")
    )


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
    assert len(re.findall(r"SELMA merge: selma merge of 3 experts", log)) == 1  # re-queuing reused the merge
    assert "selma merge of 3 experts" in with_lora["outputs"]["14"]["text"][0]
    assert with_lora["outputs"]["13"]["text"] == ["saved loras/selma/merged_00001_.safetensors"]  # shown on the node
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
    saved_before = sorted((comfy.base / "models" / "loras" / "selma").glob("merged_*"))
    wrong_model = run(comfy, prompt)
    error = execution_error(wrong_model)
    assert error["node_type"] == "SelmaApplyLora"
    assert "the LoRA is for sdxl but the MODEL is SD15 (sd1)" in error["exception_message"]
    # Save LoRA saves what Apply passed on: a refused merge is never written.
    assert sorted((comfy.base / "models" / "loras" / "selma").glob("merged_*")) == saved_before


def test_lora_loader_template_merges_applies_and_saves_in_one_node(comfy):
    prompt = small(json.loads((API_WORKFLOWS / "selma-model-by-name.api.json").read_text()))
    with_lora = run(comfy, prompt)
    assert with_lora["status"]["status_str"] == "success", execution_error(with_lora)
    without = copy.deepcopy(prompt)
    without["2"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    base = run(comfy, without)
    assert base["status"]["status_str"] == "success", execution_error(base)
    # The node applied the merge (the image changed) and shows its summary; Save LoRA wrote what it applied.
    assert np.abs(image(comfy, with_lora, "8") - image(comfy, base, "8")).mean() > 1.0
    summary = with_lora["outputs"]["2"]["text"][0]
    assert summary.startswith("selma merge of 3 experts (selma/countbench.safetensors, selma/whoops.safetensors, ")
    # Saved, or (the same merge as the three-node graph's, when that test ran first) already saved: the node shows which.
    (shown,) = with_lora["outputs"]["9"]["text"]
    name = shown.split("loras/", 1)[1]
    assert shown in (f"saved loras/{name}", f"already saved as loras/{name}") and name.startswith("selma/merged_")
    written = load_lora(comfy.base / "models" / "loras" / name)
    files = [comfy.base / "models" / "loras" / "selma" / f"{skill}.safetensors" for skill in EXPERTS]
    expected = merge_experts([load_lora(path) for path in files], "selma")
    for name, module in expected.modules.items():
        torch.testing.assert_close(written.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-7)


def test_lora_stacks_go_in_and_a_fitted_merge_comes_out_as_a_stack_entry(comfy):
    """FAKE CR LoRA Stack entries -> SELMA LoRA Loader and SELMA Merge LoRA Stack -> FAKE CR Apply LoRA Stack."""
    prompt = small(json.loads((API_WORKFLOWS / "selma-model-by-name.api.json").read_text()))
    for index in range(1, 6):
        prompt["2"]["inputs"][f"expert_{index}"] = "None"
    prompt["20"] = {
        "class_type": "FakeCRLoraStack",
        "inputs": {"lora_name": "selma/countbench.safetensors", "weight": 1.0},
    }
    prompt["21"] = {
        "class_type": "FakeCRLoraStack",
        "inputs": {"lora_name": "selma/whoops.safetensors", "weight": 1.0, "lora_stack": ["20", 0]},
    }
    loader = copy.deepcopy(prompt)
    loader["2"]["inputs"]["lora_stack"] = ["21", 0]
    through_loader = run(comfy, loader)
    assert through_loader["status"]["status_str"] == "success", execution_error(through_loader)
    assert through_loader["outputs"]["2"]["text"][0].startswith("selma merge of 2 experts")
    # The same stack merged into a stack entry, applied by the stack consumer instead of SELMA's loader.
    stacked = copy.deepcopy(prompt)
    stacked["22"] = {
        "class_type": "SelmaMergeLoraStack",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_stack": ["21", 0],
            "method": "selma",
            "strength_model": 1.0,
            "strength_clip": 1.0,
            "rank": 0,
            "normalize_weights": True,
        },
    }
    stacked["23"] = {
        "class_type": "FakeCRApplyLoraStack",
        "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_stack": ["22", 0]},
    }
    for node_id, output in (("3", 1), ("4", 1)):
        stacked[node_id]["inputs"]["clip"] = ["23", output]
    stacked["6"]["inputs"]["model"] = ["23", 0]
    del stacked["2"], stacked["9"]
    through_stack = run(comfy, stacked)
    assert through_stack["status"]["status_str"] == "success", execution_error(through_stack)
    assert np.array_equal(image(comfy, through_stack, "8"), image(comfy, through_loader, "8"))  # the same merge applied
    (shown,) = through_stack["outputs"]["22"]["text"]
    entry = shown.rsplit("as loras/", 1)[1]
    assert entry.startswith("selma/stack/merged-") and (comfy.base / "models" / "loras" / entry).is_file()
    # A stack whose merge does not fit is refused, and no file is written for it.
    before = sorted((comfy.base / "models" / "loras" / "selma" / "stack").iterdir())
    misfit = copy.deepcopy(stacked)
    misfit["20"]["inputs"]["lora_name"] = "sdxl-expert.safetensors"
    misfit["21"] = {"class_type": "FakeCRLoraStack", "inputs": {"lora_name": "sdxl-expert.safetensors", "weight": 1.0}}
    refused = run(comfy, misfit)
    error = execution_error(refused)
    assert (
        error["node_type"] == "SelmaMergeLoraStack"
        and "the LoRA is for sdxl but the MODEL is SD15" in error["exception_message"]
    )
    assert sorted((comfy.base / "models" / "loras" / "selma" / "stack").iterdir()) == before


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merge_node_output_is_loaded_whole_by_comfyui_key_maps(arch, tmp_path, monkeypatch):
    comfyui, python = INSTALL
    monkeypatch.setitem(sys.modules, "folder_paths", FakeFolderPaths(tmp_path))
    models = full_size_models(arch)
    experts = ()
    for seed in range(2):
        expert = full_size_expert(
            arch, seed=seed, rank=1, unet_layers=None, text_layers=COMFY_CLIP_LAYERS, models=models
        )
        save_lora(expert, tmp_path / f"e{seed}.safetensors")
        (experts,) = NODE_CLASS_MAPPINGS["SelmaExpertLoader"]().run(
            lora_name=f"e{seed}.safetensors", weight=1.0, experts=experts
        )
    merged = NODE_CLASS_MAPPINGS["SelmaMergeExperts"]().run(
        experts=experts, method="selma", rank=0, normalize_weights=True
    )
    lora = merged["result"][0]
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
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_every_template_loads_in_the_frontend_without_missing_nodes_or_overlaps_and_becomes_its_api_copy(comfy):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    names = sorted(comfy.get("/workflow_templates")["selma-toolkit"])
    assert len(names) == 4
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            page = browser.new_page()
            page.goto(comfy.url, timeout=120_000)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            loaded = {}
            for name in names:
                # As the template browser opens one: fetched from the pack's route, loaded as a workflow; then what
                # "Queue" sends (graphToPrompt), the node types the frontend does not know, and each node's box.
                loaded[name] = page.evaluate(
                    """async (name) => {
                        const workflow = await (await fetch(`/api/workflow_templates/selma-toolkit/${name}.json`)).json();
                        await window.app.loadGraphData(workflow);
                        const nodes = window.app.graph.nodes;
                        return {prompt: (await window.app.graphToPrompt()).output,
                                missing: nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
                                boxes: Object.fromEntries(nodes.map((n) => [n.id, Array.from(n.boundingRect)]))};
                    }""",
                    name,
                )
            # The web extension shows a node's text output on it, outside the saved workflow and the prompt.
            shown = page.evaluate(
                """async () => {
                    const node = window.app.graph.nodes.find((n) => n.type === "SelmaSaveLora");
                    node.onExecuted({text: ["saved loras/selma/merged_00001_.safetensors"]});
                    const widget = node.widgets.find((w) => w.name === "selma_output");
                    const saved = window.app.graph.serialize().nodes.find((n) => n.id === node.id).widgets_values;
                    return {value: widget.value, saved, prompt: (await window.app.graphToPrompt()).output[node.id].inputs};
                }"""
            )
        finally:
            browser.close()
    for name in names:
        result = loaded[name]
        assert result["missing"] == [], (name, result["missing"])
        boxes = {i: (x, y, x + w, y + h) for i, (x, y, w, h) in result["boxes"].items()}
        overlapping = [
            (a, b)
            for a in boxes
            for b in boxes
            if a < b
            and boxes[a][0] < boxes[b][2]
            and boxes[b][0] < boxes[a][2]
            and boxes[a][1] < boxes[b][3]
            and boxes[b][1] < boxes[a][3]
        ]
        assert overlapping == [], (name, overlapping)
        api = json.loads((API_WORKFLOWS / f"{name}.api.json").read_text())
        converted = result["prompt"]
        for node in converted.values():
            node["inputs"].pop("preview", None)  # Preview Any's display widget, not an input of the node
        assert {i: (n["class_type"], n["inputs"]) for i, n in converted.items()} == {
            i: (n["class_type"], n["inputs"]) for i, n in api.items()
        }, name
    assert shown["value"] == "saved loras/selma/merged_00001_.safetensors"
    # Neither saved with the workflow (still only Save LoRA's two widgets) nor sent as an input.
    assert (
        "selma_output" not in shown["prompt"] and len(shown["saved"]) == 2 and "saved loras" not in str(shown["saved"])
    )

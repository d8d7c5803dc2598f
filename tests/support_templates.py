"""The example workflows (ComfyUI templates): each graph defined once here, in the API format, with its layout.

``example_workflows/<name>.json`` (UI format, at the pack's root, where ComfyUI's template browser
lists them) and ``comfyui_nodes/workflows_api/<name>.api.json`` (API format, for POST /prompt and
the graph tests) are written from these definitions by ComfyUI's own frontend: run

    COMFYUI_PATH=/path/to/ComfyUI python tests/support_templates.py

which starts ComfyUI with the pack, has the frontend load each API graph (``app.loadApiJson``) and
serialize it (``app.graph.serialize()``), and places the nodes in the columns of :data:`LAYOUTS`
with sizes at least those the frontend computes, so that no two node boxes overlap.
tests/test_comfyui_nodes.py checks the files against each other and these definitions;
tests/test_comfyui_real.py loads each one in the frontend (no missing node, no overlap).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_FOLDER = ROOT / "example_workflows"
API_FOLDER = ROOT / "comfyui_nodes" / "workflows_api"
PROMPT = "three red apples on a table next to a penguin sunbathing in the desert"
NEGATIVE = "blurry, low quality"
SD15 = "v1-5-pruned-emaonly.safetensors"
SD15_EXPERTS = ("selma/countbench.safetensors", "selma/whoops.safetensors", "selma/localized-narratives.safetensors")
MERGE_SETTINGS = {
    "rank": 0,
    "normalize_weights": True,
    "density": 0.5,
    "dare_seed": 0,
    "block_weights": "",
    "svd_mode": "exact",
}
GAP_X, GAP_Y, TITLE = 60, 50, 30  # px between columns and between nodes; ComfyUI's node title height


def node(class_type: str, title: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


def lora_loader(experts: tuple[str, ...], model: list, clip: list, title: str) -> dict:
    """SELMA LoRA Loader with ``experts`` in its first slots (weight 1 each), the rest None."""
    slots = {}
    for index in range(1, 6):
        slots[f"expert_{index}"] = experts[index - 1] if index <= len(experts) else "None"
        slots[f"weight_{index}"] = 1.0
    return node(
        "SelmaLoraLoader",
        title,
        model=model,
        clip=clip,
        **slots,
        method="selma",
        strength_model=1.0,
        strength_clip=1.0,
        **MERGE_SETTINGS,
    )


def sampling(first: int, model: list, clip: list, vae: list, size: int, steps: int, cfg: float, prefix: str) -> dict:
    """Prompt, negative prompt, empty latent, KSampler, VAE Decode, Save Image as nodes first, first + 1, ..."""
    ids = [str(first + i) for i in range(6)]
    return {
        ids[0]: node("CLIPTextEncode", "Prompt", text=PROMPT, clip=clip),
        ids[1]: node("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip),
        ids[2]: node("EmptyLatentImage", "Empty Latent Image", width=size, height=size, batch_size=1),
        ids[3]: node(
            "KSampler",
            "KSampler",
            seed=0,
            steps=steps,
            cfg=cfg,
            sampler_name="euler",
            scheduler="normal",
            denoise=1.0,
            model=model,
            positive=[ids[0], 0],
            negative=[ids[1], 0],
            latent_image=[ids[2], 0],
        ),
        ids[4]: node("VAEDecode", "VAE Decode", samples=[ids[3], 0], vae=vae),
        ids[5]: node("SaveImage", "Save Image", filename_prefix=prefix, images=[ids[4], 0]),
    }


def merge_experts_graph() -> dict:
    """Three Expert Loaders -> Merge Experts -> Apply LoRA (the power users' graph); Save LoRA saves what Apply
    applied."""
    graph = {
        "1": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=SD15),
        "2": node("SelmaExpertLoader", "Expert: counting", lora_name=SD15_EXPERTS[0], weight=1.0),
        "3": node("SelmaExpertLoader", "Expert: commonsense", lora_name=SD15_EXPERTS[1], weight=1.0, experts=["2", 0]),
        "4": node(
            "SelmaExpertLoader", "Expert: long captions", lora_name=SD15_EXPERTS[2], weight=1.0, experts=["3", 0]
        ),
        "5": node("SelmaMergeExperts", "SELMA Merge Experts", experts=["4", 0], method="selma", **MERGE_SETTINGS),
        "6": node(
            "SelmaApplyLora",
            "SELMA Apply LoRA",
            model=["1", 0],
            clip=["1", 1],
            lora=["5", 0],
            strength_model=1.0,
            strength_clip=1.0,
        ),
    }
    graph.update(sampling(7, ["6", 0], ["6", 1], ["1", 2], 512, 30, 7.5, "selma"))
    graph["13"] = node(
        "SelmaSaveLora", "SELMA Save LoRA", filename_prefix="selma/merged", format="kohya", lora=["6", 2]
    )
    graph["14"] = node("PreviewAny", "Merge summary", source=["5", 1])
    return graph


def by_name_graph() -> dict:
    """SELMA LoRA Loader: experts chosen by name (loras files, pulled catalog names), merged and applied in one node."""
    graph = {
        "1": node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name=SD15),
        "2": lora_loader(SD15_EXPERTS, ["1", 0], ["1", 1], "SELMA LoRA Loader"),
    }
    graph.update(sampling(3, ["2", 0], ["2", 1], ["1", 2], 512, 30, 7.5, "selma"))
    graph["9"] = node("SelmaSaveLora", "SELMA Save LoRA", filename_prefix="selma/merged", format="kohya", lora=["2", 2])
    return graph


def sdxl_graph() -> dict:
    """SDXL base with SDXL experts through SELMA LoRA Loader, at 1024 px."""
    experts = (
        "selma/sdxl-countbench.safetensors",
        "selma/sdxl-whoops.safetensors",
        "selma/sdxl-localized-narratives.safetensors",
    )
    graph = {
        "1": node("CheckpointLoaderSimple", "Load Checkpoint (SDXL)", ckpt_name="sd_xl_base_1.0.safetensors"),
        "2": lora_loader(experts, ["1", 0], ["1", 1], "SELMA LoRA Loader (SDXL experts)"),
    }
    graph.update(sampling(3, ["2", 0], ["2", 1], ["1", 2], 1024, 30, 7.0, "selma-sdxl"))
    graph["9"] = node(
        "SelmaSaveLora", "SELMA Save LoRA", filename_prefix="selma/merged-sdxl", format="kohya", lora=["2", 2]
    )
    return graph


def flux_graph() -> dict:
    """FLUX.1 [dev] (diffusion model, CLIP-L + T5, VAE) with Flux experts through SELMA LoRA Loader; guidance 3.5,
    CFG 1."""
    experts = ("selma/flux-countbench.safetensors", "selma/flux-whoops.safetensors")
    return {
        "1": node("UNETLoader", "Load Diffusion Model", unet_name="flux1-dev.safetensors", weight_dtype="default"),
        "2": node(
            "DualCLIPLoader",
            "DualCLIPLoader",
            clip_name1="clip_l.safetensors",
            clip_name2="t5xxl_fp16.safetensors",
            type="flux",
            device="default",
        ),
        "3": node("VAELoader", "Load VAE", vae_name="ae.safetensors"),
        "4": lora_loader(experts, ["1", 0], ["2", 0], "SELMA LoRA Loader (Flux experts)"),
        "5": node("CLIPTextEncode", "Prompt", text=PROMPT, clip=["4", 1]),
        "6": node("FluxGuidance", "FluxGuidance", guidance=3.5, conditioning=["5", 0]),
        "7": node("CLIPTextEncode", "Negative prompt (unused at CFG 1)", text="", clip=["4", 1]),
        "8": node("EmptySD3LatentImage", "EmptySD3LatentImage", width=1024, height=1024, batch_size=1),
        "9": node(
            "KSampler",
            "KSampler",
            seed=0,
            steps=20,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            denoise=1.0,
            model=["4", 0],
            positive=["6", 0],
            negative=["7", 0],
            latent_image=["8", 0],
        ),
        "10": node("VAEDecode", "VAE Decode", samples=["9", 0], vae=["3", 0]),
        "11": node("SaveImage", "Save Image", filename_prefix="selma-flux", images=["10", 0]),
        "12": node(
            "SelmaSaveLora", "SELMA Save LoRA", filename_prefix="selma/merged-flux", format="kohya", lora=["4", 2]
        ),
    }


GRAPHS = {
    "selma-merge-experts": merge_experts_graph,
    "selma-model-by-name": by_name_graph,
    "selma-sdxl": sdxl_graph,
    "selma-flux": flux_graph,
}
# Node ids per column, left to right, top to bottom.
LAYOUTS = {
    "selma-merge-experts": [["1", "2", "3", "4"], ["5", "14"], ["6", "13"], ["7", "8", "9"], ["10"], ["11", "12"]],
    "selma-model-by-name": [["1"], ["2"], ["3", "4", "5"], ["6", "9"], ["7", "8"]],
    "selma-sdxl": [["1"], ["2"], ["3", "4", "5"], ["6", "9"], ["7", "8"]],
    "selma-flux": [["1", "2", "3"], ["4"], ["5", "6", "7", "8"], ["9", "12"], ["10", "11"]],
}
MIN_SIZE = {"CLIPTextEncode": (400, 120), "SaveImage": (320, 300), "PreviewAny": (320, 160)}  # room to read/show
WIDTH = 320


def layout(ui: dict, columns: list[list[str]], sizes: dict[str, list[float]]) -> dict:
    """``ui`` with every node placed in ``columns``: sizes at least the frontend's computed ``sizes``
    (node id -> [width, height], without the title bar), columns GAP_X apart, nodes GAP_Y apart."""
    by_id = {str(n["id"]): n for n in ui["nodes"]}
    x = 40.0
    for column in columns:
        y = 80.0
        widths = []
        for node_id in column:
            item = by_id[node_id]
            least = MIN_SIZE.get(item["type"], (WIDTH, 0))
            width, height = max(sizes[node_id][0], least[0]), max(sizes[node_id][1], least[1])
            item["pos"], item["size"] = [x, y], [width, height]
            y += TITLE + height + GAP_Y
            widths.append(width)
        x += max(widths) + GAP_X
    assert sorted(by_id) == sorted(i for column in columns for i in column), "every node in one column"
    ui["extra"] = {"ds": {"scale": 0.7, "offset": [0, 0]}}
    return ui


def build(comfyui: Path, python: Path) -> None:
    """Write every template (UI and API format) through ComfyUI's frontend."""
    import tempfile

    from playwright.sync_api import sync_playwright
    from support_comfyui import ComfyServer

    with tempfile.TemporaryDirectory(prefix="selma-templates-") as tmp:
        base = Path(tmp)
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / "selma-toolkit").symlink_to(ROOT, target_is_directory=True)
        server = ComfyServer(comfyui, python, base).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(server.url, timeout=120_000)
                page.wait_for_function("window.app && window.app.graph", timeout=120_000)
                for name, graph in GRAPHS.items():
                    api = graph()
                    ui, sizes = page.evaluate(
                        """async ([api, name]) => { await window.app.loadApiJson(api, name); const sizes = {};
                           for (const n of window.app.graph.nodes) {
                             const control = (n.widgets ?? []).find((w) => w.name === "control_after_generate");
                             if (control) control.value = "fixed";
                             sizes[n.id] = Array.from(n.computeSize());
                           }
                           return [window.app.graph.serialize(), sizes]; }""",
                        [api, name],
                    )
                    API_FOLDER.mkdir(exist_ok=True)
                    UI_FOLDER.mkdir(exist_ok=True)
                    (API_FOLDER / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n")
                    (UI_FOLDER / f"{name}.json").write_text(
                        json.dumps(layout(ui, LAYOUTS[name], sizes), indent=2) + "\n"
                    )
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from support_comfyui import comfyui_install

    install = comfyui_install()
    if install is None:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    build(*install)

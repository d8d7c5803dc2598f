"""Support for the ComfyUI node-pack tests.

* :class:`FakeFolderPaths` is a FAKE of ComfyUI's ``folder_paths`` module (only the four functions the
  nodes call, over one temporary loras folder), for the always-on tests that run without ComfyUI.
* :func:`fake_comfy` FAKEs the ``comfy.*`` functions SELMA Apply LoRA calls (key maps, load_lora,
  load_lora_for_models) and a MODEL / CLIP over meta-device diffusers models.
* :func:`full_size_expert` writes random kohya-layout experts for the full-size SD 1.5 / SDXL UNet
  and CLIPs, built from the diffusers module names and shapes (meta device, no weights).
* Real ComfyUI (opt-in, ``COMFYUI_PATH``): :func:`comfyui_install` finds the checkout and its Python,
  :func:`cached_sd15_checkpoint` builds (once, cached outside the repository) a random full-size SD 1.5
  checkpoint in ComfyUI's own environment, :class:`ComfyServer` runs ComfyUI headless on 127.0.0.1.

This file is also a script run by ComfyUI's Python (``python support_comfyui.py build-checkpoint OUT``,
``... key-check FILE ARCH``), so its top level imports only the standard library.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

from support_servers import stop_process

CHECKPOINT_NAME = "sd15-random-v1.safetensors"  # bump the version when the recipe below changes


# --------------------------------------------------------------------------- fake folder_paths


class FakeFolderPaths(types.ModuleType):
    """FAKE ``folder_paths``: one loras folder; the same signatures and return shapes as ComfyUI's."""

    def __init__(self, loras: Path):
        super().__init__("folder_paths")
        self.loras = Path(loras)

    def get_folder_paths(self, folder_name: str) -> list[str]:
        assert folder_name == "loras"
        return [str(self.loras)]

    def get_filename_list(self, folder_name: str) -> list[str]:
        assert folder_name == "loras"
        return sorted(p.relative_to(self.loras).as_posix() for p in self.loras.rglob("*") if p.is_file())

    def get_full_path(self, folder_name: str, filename: str) -> str | None:
        assert folder_name == "loras"
        path = self.loras / filename
        return str(path) if path.is_file() else None

    def get_save_image_path(self, filename_prefix: str, output_dir: str):
        folder = Path(output_dir) / os.path.dirname(os.path.normpath(filename_prefix))
        name = os.path.basename(os.path.normpath(filename_prefix))
        folder.mkdir(parents=True, exist_ok=True)
        counter = 1 + sum(1 for p in folder.glob(f"{name}_*_.*"))
        return str(folder), name, counter, os.path.dirname(filename_prefix), filename_prefix


# ------------------------------------------------------------------------ fake comfy.* modules


class FakeLoRAAdapter:
    """FAKE of ComfyUI 0.3.x ``comfy.weight_adapter.LoRAAdapter``: ``name`` "lora", ``loaded_keys``, and
    ``weights`` = (up, down, alpha, mid, dora_scale, reshape)."""

    name = "lora"

    def __init__(self, loaded_keys: set[str], weights: tuple):
        self.loaded_keys = loaded_keys
        self.weights = weights


_COMFY_CLIP_NAMES = {
    "text_encoder": ("clip_l", ("lora_te_", "lora_te1_")),
    "text_encoder_2": ("clip_g", ("lora_te2_",)),
}
_COMFY_CLIP_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def fake_comfy(unet, text_encoders: dict, config_name: str):
    """FAKE ComfyUI modules and objects for SELMA Apply LoRA, over (meta-device) diffusers models.

    Returns (modules for ``sys.modules``: comfy, comfy.lora, comfy.lora_convert, comfy.sd; the MODEL;
    the CLIP; the list of ``load_lora_for_models`` calls). The MODEL is a ModelPatcher-like object
    whose ``.model`` holds the UNet as ``diffusion_model`` and a ``model_config`` of class
    ``config_name`` (e.g. SD15); the CLIP's ``cond_stage_model`` holds each text encoder as
    ``clip_l`` / ``clip_g`` ``.transformer``. The key maps follow ComfyUI's kohya rule: ``lora_unet_``
    + the UNet module path with "." -> "_" for every Linear / Conv2d, ``lora_te_`` / ``lora_te1_``
    (``lora_te2_``) + ``text_model_`` + the path for the CLIP layers ComfyUI knows; ``load_lora`` makes
    a FakeLoRAAdapter for every key-map prefix with ``.lora_up.weight`` and ``.lora_down.weight``."""
    import torch

    class BaseModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = unet
            self.model_config = type(config_name, (), {})()

    class ClipModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for component, encoder in text_encoders.items():
                wrapper = torch.nn.Module()
                wrapper.transformer = encoder
                self.add_module(_COMFY_CLIP_NAMES[component][0], wrapper)

    def model_lora_keys_unet(model, key_map):
        for path, layer in model.diffusion_model.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                key_map["lora_unet_" + path.replace(".", "_")] = f"diffusion_model.{path}.weight"
        return key_map

    def model_lora_keys_clip(clip_model, key_map):
        for component, encoder in text_encoders.items():
            name, prefixes = _COMFY_CLIP_NAMES[component]
            for path, layer in encoder.named_modules():
                if isinstance(layer, torch.nn.Linear) and ".layers." in path and path.endswith(_COMFY_CLIP_LAYERS):
                    full = path if path.startswith("text_model.") else "text_model." + path
                    for prefix in prefixes:
                        key_map[prefix + full.replace(".", "_")] = f"{name}.transformer.{path}.weight"
        return key_map

    def load_lora(lora, to_load, log_missing=True):
        patches = {}
        for prefix, target in to_load.items():
            up, down, alpha = f"{prefix}.lora_up.weight", f"{prefix}.lora_down.weight", f"{prefix}.alpha"
            if up in lora and down in lora:
                value = float(lora[alpha]) if alpha in lora else None
                patches[target] = FakeLoRAAdapter({up, down, alpha}, (lora[up], lora[down], value, None, None, None))
        return patches

    calls: list[tuple] = []

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
        calls.append((model, clip, lora, strength_model, strength_clip))
        return ("patched MODEL", "patched CLIP")

    comfy = types.ModuleType("comfy")
    comfy.lora = types.ModuleType("comfy.lora")
    comfy.lora.model_lora_keys_unet, comfy.lora.model_lora_keys_clip = model_lora_keys_unet, model_lora_keys_clip
    comfy.lora.load_lora = load_lora
    comfy.lora_convert = types.ModuleType("comfy.lora_convert")
    comfy.lora_convert.convert_lora = lambda lora: lora
    comfy.sd = types.ModuleType("comfy.sd")
    comfy.sd.load_lora_for_models = load_lora_for_models
    modules = {"comfy": comfy, "comfy.lora": comfy.lora, "comfy.lora_convert": comfy.lora_convert, "comfy.sd": comfy.sd}
    model = types.SimpleNamespace(model=BaseModel())
    clip = types.SimpleNamespace(cond_stage_model=ClipModel())
    return modules, model, clip, calls


# ------------------------------------------------------------------------------ expert builders


SD15_ATTENTION = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
CLIP_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def full_size_models(arch: str):
    """(UNet, {component: text encoder}) of the full-size model on the meta device."""
    from support_lora import meta_text_encoder, meta_unet

    text = {"text_encoder": meta_text_encoder("clip_l")}
    if arch == "sdxl":
        text["text_encoder_2"] = meta_text_encoder("clip_g")
    elif arch == "sd2":
        text = {"text_encoder": meta_text_encoder("clip_h")}
    return meta_unet(arch), text


def full_size_expert(
    arch: str,
    *,
    seed: int,
    rank: int = 4,
    unet_layers=SD15_ATTENTION,
    text_layers=CLIP_ATTENTION,
    scale: float = 0.05,
    models=None,
):
    """A random LoraWeights on the full-size ``arch`` model's layers whose path ends with one of
    ``unet_layers`` / ``text_layers`` (None: every Linear and Conv2d of that part)."""
    import torch

    from selma_toolkit.lora import LoraModule, LoraWeights, canonical_module_name

    unet, text = models or full_size_models(arch)
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component, model, layers in [("unet", unet, unet_layers)] + [(c, m, text_layers) for c, m in text.items()]:
        for path, layer in model.named_modules():
            if layers is not None and not path.endswith(tuple(layers)):
                continue
            if isinstance(layer, torch.nn.Linear):
                down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
            elif isinstance(layer, torch.nn.Conv2d):
                down_shape, up_shape = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
            else:
                continue
            down = torch.randn(down_shape, generator=generator) * scale
            up = torch.randn(up_shape, generator=generator) * scale
            modules[canonical_module_name(component, path)] = LoraModule(down, up, float(rank))
    return LoraWeights(modules=modules, metadata={"selma.skill": f"random-{seed}"})


# ------------------------------------------------------------------------------- real ComfyUI


def comfyui_install() -> tuple[Path, Path] | None:
    """(checkout, python) from COMFYUI_PATH and COMFYUI_PYTHON (default: the python next to the
    checkout, ``$COMFYUI_PATH/../venv/bin/python``, then ``$COMFYUI_PATH/venv/bin/python``); None
    when COMFYUI_PATH is unset."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        return None
    root_path = Path(root).expanduser().resolve()
    python = os.environ.get("COMFYUI_PYTHON")
    if python:
        return root_path, Path(python)
    for candidate in (
        root_path.parent / "venv" / "bin" / "python",
        root_path / "venv" / "bin" / "python",
        root_path / ".venv" / "bin" / "python",
    ):
        if candidate.exists():
            return root_path, candidate
    raise RuntimeError(f"COMFYUI_PATH={root} but no python beside it; set COMFYUI_PYTHON to ComfyUI's python")


def checkpoint_cache() -> Path:
    """Where the random SD 1.5 checkpoint is kept: COMFYUI_TEST_CACHE, else ``<COMFYUI_PATH>/../cache``."""
    configured = os.environ.get("COMFYUI_TEST_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ["COMFYUI_PATH"]).expanduser().resolve().parent / "cache"


def cached_sd15_checkpoint(python: Path, comfyui: Path, timeout: float = 900) -> Path:
    """The random full-size SD 1.5 checkpoint (about 4 GB), built by ComfyUI's Python when missing."""
    out = checkpoint_cache() / CHECKPOINT_NAME
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(python), __file__, "build-checkpoint", str(out)],
            check=True,
            timeout=timeout,
            env={**os.environ, "COMFYUI_PATH": str(comfyui)},
            capture_output=True,
        )
    return out


def run_in_comfyui(python: Path, comfyui: Path, *args: str, timeout: float = 300) -> dict:
    """Run one of this file's script commands with ComfyUI's Python; return its JSON answer."""
    result = subprocess.run(
        [str(python), __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COMFYUI_PATH": str(comfyui)},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """ComfyUI started headless (--cpu) on 127.0.0.1 with ``base`` as its base directory."""

    def __init__(self, comfyui: Path, python: Path, base: Path):
        self.comfyui, self.python, self.base = comfyui, python, base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> ComfyServer:
        for folder in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the server's log, closed by stop()
        self._process = subprocess.Popen(
            [
                str(self.python),
                str(self.comfyui / "main.py"),
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(self.base),
                "--disable-auto-launch",
            ],
            cwd=self.comfyui,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer at {self.url}; log:\n{self.log()[-4000:]}")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=10) as response:
            return json.loads(response.read())

    def queue(self, prompt: dict) -> str:
        request = urllib.request.Request(
            self.url + "/prompt",
            data=json.dumps({"prompt": prompt}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"ComfyUI refused the prompt: {exc.read().decode()[:3000]}") from None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The history entry of a finished prompt (status 'success' or 'error')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            if self._process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; log:\n{self.log()[-4000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self._process, timeout=20)
        if getattr(self, "_log", None):
            self._log.close()


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


# ------------------------------------------------------------------ loading the pack as ComfyUI does


BLOCKED = ("diffusers", "peft", "transformers", "huggingface_hub", "accelerate", "openai")
_LOAD_LIKE_COMFYUI = """
import importlib.abc, importlib.util, json, socket, sys
blocked = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{{name}} is blocked: the node pack must not need it")
sys.meta_path.insert(0, Block())
def no_network(*args, **kwargs):
    raise OSError("the node pack must not open network connections")
socket.socket.connect = socket.create_connection = no_network
# As ComfyUI's nodes.load_custom_node: the module is named after its path, loaded from __init__.py.
pack = {pack!r}
spec = importlib.util.spec_from_file_location(pack.replace(".", "_x_"), pack + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
import selma_toolkit
sys.path.insert(0, {tests!r})
from support_comfyui import FakeFolderPaths
sys.modules["folder_paths"] = FakeFolderPaths({loras!r})
nodes = module.NODE_CLASS_MAPPINGS
experts = ()
for name in ("a.safetensors", "b.safetensors"):
    (experts,) = nodes["SelmaExpertLoader"]().run(lora_name=name, weight=1.0, experts=experts)
result = nodes["SelmaMergeExperts"]().run(experts=experts, method="selma", rank=0, normalize_weights=True)
nodes["SelmaSaveLora"]().run(lora=result["result"][0], filename_prefix="merged", format="kohya")
print(json.dumps({{"nodes": sorted(nodes), "names": sorted(module.NODE_DISPLAY_NAME_MAPPINGS.values()),
                  "exports": sorted(module.__all__), "entrypoint": hasattr(module, "comfy_entrypoint"),
                  "web": module.WEB_DIRECTORY, "toolkit": selma_toolkit.__file__, "summary": result["result"][1]}}))
"""


def load_pack_like_comfyui(pack: Path, loras: Path, python: str | Path = sys.executable) -> dict:
    """Import the pack folder ``pack`` as ComfyUI does, in ``python``, with diffusers, peft,
    transformers, huggingface_hub, accelerate and openai unimportable and sockets refused; then merge
    a.safetensors and b.safetensors of ``loras`` through the nodes and save the result there."""
    code = _LOAD_LIKE_COMFYUI.format(
        blocked=BLOCKED, pack=str(pack), tests=str(Path(__file__).parent), loras=str(loras)
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=180, cwd=loras)
    if result.returncode != 0:
        raise AssertionError(f"loading the pack failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_two_small_experts(loras: Path) -> None:
    """a.safetensors and b.safetensors: random rank-2 kohya LoRAs on one SD 1.5 layer."""
    import torch
    from safetensors.torch import save_file

    for seed, name in enumerate(("a", "b")):
        generator = torch.Generator().manual_seed(seed)
        save_file(
            {
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(
                    2, 320, generator=generator
                ),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 2, generator=generator),
            },
            loras / f"{name}.safetensors",
        )


# --------------------------------------------------------------- run by ComfyUI's own Python


def _import_comfy():
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported


def _build_checkpoint(out: str) -> dict:
    """A random full-size SD 1.5 checkpoint: diffusers parts saved, read by ComfyUI, written as one file."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    _import_comfy()
    import comfy.diffusers_load
    import comfy.sd

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ).save_pretrained(root / "unet")
        AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ).save_pretrained(root / "vae")
        config = CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
            vocab_size=49408,
            max_position_embeddings=77,
        )
        CLIPTextModel(config).save_pretrained(root / "text_encoder")
        # transformers 5 writes CLIP keys without "text_model."; ComfyUI would then leave the encoder at zero.
        clip_file = root / "text_encoder" / "model.safetensors"
        tensors = load_file(clip_file)
        save_file({(k if k.startswith("text_model.") else "text_model." + k): v for k, v in tensors.items()}, clip_file)
        model, clip, vae = comfy.diffusers_load.load_diffusers(str(root))
        partial = out + ".partial"
        comfy.sd.save_checkpoint(partial, model, clip, vae)
        os.replace(partial, out)
    return {"checkpoint": out}


def _key_check(lora_file: str, arch: str) -> dict:
    """Map a LoRA file with ComfyUI's own key maps for the full-size ``arch`` UNet and CLIP(s)
    (built on the meta device): how many modules it patches and which keys it leaves unloaded."""
    import logging

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    _import_comfy()
    import comfy.lora
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.sdxl_clip

    # support_lora imports the toolkit: the checkout's copy, as a git-clone install of the pack has it.
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
    from support_lora import FULL_SIZE_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**FULL_SIZE_UNET[arch])
    model = comfy.model_detection.model_config_from_diffusers_unet(unet.state_dict()).get_model({}, device="meta")
    clip = (
        comfy.sdxl_clip.SDXLClipModel(device="meta") if arch == "sdxl" else comfy.sd1_clip.SD1ClipModel(device="meta")
    )
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    unloaded: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            match = re.match(r"lora key not loaded: (.+)", record.getMessage())
            if match:
                unloaded.append(match.group(1))

    logging.getLogger().addHandler(Collect())
    lora = load_file(lora_file)
    patches = comfy.lora.load_lora(lora, key_map)
    # What SELMA Apply LoRA finds with the same real key map and patches (ComfyUI's own LoRAAdapter objects).
    from comfyui_nodes.fit import comfy_lora_fit, weight_shapes

    unmatched, misfits = comfy_lora_fit(lora, key_map, patches, {**weight_shapes(model), **weight_shapes(clip)})
    return {
        "model": type(model.model_config).__name__,
        "patched": len(patches),
        "keys": len(lora),
        "unloaded": unloaded,
        "unfit": unmatched[:5] + [misfit.describe("the model") for misfit in misfits[:5]],
    }


def _qwen_image_key_check(lora_file: str, config: str) -> dict:
    """Map a LoRA file with ComfyUI's own key map of a Qwen-Image model that ComfyUI detects from the
    state dict of a diffusers QwenImageTransformer2DModel built from ``config`` (JSON keyword
    arguments): how many modules it patches and which keys it leaves unloaded."""
    import logging

    import diffusers
    from safetensors.torch import load_file

    _import_comfy()
    import comfy.lora
    import comfy.model_detection

    state = diffusers.QwenImageTransformer2DModel(**json.loads(config)).state_dict()
    model_config = comfy.model_detection.model_config_from_unet(state, "")
    model = model_config.get_model(state, "", device="cpu")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    unloaded: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            match = re.match(r"lora key not loaded: (.+)", record.getMessage())
            if match:
                unloaded.append(match.group(1))

    logging.getLogger().addHandler(Collect())
    lora = load_file(lora_file)
    patches = comfy.lora.load_lora(lora, key_map)
    return {"model": type(model_config).__name__, "patched": len(patches), "keys": len(lora), "unloaded": unloaded}


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    answer = {
        "build-checkpoint": _build_checkpoint,
        "key-check": _key_check,
        "qwen-image-key-check": _qwen_image_key_check,
    }[command](*arguments)
    print(json.dumps(answer))

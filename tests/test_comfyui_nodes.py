"""The ComfyUI node pack without ComfyUI: node definitions, the merge node's output against the key
names ComfyUI maps (derived here from the diffusers models by the kohya naming rule), caching by
file hash, readable errors, saving, the Hub node, packaging and the example workflows.

ComfyUI's ``folder_paths`` is replaced by the FAKE in tests/support_comfyui.py (the nodes call four
of its functions); everything else is the real toolkit. tests/test_comfyui_real.py runs the same
nodes inside a real ComfyUI.
"""

from __future__ import annotations

import inspect
import json
import os
import stat
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from support_comfyui import free_port, full_size_expert, load_pack_like_comfyui, write_two_small_experts
from support_lora import COMFY_CLIP_LAYERS, comfyui_accepted_keys, diffusers_to_ldm
from support_nodes import (
    SelmaApplyLora,
    SelmaExpertLoader,
    SelmaHubExpert,
    SelmaLoraLoader,
    SelmaMergeExperts,
    SelmaMergeLoraStack,
    SelmaSaveLora,
    apply,
    load,
    merge,
    pull,
    save,
    sha256,
    stack,
)

from comfyui_nodes.fit import check_lora_fits
from comfyui_nodes.install import REQUIREMENTS, ROOT_INIT, base_directory_note, install_node_pack
from comfyui_nodes.nodes import NODES
from comfyui_nodes.v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from selma_toolkit.errors import HubError, LoraFormatError, SelmaError
from selma_toolkit.lora import (
    LoraModule,
    LoraWeights,
    guess_architecture,
    inspect_lora,
    load_lora,
    lora_from_state_dict,
    lora_to_state_dict,
    save_lora,
)

# ------------------------------------------------------------------------------ definitions


def test_every_node_declares_inputs_outputs_and_a_function_that_takes_them(loras):
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS) == {spec.node_id for spec in NODES}
    for name, node in NODE_CLASS_MAPPINGS.items():
        spec = node.SPEC
        inputs = node.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional"} and inputs["required"], name
        # The classic class lists the spec's inputs, required ones first, each in the spec's order.
        assert [*inputs["required"], *inputs.get("optional", {})] == [
            *(i.name for i in spec.inputs if not i.optional),
            *(i.name for i in spec.inputs if i.optional),
        ]
        for section in inputs.values():
            for input_name, (kind, options) in section.items():
                assert isinstance(kind, (str, list)) and isinstance(options, dict), (name, input_name)
                if kind in ("FLOAT", "INT"):
                    assert options["min"] <= options["default"] <= options["max"], (name, input_name)
                if isinstance(kind, list) and "default" in options:
                    assert options["default"] in kind, (name, input_name)
        assert isinstance(node.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in node.RETURN_TYPES)
        assert len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
        assert node.CATEGORY == "SELMA" and node.DESCRIPTION and node.FUNCTION == "run"
        assert node.RETURN_TYPES or node.OUTPUT_NODE, f"{name} has no output and is no output node"
        # ComfyUI calls the function with every input as a keyword: required ones always, optional ones when given.
        parameters = inspect.signature(spec.run).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        for item in spec.inputs:
            assert item.name in parameters or takes_any, (name, item.name)
            if item.optional and item.name in parameters:
                assert parameters[item.name].default is not inspect.Parameter.empty, (name, item.name)
        named = {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        assert named <= {i.name for i in spec.inputs}, (name, named - {i.name for i in spec.inputs})
    assert SelmaMergeExperts.RETURN_TYPES[0] == SelmaApplyLora.INPUT_TYPES()["required"]["lora"][0] == "LORA_MODEL"
    assert SelmaApplyLora.RETURN_TYPES == ("MODEL", "CLIP", "LORA_MODEL") == SelmaLoraLoader.RETURN_TYPES[:3]
    assert (
        SelmaExpertLoader.RETURN_TYPES
        == SelmaHubExpert.RETURN_TYPES
        == (SelmaMergeExperts.INPUT_TYPES()["required"]["experts"][0],)
    )
    assert SelmaMergeExperts.INPUT_TYPES()["required"]["method"][0] == ["selma", "delta", "svd", "ties", "dare"]
    assert SelmaMergeExperts.INPUT_TYPES()["optional"]["svd_mode"][0] == ["exact", "randomized"]
    assert (
        SelmaMergeLoraStack.RETURN_TYPES[0]
        == SelmaLoraLoader.INPUT_TYPES()["optional"]["lora_stack"][0]
        == "LORA_STACK"
    )
    assert SelmaSaveLora.OUTPUT_NODE and SelmaSaveLora.RETURN_TYPES == ("STRING",)


def test_every_node_input_has_a_tooltip(loras):
    for name, node in NODE_CLASS_MAPPINGS.items():
        for section in node.INPUT_TYPES().values():
            for input_name, (_, options) in section.items():
                assert len(options.get("tooltip", "")) > 10, (name, input_name)


def test_expert_loader_lists_the_loras_folder(loras):
    (loras / "sub").mkdir()
    (loras / "sub" / "a.safetensors").write_bytes(b"x")
    (loras / "b.safetensors").write_bytes(b"x")
    assert SelmaExpertLoader.INPUT_TYPES()["required"]["lora_name"][0] == ["b.safetensors", "sub/a.safetensors"]


# -------------------------------------------------------------------------------- merge node


def test_merge_node_with_equal_weights_averages_each_factor_as_the_paper(loras, models):
    layers = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",)
    experts = [
        full_size_expert("sd1", seed=seed, rank=2, unet_layers=layers, text_layers=(), models=models["sd1"])
        for seed in range(3)
    ]
    for seed, expert in enumerate(experts):
        expert.modules[f"unet.{layers[0]}"].alpha = 1.0 + seed  # scales alpha / r = 0.5, 1, 1.5 are folded into B
        save_lora(expert, loras / f"e{seed}.safetensors")
    defaults = SelmaMergeExperts.INPUT_TYPES()["required"]
    assert defaults["normalize_weights"][1]["default"] is True and defaults["method"][1]["default"] == "selma"
    lora, summary = merge(stack(("e0.safetensors", 1.0), ("e1.safetensors", 1.0), ("e2.safetensors", 1.0)))
    key = "lora_unet_" + layers[0].replace(".", "_")
    downs = [e.modules[f"unet.{layers[0]}"].down for e in experts]
    ups = [e.modules[f"unet.{layers[0]}"].up * (e.modules[f"unet.{layers[0]}"].alpha / 2) for e in experts]
    scale = float(lora[f"{key}.alpha"]) / lora[f"{key}.lora_down.weight"].shape[0]
    torch.testing.assert_close(lora[f"{key}.lora_down.weight"], sum(downs) / 3, rtol=0, atol=1e-7)
    torch.testing.assert_close(lora[f"{key}.lora_up.weight"] * scale, sum(ups) / 3, rtol=0, atol=1e-7)
    assert set(lora) == {f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"}
    assert "selma merge of 3 experts" in summary and "1 modules, rank 2" in summary and "sd1" in summary


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_merge_node_output_keys_are_all_in_the_comfyui_key_map_of_full_size_unet_and_clips(loras, models, arch):
    unet, text = models[arch]
    for seed in range(2):
        expert = full_size_expert(
            arch, seed=seed, rank=1, unet_layers=None, text_layers=COMFY_CLIP_LAYERS, models=models[arch]
        )
        save_lora(expert, loras / f"{arch}-{seed}.safetensors")
    lora, _ = merge(stack((f"{arch}-0.safetensors", 1.0), (f"{arch}-1.safetensors", 1.0)))
    # ComfyUI's map, derived independently: "lora_unet_" + every diffusers UNet module path (and every
    # original LDM path) with "." -> "_", and lora_te / lora_te1 / lora_te2 + the CLIP layers it knows.
    accepted = comfyui_accepted_keys(SimpleNamespace(unet=unet, **text), arch)
    up_attention = {i: kind.startswith("CrossAttn") for i, kind in enumerate(unet.config.up_block_types)}
    for path, layer in unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            ldm = "lora_unet_" + diffusers_to_ldm(path, 2, up_attention).replace(".", "_")
            accepted |= {f"{ldm}.lora_down.weight", f"{ldm}.lora_up.weight", f"{ldm}.alpha"}
    assert set(lora) <= accepted, sorted(set(lora) - accepted)[:5]
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())
    text_layers = sum(path.endswith(COMFY_CLIP_LAYERS) for model in text.values() for path, _ in model.named_modules())
    assert len(lora) == 3 * (layers + text_layers)
    if arch == "sdxl":
        assert any(key.startswith("lora_te1_") for key in lora) and any(key.startswith("lora_te2_") for key in lora)


def test_loader_chain_keeps_order_weights_and_file_hashes(loras, models):
    for seed in range(3):
        save_lora(
            full_size_expert(
                "sd1", seed=seed, rank=2, unet_layers=("attn1.to_q",), text_layers=(), models=models["sd1"]
            ),
            loras / f"e{seed}.safetensors",
        )
    experts = stack(("e2.safetensors", 0.5), ("e0.safetensors", 2.0), ("e1.safetensors", -1.0))
    assert [(e.name, e.weight) for e in experts] == [
        ("e2.safetensors", 0.5),
        ("e0.safetensors", 2.0),
        ("e1.safetensors", -1.0),
    ]
    assert [e.sha256 for e in experts] == [sha256(loras / e.name) for e in experts]
    assert all(len(e.lora.modules) == 16 for e in experts)


def test_merge_node_keeps_the_experts_architecture_base_model_and_provenance(loras, models):
    # Experts of a small SD 1.x model: no layer width tells the architecture, only the files' metadata does.
    small = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)}
    for seed in range(2):
        modules = {
            name: LoraModule(torch.randn(2, shape[1]), torch.randn(shape[0], 2), 2.0) for name, shape in small.items()
        }
        meta = {
            "selma.architecture": "sd1",
            "selma.base_model": "tiny:sd1",
            "selma.skill": f"skill{seed}",
            "selma.recipe_sha256": f"{seed}" * 64,
        }
        save_lora(LoraWeights(modules, meta), loras / f"e{seed}.safetensors")
        assert inspect_lora(loras / f"e{seed}.safetensors").architecture == "sd1"  # what `selma lora info` says
    assert guess_architecture(LoraWeights(modules)) is None  # the tensors alone do not tell
    lora, summary = merge(stack(("e0.safetensors", 1.0), ("e1.safetensors", 1.0)))
    assert summary.endswith("for sd1 (base model tiny:sd1)"), summary
    assert lora.metadata["selma.architecture"] == "sd1" and lora.metadata["selma.base_model"] == "tiny:sd1"
    assert json.loads(lora.metadata["selma.skills"]) == ["skill0", "skill1"]
    record = json.loads(lora.metadata["selma.merge"])
    assert [(e["skill"], e["base_model"], e["architecture"], e["recipe_sha256"]) for e in record["experts"]] == [
        ("skill0", "tiny:sd1", "sd1", "0" * 64),
        ("skill1", "tiny:sd1", "sd1", "1" * 64),
    ]
    save(lora, "merged", "kohya")
    saved = inspect_lora(loras / "merged_00001_.safetensors")
    assert saved.architecture == "sd1" and saved.file_metadata["ss_base_model_version"] == "sd_v1"
    assert saved.file_metadata["selma.base_model"] == "tiny:sd1"


BLOCK_MODULES = {  # one small layer per block group: in, mid, out, text encoder
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k": (16, 16),
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (16, 12),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (12, 12),
}


def test_merge_node_block_weights_scale_each_groups_merged_update_and_are_recorded(loras):
    import numpy as np

    experts = []
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        modules = {
            name: LoraModule(
                torch.randn(2, shape[1], generator=generator, dtype=torch.float64),
                torch.randn(shape[0], 2, generator=generator, dtype=torch.float64),
                1.0 + seed,
            )
            for name, shape in BLOCK_MODULES.items()
        }
        experts.append(LoraWeights(modules))
        save_lora(experts[-1], loras / f"e{seed}.safetensors")
    lora, summary = merge(
        stack(("e0.safetensors", 1.0), ("e1.safetensors", 3.0)), "delta", block_weights="in=0.5, mid=0,out=2,te=0"
    )
    merged = lora_from_state_dict(lora, lora.metadata)
    g = dict(zip(BLOCK_MODULES, (0.5, 0.0, 2.0, 0.0)))  # by hand: in, mid, out, te
    for name in BLOCK_MODULES:
        expected = g[name] * sum(
            w * (e.modules[name].alpha / 2) * e.modules[name].up.numpy() @ e.modules[name].down.numpy()
            for w, e in zip((0.25, 0.75), experts)
        )  # normalized weights 1/4, 3/4
        module = merged.modules[name]
        np.testing.assert_allclose(
            module.alpha / module.rank * module.up.double().numpy() @ module.down.double().numpy(),
            expected,
            rtol=1e-9,
            atol=1e-12,
            err_msg=name,
        )
    assert json.loads(lora.metadata["selma.merge"])["block_weights"] == {"in": 0.5, "mid": 0.0, "out": 2.0, "te": 0.0}
    assert summary.endswith("; block weights in=0.5, mid=0, out=2, te=0"), summary
    assert "block_weights" in SelmaMergeExperts.INPUT_TYPES()["optional"]


def test_merge_node_unknown_block_group_is_a_node_error_listing_the_valid_groups(loras):
    save_lora(
        LoraWeights(
            {
                name: LoraModule(torch.ones(2, shape[1]), torch.ones(shape[0], 2), 2.0)
                for name, shape in BLOCK_MODULES.items()
            }
        ),
        loras / "e.safetensors",
    )
    with pytest.raises(
        LoraFormatError,
        match=r"block weight group 'down' is not a group; valid groups: te, te1, te2, "
        r"unet, in, in\.N, mid, out, out\.N",
    ):
        merge(stack(("e.safetensors", 1.0)), block_weights="down=0.5")


def test_is_changed_follows_the_file_bytes_even_when_size_and_mtime_stay(loras):
    path = loras / "expert.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, path)
    first = SelmaExpertLoader.IS_CHANGED(lora_name="expert.safetensors", weight=1.0)
    assert first == sha256(path) and SelmaExpertLoader.IS_CHANGED(lora_name="expert.safetensors", weight=0.5) == first
    stat = path.stat()
    save_file({"lora_unet_x.lora_down.weight": torch.ones(1, 4)}, loras / "other.safetensors")
    with open(path, "r+b") as handle:  # rewritten in place: same file, same size, mtime put back
        handle.write((loras / "other.safetensors").read_bytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now = path.stat()
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    second = SelmaExpertLoader.IS_CHANGED(lora_name="expert.safetensors", weight=1.0)
    assert second == sha256(path) != first
    assert SelmaExpertLoader.IS_CHANGED(lora_name="gone.safetensors", weight=1.0) == ""


# ------------------------------------------------------------------------------------ errors


def test_missing_lora_file_error_names_the_file_and_the_loras_folder(loras):
    with pytest.raises(LoraFormatError, match=r"'gone\.safetensors': no such file in the loras folder") as info:
        load("gone.safetensors")
    assert str(loras) in str(info.value) and "SELMA Hub Expert" in str(info.value)


class _Payload:
    """A pickle that, if ever unpickled, creates a file: proof that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_experts_are_refused_without_unpickling(loras, tmp_path, suffix):
    marker = tmp_path / "unpickled"
    torch.save({"lora_unet_x.lora_down.weight": _Payload(marker)}, loras / f"expert{suffix}")
    with pytest.raises(LoraFormatError, match="pickle") as info:
        load(f"expert{suffix}")
    assert "arbitrary code" in str(info.value) and ".safetensors" in str(info.value)
    assert not marker.exists()
    # A pickle renamed to .safetensors is refused too.
    (loras / "renamed.safetensors").write_bytes((loras / f"expert{suffix}").read_bytes())
    with pytest.raises(LoraFormatError, match="pickle"):
        load("renamed.safetensors")
    assert not marker.exists()


def test_non_lora_safetensors_error_says_it_is_not_a_lora(loras):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, loras / "checkpoint.safetensors")
    with pytest.raises(LoraFormatError, match=r"checkpoint\.safetensors: not a LoRA"):
        load("checkpoint.safetensors")


def test_experts_of_different_architectures_are_not_merged(loras, models):
    save_lora(
        full_size_expert("sd1", seed=0, unet_layers=("attn2.to_k",), text_layers=(), models=models["sd1"]),
        loras / "sd1.safetensors",
    )
    save_lora(
        full_size_expert("sdxl", seed=1, unet_layers=("attn2.to_k",), text_layers=(), models=models["sdxl"]),
        loras / "xl.safetensors",
    )
    with pytest.raises(
        LoraFormatError, match=r"sd1\.safetensors is a LoRA for sd1 but xl\.safetensors is one for sdxl"
    ):
        merge(stack(("sd1.safetensors", 1.0), ("xl.safetensors", 1.0)))


def test_empty_stack_error_says_to_connect_a_loader():
    with pytest.raises(LoraFormatError, match="expert stack is empty; connect a SELMA Expert Loader"):
        merge(())


def test_unequal_ranks_with_the_selma_method_suggest_delta_or_svd(loras, models):
    for seed, rank in enumerate((2, 4)):
        save_lora(
            full_size_expert(
                "sd1",
                seed=seed,
                rank=rank,
                unet_layers=("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",),
                text_layers=(),
                models=models["sd1"],
            ),
            loras / f"r{rank}.safetensors",
        )
    experts = stack(("r2.safetensors", 1.0), ("r4.safetensors", 1.0))
    with pytest.raises(LoraFormatError, match="needs equal ranks") as info:
        merge(experts, "selma")
    # In the node's words (the CLI words the same error "--method delta").
    assert "Set the method input to delta" in str(info.value) and "or set the method input to svd" in str(info.value)
    assert "--" not in str(info.value)
    with pytest.raises(LoraFormatError, match="Set the rank input to 0 or set the method input to svd") as info:
        merge(stack(("r2.safetensors", 1.0)), "selma", rank=4)
    assert "--" not in str(info.value)
    delta, summary = merge(experts, "delta")
    assert "rank 6" in summary and all(t.shape[0] == 6 for k, t in delta.items() if k.endswith("lora_down.weight"))
    _svd, summary = merge(experts, "svd", rank=3)
    assert "rank 3" in summary


def test_apply_refuses_a_lora_matching_no_key_or_made_for_another_architecture(models):
    sdxl_text_only = {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 1),
    }
    with pytest.raises(
        LoraFormatError, match=r"none of the LoRA's 2 tensors .* matches a layer of this SD15 model"
    ) as info:
        check_lora_fits(sdxl_text_only, "SD15", matched=0)
    assert "sdxl" in str(info.value)
    sdxl, _ = lora_to_state_dict(
        full_size_expert("sdxl", seed=0, unet_layers=("attn2.to_k",), text_layers=(), models=models["sdxl"])
    )
    with pytest.raises(LoraFormatError, match=r"the LoRA is for sdxl but the MODEL is SD15 \(sd1\)"):
        check_lora_fits(sdxl, "SD15", matched=len(sdxl) // 3)
    check_lora_fits(sdxl, "SDXL", matched=len(sdxl) // 3)
    check_lora_fits(sdxl, "HunyuanDiT", matched=1)  # unknown model, every key loaded: ComfyUI's key map decides
    with pytest.raises(LoraFormatError, match=r"the LoRA is for sdxl but the MODEL is Flux \(flux\)"):
        check_lora_fits(sdxl, "Flux", matched=1)


def test_apply_refuses_an_expert_of_another_width_naming_keys_and_shapes(sd15_comfy):
    from selma_toolkit.tiny import build_tiny_pipeline

    model, clip, calls = sd15_comfy
    tiny = build_tiny_pipeline("sd1")  # tiny:sd1: the SD 1.x architecture, 32-channel layers
    expert = full_size_expert("sd1", seed=0, rank=2, models=(tiny.unet, {"text_encoder": tiny.text_encoder}))
    lora, _ = lora_to_state_dict(expert)
    with pytest.raises(LoraFormatError, match="the LoRA does not fit this SD15 model") as info:
        apply(model, clip, lora)
    message = str(info.value)
    layers = [k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")]
    # tiny:sd1's first up block has attentions; SD 1.5's (UpBlock2D) has none: those keys load nowhere
    # (ComfyUI's log: 48 "lora key not loaded"); every other layer exists with 10x (UNet) / 24x (CLIP) the width.
    nowhere = [k for k in lora if k.startswith("lora_unet_up_blocks_0_")]
    patched = [k for k in layers if not k.startswith("lora_unet_up_blocks_0_")]
    assert len(nowhere) == 48 and len(patched) == 48
    assert (
        f"48 of the 48 layers it patches have another shape in the model and 48 of its {len(lora)} tensors load "
        "onto no layer of the model or its CLIP"
    ) in message
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q: adapts a layer of shape [32, 32], "
        "this model's is [320, 320]"
    ) in message
    assert f"{nowhere[0]}: no such layer in this model or its CLIP" in message
    assert f"... ({48 - 5 + 48 - 5} more)" in message and "nothing was patched" in message
    text_layer = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert text_layer in patched
    with pytest.raises(
        LoraFormatError, match=rf"{text_layer}: adapts a layer of shape \[32, 32\], this model's is \[768, 768\]"
    ):
        apply(model, clip, {k: v for k, v in lora.items() if k.startswith(text_layer)})
    assert calls == []  # refused before load_lora_for_models patched anything


def test_apply_patches_a_fitting_lora_and_refuses_one_with_a_key_that_loads_nowhere(sd15_comfy, models):
    model, clip, calls = sd15_comfy
    lora, _ = lora_to_state_dict(full_size_expert("sd1", seed=1, rank=2, models=models["sd1"]))
    assert apply(model, clip, lora, 0.8, 0.5) == ("patched MODEL", "patched CLIP", lora)
    assert [(c[2], c[3], c[4]) for c in calls] == [(lora, 0.8, 0.5)]
    extra = {
        **lora,
        "lora_unet_down_blocks_0_no_such_layer.lora_down.weight": torch.zeros(2, 320),
        "lora_unet_down_blocks_0_no_such_layer.lora_up.weight": torch.zeros(320, 2),
    }
    with pytest.raises(
        LoraFormatError, match=f"2 of its {len(extra)} tensors load onto no layer of the model or its CLIP"
    ) as info:
        apply(model, clip, extra)
    assert "lora_unet_down_blocks_0_no_such_layer.lora_down.weight: no such layer in this model or its CLIP" in str(
        info.value
    )
    assert "another shape" not in str(info.value) and len(calls) == 1


# ---------------------------------------------------------------------------- save and hub


def test_save_node_writes_the_merge_with_its_record_into_the_loras_folder(loras, models):
    for seed in range(2):
        save_lora(full_size_expert("sd1", seed=seed, rank=2, models=models["sd1"]), loras / f"e{seed}.safetensors")
    experts = stack(("e0.safetensors", 1.0), ("e1.safetensors", 3.0))
    lora, _ = merge(experts)
    first = save(lora, "selma/merged", "kohya")
    second = save(lora, "selma/merged", "peft")
    # The node shows the file it wrote and outputs its name under the loras folder (as LoraLoader lists it).
    assert first == {
        "ui": {"text": ["saved loras/selma/merged_00001_.safetensors"]},
        "result": ("selma/merged_00001_.safetensors",),
    }
    assert second["ui"]["text"] == ["saved loras/selma/merged_00002_.safetensors"]
    # The same merge again (a re-queue after a change elsewhere): not written twice, the node shows the file.
    assert save(lora, "selma/merged", "kohya") == {
        "ui": {"text": ["already saved as loras/selma/merged_00001_.safetensors"]},
        "result": ("selma/merged_00001_.safetensors",),
    }
    other, _ = merge(stack(("e0.safetensors", 1.0), ("e1.safetensors", 1.0)))
    assert save(other, "selma/merged", "kohya")["result"] == ("selma/merged_00003_.safetensors",)
    assert len(list((loras / "selma").iterdir())) == 3
    for name in ("merged_00001_", "merged_00002_"):
        saved = load_lora(loras / "selma" / f"{name}.safetensors")
        expected = [e.lora for e in experts]
        assert set(saved.modules) == set(expected[0].modules)
        for module_name, module in saved.modules.items():
            a = [e.modules[module_name] for e in expected]
            # weights 1 and 3 normalised to 1/4 and 3/4; every expert here has scale alpha / r = 1.
            torch.testing.assert_close(module.down, 0.25 * a[0].down + 0.75 * a[1].down, rtol=0, atol=1e-6)
            torch.testing.assert_close(module.up * module.scale, 0.25 * a[0].up + 0.75 * a[1].up, rtol=0, atol=1e-6)
        record = json.loads(saved.metadata["selma.merge"])
        assert record["method"] == "selma" and record["weights"] == [0.25, 0.75]
        assert [(x["name"], x["sha256"]) for x in record["experts"]] == [
            (n, sha256(loras / n)) for n in ("e0.safetensors", "e1.safetensors")
        ]
    assert "selma/merged_00001_.safetensors" in SelmaExpertLoader.INPUT_TYPES()["required"]["lora_name"][0]


def test_hub_expert_node_pulls_a_repo_file_into_the_loras_folder_and_stacks_it(loras, models, tmp_path):
    from support_hub import OlahHub, commit_files, init_repo

    expert = save_lora(
        full_size_expert("sd1", seed=4, rank=2, unet_layers=("attn1.to_q",), text_layers=(), models=models["sd1"]),
        tmp_path / "countbench.safetensors",
    )
    hub = OlahHub(tmp_path / "hub")
    commit_files(
        init_repo(hub.mirrors, "alice/countbench-sd15"), {"countbench.safetensors": expert.read_bytes()}, "expert"
    )
    catalog = tmp_path / "my-catalog.toml"
    catalog.write_text(
        '[my-count]\nrepo = "alice/countbench-sd15"\nfile = "countbench.safetensors"\nskill = "countbench"\n'
        f'base_model = "runwayml/stable-diffusion-v1-5"\narchitecture = "sd1"\nsha256 = "{sha256(expert)}"\n'
    )
    hub.start()
    try:
        experts = pull("alice/countbench-sd15", 0.5, "", hub.endpoint)
        (loras / "countbench.safetensors").unlink()
        experts = pull("my-count", 2.0, "", hub.endpoint, experts, catalog=str(catalog))
        with pytest.raises(
            SelmaError,
            match="the ref input: empty; expected a Hub repo id owner/name or a name from your catalog: my-count",
        ):
            pull("  ", 1.0, "", hub.endpoint, catalog=str(catalog))
    finally:
        hub.stop()
    assert (loras / "countbench.safetensors").read_bytes() == expert.read_bytes()
    assert [(e.name, e.weight, e.sha256) for e in experts] == [
        ("countbench.safetensors", 0.5, sha256(expert)),
        ("countbench.safetensors", 2.0, sha256(expert)),
    ]


def test_hub_expert_node_suggests_only_names_that_resolve(loras, monkeypatch):
    from selma_toolkit.hub import load_catalog

    monkeypatch.delenv("SELMA_CATALOG", raising=False)
    shipped = sorted(load_catalog())  # the shipped catalog's entries, the only names that may be suggested
    texts = [
        SelmaHubExpert.DESCRIPTION,
        *(spec[1]["tooltip"] for section in SelmaHubExpert.INPUT_TYPES().values() for spec in section.values()),
    ]
    assert "countbench" not in " ".join(texts) and "SELMA_CATALOG" in SelmaHubExpert.DESCRIPTION
    with pytest.raises(HubError, match="SELMA Hub Expert: the ref input: empty; expected a Hub repo id") as info:
        pull("", 1.0, "", "")
    assert f"a name from your catalog: {', '.join(shipped)}" in str(info.value) and "countbench" not in str(info.value)
    with pytest.raises(HubError, match="no catalog entry of that name") as info:
        pull("countbench", 1.0, "", "")
    assert f"catalog names: {', '.join(shipped)}" in str(info.value)
    assert "in the catalog input (besides the files in SELMA_CATALOG)" in str(info.value)
    assert "--" not in str(info.value)


def test_hub_expert_node_names_an_unreachable_endpoint(loras):
    import time

    dead = f"http://127.0.0.1:{free_port()}"  # a closed port: the connection is refused at once
    started = time.monotonic()
    with pytest.raises(HubError) as info:
        pull("alice/countbench-sd15", 1.0, "", dead)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert message.startswith(f"SELMA Hub Expert: alice/countbench-sd15@main: cannot reach the Hub at {dead} (")
    assert "Check the network or check the Hub endpoint in the endpoint input (empty: HF_ENDPOINT" in message
    assert not list(loras.iterdir())


# ------------------------------------------------------------------------------- packaging


def test_git_clone_pack_loads_and_merges_without_diffusers_peft_transformers_or_network(repo_root, tmp_path):
    write_two_small_experts(tmp_path)
    loaded = load_pack_like_comfyui(repo_root, tmp_path)
    assert loaded["nodes"] == sorted(NODE_CLASS_MAPPINGS)
    assert loaded["names"] == sorted(NODE_DISPLAY_NAME_MAPPINGS.values())
    assert Path(loaded["toolkit"]).resolve() == (repo_root / "selma_toolkit" / "__init__.py").resolve()
    assert "selma merge of 2 experts" in loaded["summary"] and (tmp_path / "merged_00001_.safetensors").is_file()
    # No comfy_api here: the classic classes only (ComfyUI registers NODE_CLASS_MAPPINGS and ignores the rest).
    assert loaded["exports"] == ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
    assert not loaded["entrypoint"] and (Path(loaded["web"]) / "selma.js").is_file()


def test_install_copies_a_self_contained_pack_and_updates_only_its_own_folder(cli, repo_root, tmp_path):
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    result = cli("comfyui", "install", str(comfyui))
    assert result.returncode == 0, result.stderr
    pack = comfyui / "custom_nodes" / "selma-toolkit"
    assert (pack / "__init__.py").read_text() == ROOT_INIT
    assert sorted(p.name for p in (pack / "example_workflows").iterdir()) == sorted(
        p.name for p in (repo_root / "example_workflows").glob("*.json")
    )
    assert (pack / "selma_toolkit" / "_shipped" / "hub" / "catalog.toml").is_file()
    assert not list(pack.rglob("__pycache__"))
    loras = tmp_path / "loras"
    loras.mkdir()
    write_two_small_experts(loras)
    loaded = load_pack_like_comfyui(pack, loras)
    assert Path(loaded["toolkit"]).resolve() == (pack / "selma_toolkit" / "__init__.py").resolve()

    (pack / "selma_toolkit" / "stale.py").write_text("")
    assert install_node_pack(comfyui) == pack and not (pack / "selma_toolkit" / "stale.py").exists()
    assert [p.name for p in (comfyui / "custom_nodes").iterdir()] == ["selma-toolkit"]  # no staging folder left

    clone = comfyui / "custom_nodes" / "selma-clone"
    clone.mkdir()
    (clone / "__init__.py").write_text("# a git clone")
    with pytest.raises(SelmaError, match="was not written by `selma comfyui install`"):
        install_node_pack(comfyui, "selma-clone")
    assert (clone / "__init__.py").read_text() == "# a git clone"
    refused = cli("comfyui", "install", str(tmp_path / "nowhere"))
    assert refused.returncode == 2 and "no custom_nodes folder" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_install_gives_the_pack_the_modes_of_the_users_umask(tmp_path, mask):
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    previous = os.umask(mask)
    try:
        for _ in range(2):  # a new install, then an update
            pack = install_node_pack(comfyui)
            folders = [pack, *(p for p in pack.rglob("*") if p.is_dir())]
            files = [p for p in pack.rglob("*") if p.is_file()]
            # 0755 / 0644 under umask 022: another user's ComfyUI can read the pack (mkdtemp alone gives 0700).
            assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o777 & ~mask}
            assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~mask}
            assert len(files) > 20
    finally:
        os.umask(previous)


def test_install_says_when_comfyui_loads_custom_nodes_from_another_base_directory(cli, tmp_path):
    checkout = tmp_path / "ComfyUI"  # a ComfyUI program folder: main.py beside the comfy package
    (checkout / "comfy").mkdir(parents=True)
    (checkout / "main.py").write_text("# ComfyUI")
    with pytest.raises(
        SelmaError,
        match=r"a ComfyUI checkout without a custom_nodes folder\. If you start ComfyUI "
        r"with --base-directory DIR, it loads custom nodes from DIR/custom_nodes: run "
        r"`selma comfyui install DIR`",
    ):
        install_node_pack(checkout)
    (checkout / "custom_nodes").mkdir()
    result = cli("comfyui", "install", str(checkout))  # ComfyUI never started with it as its base: no user/
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert (
        "has not used as its base folder yet" in said and "ignores this copy: run `selma comfyui install DIR`" in said
    )
    (checkout / "user").mkdir()  # ComfyUI creates <base>/user when it starts
    assert base_directory_note(checkout) is None
    base = tmp_path / "comfy-base"  # a --base-directory folder without custom_nodes/ yet
    (base / "models").mkdir(parents=True)
    with pytest.raises(SelmaError, match="If this is the folder you give ComfyUI's --base-directory, create"):
        install_node_pack(base)


def test_repository_root_is_the_pack_that_install_writes_and_lists_no_torch(repo_root):
    assert (repo_root / "__init__.py").read_text() == ROOT_INIT
    lines = [line.strip() for line in (repo_root / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements == REQUIREMENTS
    assert not any(line.lower().startswith("torch") for line in requirements)


def test_pyproject_carries_the_comfy_registry_fields(repo_root):
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    # The registry reads a dynamic version from the file [tool.comfy.version].path names.
    assert "version" in pyproject["project"]["dynamic"]
    version_file = (repo_root / comfy["version"]["path"]).read_text()
    from selma_toolkit import __version__

    assert f'\n__version__ = "{__version__}"\n' in "\n" + version_file


# ------------------------------------------------------------------------------- workflows


CORE_NODES = {  # the core ComfyUI nodes the examples use: their inputs, and their outputs' types
    "CheckpointLoaderSimple": ({"ckpt_name"}, ("MODEL", "CLIP", "VAE")),
    "UNETLoader": ({"unet_name", "weight_dtype"}, ("MODEL",)),
    "DualCLIPLoader": ({"clip_name1", "clip_name2", "type", "device"}, ("CLIP",)),
    "VAELoader": ({"vae_name"}, ("VAE",)),
    "CLIPTextEncode": ({"text", "clip"}, ("CONDITIONING",)),
    "FluxGuidance": ({"conditioning", "guidance"}, ("CONDITIONING",)),
    "EmptyLatentImage": ({"width", "height", "batch_size"}, ("LATENT",)),
    "EmptySD3LatentImage": ({"width", "height", "batch_size"}, ("LATENT",)),
    "KSampler": (
        {
            "model",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "positive",
            "negative",
            "latent_image",
            "denoise",
        },
        ("LATENT",),
    ),
    "VAEDecode": ({"samples", "vae"}, ("IMAGE",)),
    "SaveImage": ({"images", "filename_prefix"}, ()),
    "PreviewAny": ({"source"}, ()),
}


def node_io(class_type: str) -> tuple[dict, tuple]:
    """(input name -> type, output types) of a node of the example workflows."""
    if class_type in NODE_CLASS_MAPPINGS:
        node = NODE_CLASS_MAPPINGS[class_type]
        specs = {**node.INPUT_TYPES()["required"], **node.INPUT_TYPES().get("optional", {})}
        return {name: spec[0] for name, spec in specs.items()}, node.RETURN_TYPES
    names, outputs = CORE_NODES[class_type]
    return dict.fromkeys(names), outputs


def test_templates_are_at_the_pack_root_one_per_use_and_their_api_copies_elsewhere(repo_root):
    from support_templates import API_FOLDER, GRAPHS, UI_FOLDER

    # ComfyUI lists every .json of these folders at a pack's root as a template: only the UI graphs are there.
    listed = [
        p
        for name in ("example_workflows", "example", "examples", "workflow", "workflows")
        for p in (repo_root / name).glob("*.json")
    ]
    assert sorted(p.name for p in listed) == sorted(f"{name}.json" for name in GRAPHS)
    assert repo_root / "example_workflows" == UI_FOLDER and API_FOLDER.parent == repo_root / "comfyui_nodes"
    for name, graph in GRAPHS.items():  # the API copies are the definitions, as support_templates.py wrote them
        assert json.loads((API_FOLDER / f"{name}.api.json").read_text()) == graph(), name
    kinds = {name: [n["class_type"] for n in graph().values()] for name, graph in GRAPHS.items()}
    assert (
        kinds["selma-merge-experts"].count("SelmaExpertLoader") == 3
        and "SelmaApplyLora" in kinds["selma-merge-experts"]
    )
    assert all("SelmaLoraLoader" in kinds[name] for name in ("selma-model-by-name", "selma-sdxl", "selma-flux"))
    assert "UNETLoader" in kinds["selma-flux"] and "sd_xl_base_1.0.safetensors" in json.dumps(GRAPHS["selma-sdxl"]())


@pytest.mark.parametrize("name", ["selma-merge-experts", "selma-model-by-name", "selma-sdxl", "selma-flux"])
def test_example_workflows_use_real_inputs_and_agree_with_each_other(loras, name):
    from support_templates import API_FOLDER, TITLE, UI_FOLDER

    api = json.loads((API_FOLDER / f"{name}.api.json").read_text())
    ui = json.loads((UI_FOLDER / f"{name}.json").read_text())
    api_links = set()
    for node_id, node in api.items():
        inputs, _ = node_io(node["class_type"])
        assert set(node["inputs"]) <= set(inputs), (node_id, set(node["inputs"]) - set(inputs))
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            assert set(NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]) <= set(node["inputs"]), (
                node_id
            )
        for input_name, value in node["inputs"].items():
            if isinstance(value, list):
                source, slot = value
                produced = node_io(api[source]["class_type"])[1][slot]
                assert inputs[input_name] in (None, produced), (node_id, input_name, produced)
                api_links.add((int(source), slot, int(node_id), input_name))
    # The UI format: same nodes and links, and our nodes' widget values in INPUT_TYPES order.
    by_id = {node["id"]: node for node in ui["nodes"]}
    assert {str(i): n["type"] for i, n in by_id.items()} == {i: n["class_type"] for i, n in api.items()}
    ui_links = set()
    for link_id, source, slot, target, target_slot, kind in ui["links"]:
        entry = by_id[target]["inputs"][target_slot]
        assert entry["link"] == link_id and link_id in by_id[source]["outputs"][slot]["links"] and entry["type"] == kind
        ui_links.add((source, slot, target, entry["name"]))
    assert ui_links == api_links
    for node_id, node in api.items():
        if node["class_type"] in NODE_CLASS_MAPPINGS:
            order = [
                n
                for n in node_io(node["class_type"])[0]
                if not isinstance(node["inputs"].get(n), list) and n in node["inputs"]
            ]
            assert by_id[int(node_id)]["widgets_values"] == [node["inputs"][n] for n in order], node_id
    # Laid out without overlaps, as saved (the browser test checks the boxes the frontend draws).
    boxes = {
        i: (n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        for i, n in by_id.items()
    }
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
    assert overlapping == []

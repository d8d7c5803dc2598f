"""LoRA layouts as announced, for every family, and the real-size fit.

* Each family and each layout it offers (``Family.layouts``): ``save_lora`` writes that layout's
  keys, ``inspect_lora`` (``selma lora info``) names the same layout and reads back every update
  exactly, and a layout the family does not offer is refused naming the ones it has.
* ``selma lora convert`` and ``selma merge`` print the layout they write, and ``selma lora info``
  names it (Flux / SD 3 used to print "kohya layout" and write peft-layout files).
* Real size without weights: each family's denoiser built from its published config on the meta
  device (``selma_toolkit.published``); an expert on every module its default targets adapt, written
  in its default layout and read back, fits it module by module (the same for the UNet families);
  the shipped layer table the architecture guess reads is the one these configs give.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES, get_family
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.expert_fit import check_expert_fits
from selma_toolkit.lora import LoraModule, LoraWeights, guess_architecture, inspect_lora, save_lora
from selma_toolkit.published import build_dit_layer_table, dit_layer_table, published_layer_shapes

# One module per family with the names (and, for the tiny widths, arbitrary shapes) it has; the
# file's metadata names the family.
MODULES = {
    "sd1": [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    ],
    "sd2": ["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"],
    "sdxl": [
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj",
    ],
    "sd3": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.1.attn.add_k_proj"],
    "flux": ["transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.attn.to_k"],
    "chroma": ["transformer.transformer_blocks.0.attn.to_add_out", "transformer.single_transformer_blocks.1.attn.to_v"],
    "qwen-image": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.1.attn.add_v_proj"],
    "z-image": ["transformer.layers.0.attention.to_q", "transformer.noise_refiner.1.attention.to_out.0"],
    "flux2-klein": [
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.transformer_blocks.0.attn.to_k",
        "transformer.transformer_blocks.0.attn.to_v",
        "transformer.transformer_blocks.0.attn.add_q_proj",
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "transformer.single_transformer_blocks.1.attn.to_out",
    ],
}
# The key of the first module of MODULES in each layout.
FIRST_KEY = {
    ("sd1", "kohya"): "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    ("sd1", "peft"): "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
    ("sd2", "kohya"): "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
    ("sd2", "peft"): "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight",
    ("sdxl", "kohya"): "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_v.lora_down.weight",
    ("sdxl", "peft"): "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v.lora_A.weight",
    ("sd3", "peft"): "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    ("flux", "peft"): "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    ("chroma", "peft"): "transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight",
    ("qwen-image", "ai-toolkit"): "diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight",
    ("qwen-image", "peft"): "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    ("z-image", "ai-toolkit"): "diffusion_model.layers.0.attention.to_q.lora_A.weight",
    ("z-image", "peft"): "transformer.layers.0.attention.to_q.lora_A.weight",
    ("flux2-klein", "ai-toolkit"): "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
    ("flux2-klein", "peft"): "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
}
PAIRS = [(name, layout) for name in FAMILY_NAMES for layout in FAMILIES[name].layouts]


def small_lora(arch: str, *, rank: int = 2, alpha: float = 3.0, seed: int = 0) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(torch.randn(rank, 8, generator=generator), torch.randn(12, rank, generator=generator), alpha)
        for name in MODULES[arch]
    }  # one shape: FLUX.2's q, k and v are fused into one layer
    return LoraWeights(modules, {"selma.architecture": arch})


def test_every_pair_of_family_and_layout_is_listed():
    assert set(PAIRS) == set(FIRST_KEY)
    assert all(FAMILIES[name].default_layout == FAMILIES[name].layouts[0] for name in FAMILY_NAMES)


@pytest.mark.parametrize(("arch", "layout"), PAIRS)
def test_each_family_writes_the_layout_it_names_and_info_names_it_back(arch, layout, tmp_path):
    lora = small_lora(arch)
    path = save_lora(lora, tmp_path / "lora.safetensors", format=layout)
    keys = load_file(path)
    assert FIRST_KEY[(arch, layout)] in keys
    info = inspect_lora(path)
    assert info.layouts == [layout]
    assert guess_architecture(info.weights) == arch
    assert sorted(info.weights.modules) == sorted(lora.modules)
    for name, module in lora.modules.items():
        assert torch.allclose(info.weights.modules[name].delta(), module.delta(), atol=1e-6), name
    if FAMILIES[arch].denoiser == "transformer":  # ComfyUI ignores metadata alphas: the scale is in B
        assert not any(key.endswith(".alpha") for key in keys)
        assert {m.alpha for m in info.weights.modules.values()} == {2.0}
    default = save_lora(lora, tmp_path / "default.safetensors")
    assert inspect_lora(default).layouts == [FAMILIES[arch].default_layout]


@pytest.mark.parametrize("arch", [name for name in FAMILY_NAMES if len(FAMILIES[name].layouts) < 3])
def test_a_layout_the_family_does_not_offer_is_refused_naming_its_layouts(arch, tmp_path):
    family = get_family(arch)
    refused = next(layout for layout in ("kohya", "peft", "ai-toolkit") if layout not in family.layouts)
    with pytest.raises(
        LoraFormatError, match=re.escape(f"{family.title} LoRAs are written as {' or '.join(family.layouts)}")
    ):
        save_lora(small_lora(arch), tmp_path / "x.safetensors", format=refused)
    assert not (tmp_path / "x.safetensors").exists()


# Flux: the family whose files were announced as kohya and written as peft; FLUX.2: its fused ai-toolkit layout.
@pytest.mark.parametrize(("arch", "layout"), [("flux", "peft"), ("flux2-klein", "ai-toolkit")])
def test_cli_convert_and_merge_print_the_layout_they_write_and_info_names_it(arch, layout, cli, tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(small_lora(arch, seed=1), first, format="peft")
    save_lora(small_lora(arch, seed=2), second, format="peft")
    converted = cli("lora", "convert", str(first), str(tmp_path / "converted.safetensors"))
    assert converted.returncode == 0, converted.stderr
    assert f"in the {layout} layout" in converted.stdout
    merged = cli("merge", str(first), str(second), "--out", str(tmp_path / "merged.safetensors"), "--method", "delta")
    assert merged.returncode == 0, merged.stderr
    assert re.search(rf"\b{re.escape(layout)}\b", merged.stdout)
    for written in ("converted", "merged"):
        info = cli("lora", "info", str(tmp_path / f"{written}.safetensors"))
        assert info.returncode == 0, info.stderr
        assert re.search(rf"layout\s*│\s*{re.escape(layout)}\s*│", info.stdout), info.stdout
    if arch == "flux":
        refused = cli("lora", "convert", str(first), str(tmp_path / "kohya.safetensors"), "--format", "kohya")
        assert (
            refused.returncode == 2 and "--format kohya: " in refused.stderr and "Use --format peft" in refused.stderr
        )


# ------------------------------------------------------------------------------------- real size


def _targeted(arch: str) -> dict[str, tuple[int, ...]]:
    """{module: weight shape} of every layer the family's default targets adapt in its real-size
    denoiser, matched as peft matches target names (a name or a dotted tail of the path)."""
    family = get_family(arch)
    shapes = published_layer_shapes(family)
    found = {}
    for name, shape in shapes.items():
        path = name.split(".", 1)[1]
        if len(shape) == 2 and any(path == t or path.endswith("." + t) for t in family.lora_targets):
            found[name] = shape
    return found


@pytest.mark.parametrize("arch", FAMILY_NAMES)
def test_a_real_size_expert_on_every_targeted_module_fits_the_published_model(arch, tmp_path):
    family = get_family(arch)
    targeted = _targeted(arch)
    assert len(targeted) >= 16, arch
    generator = torch.Generator().manual_seed(0)
    modules = {
        name: LoraModule(
            torch.randn(1, shape[1], generator=generator) * 0.01,
            torch.randn(shape[0], 1, generator=generator) * 0.01,
            1.0,
        )
        for name, shape in targeted.items()
    }
    path = save_lora(LoraWeights(modules, {"selma.architecture": arch}), tmp_path / "real.safetensors")
    info = inspect_lora(path)
    assert info.layouts == [family.default_layout]
    assert sorted(info.weights.modules) == sorted(modules)
    layers = published_layer_shapes(family)
    check_expert_fits(info.weights, layers, source="real-size expert", base_model=family.published_model)
    if family.denoiser == "transformer":
        # The shapes alone name the family unless another family has the same modules (Flux and Chroma
        # share their attention; SD 3's last block is a subset of others'): then the metadata does.
        bare = LoraWeights(info.weights.modules)
        assert guess_architecture(bare) in (arch, None)
        other = "sd3" if arch != "sd3" else "flux"
        with pytest.raises(LoraFormatError, match="does not fit base_model"):
            check_expert_fits(info.weights, published_layer_shapes(get_family(other)), source="x", base_model=other)


def test_the_shipped_layer_table_is_the_one_the_published_configs_give():
    assert build_dit_layer_table() == dit_layer_table()

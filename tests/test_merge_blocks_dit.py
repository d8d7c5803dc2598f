"""Block weights for the DiT families and LoRA Block Weight vectors (lora/blocks.py), checked
against dense computations: each merged module's update B @ A equals g times the update of the
same merge without block weights, g read off the family's block names by hand here; the Inspire
pack's vectors map to the blocks its code orders (original-name UNet blocks, Flux-type double /
single blocks), in ``merge_experts``, ``selma merge --block-weights``, ``load_experts`` (merged
and runtime adapters) and the ComfyUI merge node."""

from __future__ import annotations

import pytest
import torch

from selma_toolkit.architectures import get_family
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import LoraModule, LoraWeights, load_lora, merge_experts, save_lora
from selma_toolkit.lora.blocks import block_weight_of, module_groups, parse_block_weights
from selma_toolkit.lora.keys import ldm_to_diffusers_unet_path
from selma_toolkit.published import published_layer_shapes

FLUX_NAMES = [
    "transformer.transformer_blocks.0.attn.to_q",
    "transformer.transformer_blocks.1.attn.add_k_proj",
    "transformer.single_transformer_blocks.0.attn.to_v",
    "transformer.single_transformer_blocks.2.proj_out",
    "transformer.x_embedder",
]
NAMES = {
    "flux": FLUX_NAMES,
    "flux2-klein": [
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "transformer.single_transformer_blocks.1.attn.to_out",
        "transformer.context_embedder",
    ],
    "sd3": [
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.transformer_blocks.1.attn.add_q_proj",
        "transformer.context_embedder",
    ],
    "qwen-image": [
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.transformer_blocks.1.attn.to_add_out",
        "transformer.img_in",
    ],
    "z-image": [
        "transformer.layers.0.attention.to_q",
        "transformer.layers.1.attention.to_k",
        "transformer.noise_refiner.0.attention.to_v",
        "transformer.context_refiner.0.attention.to_out.0",
        "transformer.cap_embedder.1",
    ],
}
# Per family: block weights as users write them, and g of each module of NAMES by hand.
CASES = {
    "flux": ("double.0=0.5,single=0,transformer=2", [0.5, 2.0, 0.0, 0.0, 2.0]),
    "flux2-klein": ("double=3,single.1=-1", [3.0, 1.0, -1.0, 1.0]),
    "sd3": ("transformer_blocks.1=0.25,transformer_blocks=4", [4.0, 0.25, 1.0]),
    "qwen-image": ("transformer_blocks.0=0,unet=0.5", [0.0, 0.5, 0.5]),
    "z-image": ("layers=0.5,noise_refiner.0=0,context_refiner=3", [0.5, 0.5, 0.0, 3.0, 1.0]),
}


def expert(names: list[str], seed: int, arch: str, rank: int = 2) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        name: LoraModule(
            torch.randn(rank, 6, generator=generator, dtype=torch.float64),
            torch.randn(5, rank, generator=generator, dtype=torch.float64),
            3.0,
        )
        for name in names
    }
    return LoraWeights(modules, {"selma.architecture": arch})


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("method", ["selma", "delta", "svd", "ties", "dare"])
def test_dit_block_weights_scale_each_merged_modules_update_by_its_familys_group(arch, method):
    names = NAMES[arch]
    text, expected = CASES[arch]
    loras = [expert(names, seed, arch) for seed in (1, 2, 3)]
    options = {"rank": 4} if method in ("svd", "ties", "dare") else {}
    plain = merge_experts(loras, method, density=0.6, seed=1, **options)
    weighted = merge_experts(loras, method, density=0.6, seed=1, block_weights=parse_block_weights(text), **options)
    for name, g in zip(names, expected, strict=True):
        torch.testing.assert_close(
            weighted.modules[name].delta(torch.float64),
            g * plain.modules[name].delta(torch.float64),
            rtol=1e-9,
            atol=1e-12,
            msg=f"{arch} {name}",
        )


def test_block_groups_are_named_as_each_family_names_its_blocks():
    double = "transformer.transformer_blocks.3.attn.to_q"
    assert module_groups(double, get_family("flux")) == ("double.3", "double", "transformer", "unet")
    assert module_groups(double, get_family("chroma")) == ("double.3", "double", "transformer", "unet")
    assert module_groups(double, get_family("qwen-image")) == (
        "transformer_blocks.3",
        "transformer_blocks",
        "transformer",
        "unet",
    )
    fused = "transformer.single_transformer_blocks.7.attn.to_qkv_mlp_proj"
    assert module_groups(fused, get_family("flux2-klein")) == ("single.7", "single", "transformer", "unet")
    assert module_groups("transformer.context_refiner.1.attention.to_q", get_family("z-image"))[:2] == (
        "context_refiner.1",
        "context_refiner",
    )
    # An unknown family: every family's name for the block.
    assert set(module_groups(double)[:2]) == {"double.3", "transformer_blocks.3"}
    with pytest.raises(
        LoraFormatError, match=r"block weight group 'doubles' is not a group; valid groups: .*double\.N"
    ):
        parse_block_weights("doubles=1")


# ------------------------------------------------------------------------------- block weight vectors


def _attention_modules(arch: str) -> list[str]:
    targets = get_family(arch).lora_targets
    return [
        name
        for name, shape in published_layer_shapes(get_family(arch)).items()
        if len(shape) == 2 and any(name.endswith("." + t) for t in targets)
    ]


# The Inspire pack's SD 1.5 and SDXL vectors: the original (LDM) blocks an attention LoRA has, in order.
LDM_BLOCKS = {
    "sd1": [
        "input_blocks.1",
        "input_blocks.2",
        "input_blocks.4",
        "input_blocks.5",
        "input_blocks.7",
        "input_blocks.8",
        "middle_block.1",
        *(f"output_blocks.{i}" for i in range(3, 12)),
    ],
    "sdxl": [
        "input_blocks.4",
        "input_blocks.5",
        "input_blocks.7",
        "input_blocks.8",
        "middle_block.1",
        *(f"output_blocks.{i}" for i in range(0, 6)),
    ],
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_lora_block_weight_vector_weighs_the_unet_blocks_in_the_inspire_packs_order(arch):
    names = _attention_modules(arch)
    blocks = LDM_BLOCKS[arch]
    vector = [0.5] + [float(i + 1) for i in range(len(blocks))]  # BASE, then one per block (17 / 12 numbers)
    weights = block_weight_of(names, parse_block_weights(",".join(map(str, vector))), get_family(arch))
    for position, block in enumerate(blocks, start=1):
        # Independently: the block's attention modules, named in the original UNet and converted back.
        kind, index = block.split(".")
        ldm = f"{kind}.{index}.1" if kind != "middle_block" else "middle_block.1"
        prefix = (
            "unet."
            + ldm_to_diffusers_unet_path(f"{ldm}.transformer_blocks.0.attn1.to_q").rsplit(".transformer_blocks", 1)[0]
        )
        members = [name for name in names if name.startswith(prefix + ".")]
        assert members and all(weights[name] == vector[position] for name in members), block
    assert set(weights.values()) == set(vector[1:])  # every module is in a block: BASE weighs none


def test_a_flux_vector_weighs_double_then_single_blocks_and_the_last_number_carries_on():
    names = [*_attention_modules("flux"), "transformer.x_embedder", "transformer.norm_out.linear"]
    vector = [0.25] + [float(i) for i in range(19 + 38)]
    weights = block_weight_of(names, parse_block_weights("FLUX:" + ",".join(map(str, vector))), get_family("flux"))
    for name in names:
        if name.startswith("transformer.transformer_blocks."):
            assert weights[name] == vector[1 + int(name.split(".")[2])], name
        elif name.startswith("transformer.single_transformer_blocks."):
            assert weights[name] == vector[1 + 19 + int(name.split(".")[2])], name
        else:
            assert weights[name] == 0.25, name  # BASE
    short = block_weight_of(names, parse_block_weights("1,2,3"), get_family("flux"))
    assert short["transformer.transformer_blocks.0.attn.to_q"] == 2.0
    assert short["transformer.transformer_blocks.1.attn.to_q"] == 3.0
    assert short["transformer.single_transformer_blocks.37.attn.to_q"] == 3.0


@pytest.mark.parametrize("arch", ["sd3", "qwen-image", "z-image"])
def test_a_vector_for_a_family_without_the_packs_convention_is_refused_naming_its_groups(arch):
    loras = [expert(NAMES[arch], seed, arch) for seed in (1, 2)]
    with pytest.raises(LoraFormatError, match=r"no convention for .*; give GROUP=WEIGHT pairs of"):
        merge_experts(loras, "delta", block_weights=parse_block_weights("1,0,0.5"))


# ------------------------------------------------------------------------------- front ends


def test_selma_merge_block_weights_of_a_flux_merge(cli, tmp_path):
    files = []
    for seed in (1, 2):
        lora = expert(FLUX_NAMES, seed, "flux")
        files.append(
            save_lora(
                LoraWeights(
                    {n: LoraModule(m.down.float(), m.up.float(), m.alpha) for n, m in lora.modules.items()},
                    lora.metadata,
                ),
                tmp_path / f"e{seed}.safetensors",
            )
        )
    plain, weighted = tmp_path / "plain.safetensors", tmp_path / "weighted.safetensors"
    assert cli("merge", *map(str, files), "--out", str(plain), "--method", "delta").returncode == 0
    result = cli(
        "merge", *map(str, files), "--out", str(weighted), "--method", "delta", "--block-weights", "single=0,double.1=2"
    )
    assert result.returncode == 0, result.stderr
    a, b = load_lora(plain), load_lora(weighted)
    for name, g in zip(FLUX_NAMES, [1.0, 2.0, 0.0, 0.0, 1.0], strict=True):
        assert torch.allclose(b.modules[name].delta(), g * a.modules[name].delta(), atol=1e-6), name


@pytest.mark.parametrize("method", ["delta", "runtime"])
def test_load_experts_takes_a_flux_vector_on_a_diffusers_pipeline(method, tiny_model_dirs):
    from diffusers import DiffusionPipeline

    from selma_toolkit.adapters.diffusers import load_experts

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs["flux"])
    shapes = {
        f"transformer.{path}": layer.weight.shape
        for path, layer in pipe.transformer.named_modules()
        if isinstance(layer, torch.nn.Linear) and path.endswith((".attn.to_q", ".attn.to_k"))
    }
    generator = torch.Generator().manual_seed(0)
    loras = [
        LoraWeights(
            {
                name: LoraModule(
                    torch.randn(2, shape[1], generator=generator), torch.randn(shape[0], 2, generator=generator), 2.0
                )
                for name, shape in shapes.items()
            },
            {"selma.architecture": "flux"},
        )
        for _ in range(2)
    ]
    names = load_experts(pipe, loras, method=method, block_weights="0.5,3,0")  # BASE, double 0, single 0
    g = {"transformer_blocks": 3.0, "single_transformer_blocks": 0.0}
    for name in shapes:
        layer = pipe.transformer.get_submodule(name.removeprefix("transformer."))
        # set_adapters folds each runtime adapter's weight into its scaling.
        loaded = sum(layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight for a in names)
        want = g[name.split(".")[1]] * (loras[0].modules[name].delta() + loras[1].modules[name].delta()) / 2
        assert torch.allclose(loaded, want, atol=1e-5), name


def test_the_comfyui_merge_node_takes_the_dit_spellings():
    from comfyui_nodes.nodes import Expert, SelmaMergeExperts

    loras = [expert(FLUX_NAMES, seed, "flux") for seed in (1, 2)]
    stack = tuple(Expert(f"e{i}", 0.5, "0" * 64, lora) for i, lora in enumerate(loras))
    plain = SelmaMergeExperts().merge(stack, "delta", 0, False)["result"][0]
    weighted = SelmaMergeExperts().merge(stack, "delta", 0, False, block_weights="1,0.5,2,0")["result"][0]
    from selma_toolkit.lora import lora_from_state_dict

    a, b = lora_from_state_dict(plain), lora_from_state_dict(weighted)
    # double 0, double 1, single 0, single 2 (the vector's last: 0), BASE
    for name, g in zip(FLUX_NAMES, [0.5, 2.0, 0.0, 0.0, 1.0], strict=True):
        assert torch.allclose(
            b.modules[name].delta(torch.float64), g * a.modules[name].delta(torch.float64), atol=1e-9
        ), name

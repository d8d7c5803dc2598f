"""LoRA file formats (selma_toolkit.lora: load_lora / save_lora / lora_from_state_dict and
`selma lora info|convert`): every layout read exactly, the default (kohya) file loaded by diffusers
unchanged and named as ComfyUI's key map expects, alpha kept, bad files refused with clear errors.

The source of truth for the peft layout is diffusers' own save_lora_weights of real peft layers on
the tiny SD1 / SD2 / SDXL pipelines; "exact" means torch.equal on scale * B @ A per module.
"""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support_lora import (
    TEXT_ALL,
    UNET_ALL,
    UNET_ATTENTION,
    add_peft_lora,
    comfyui_accepted_keys,
    diffusers_to_ldm,
    diffusers_warnings,
    lora_like,
    meta_text_encoder,
    meta_unet,
    peft_updates,
    random_lora,
    save_peft_lora_with_diffusers,
)

from selma_toolkit.architectures import get_family
from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import (
    LoraModule,
    LoraWeights,
    guess_architecture,
    inspect_lora,
    load_lora,
    lora_from_state_dict,
    lora_metadata,
    metadata_value,
    save_lora,
)
from selma_toolkit.lora.keys import decode_kohya_path, kohya_module_name, ldm_to_diffusers_unet_path, module_from_key

ARCHS = ("sd1", "sd2", "sdxl")
TEXT_ENCODERS = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
}


def load_pipe(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def updates(weights: LoraWeights) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in weights.modules.items()}


def assert_same_updates(got: dict, want: dict, *, exact=True):
    assert set(got) == set(want), (
        f"missing {sorted(set(want) - set(got))[:3]}, extra {sorted(set(got) - set(want))[:3]}"
    )
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def peft_files(tiny_model_dirs, tmp_path_factory):
    """Per architecture: a diffusers-saved peft LoRA on every layer kind (attention, projections,
    feed-forward, LoCon convs, embeddings, both text encoders), alpha != rank, and the live updates."""
    out = {}
    for arch in ARCHS:
        pipe = load_pipe(tiny_model_dirs[arch])
        configs = add_peft_lora(
            pipe, rank=4, alpha=3, unet_targets=UNET_ALL, text_targets=TEXT_ALL, text_rank=2, text_alpha=5, seed=1
        )
        folder = tmp_path_factory.mktemp(f"peft-{arch}")
        out[arch] = (save_peft_lora_with_diffusers(pipe, configs, folder), peft_updates(pipe))
    return out


@pytest.fixture(scope="module")
def tiny_pipes(tiny_model_dirs):
    """The tiny pipelines without adapters, shared by tests that only read module names and shapes."""
    return {arch: load_pipe(tiny_model_dirs[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def meta_models():
    """Full-size SD1 / SD2 / SDXL UNets and their CLIP text encoders on the meta device."""
    return {
        arch: (meta_unet(arch), {c: meta_text_encoder(n) for c, n in TEXT_ENCODERS[arch].items()}) for arch in ARCHS
    }


# ------------------------------------------------------------------------------- names


@pytest.mark.parametrize("arch", ARCHS)
def test_every_module_of_full_size_models_round_trips_through_kohya_names(meta_models, arch):
    unet, text = meta_models[arch]
    weights = lora_like(unet, text)
    assert len(weights.modules) > 300
    for name in weights.modules:
        kohya = kohya_module_name(name, family=get_family(arch))
        assert module_from_key(kohya)[0] == name, kohya
    assert guess_architecture(weights) == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_original_ldm_unet_names_map_to_diffusers_as_diffusers_own_converter_does(meta_models, arch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = meta_models[arch][0]
    up_attention = {i: kind.startswith("CrossAttn") for i, kind in enumerate(unet.config.up_block_types)}
    checkpoint, marker = {}, {}
    for index, key in enumerate(unet.state_dict()):
        module, _, param = key.rpartition(".")
        checkpoint[f"model.diffusion_model.{diffusers_to_ldm(module, 2, up_attention)}.{param}"] = torch.tensor(
            float(index)
        )
        marker[key] = float(index)
    converted = {key: float(value) for key, value in convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)).items()}
    assert converted == marker  # the test's LDM names are the ones diffusers reads
    for key in unet.state_dict():
        module = key.rpartition(".")[0]
        ldm = diffusers_to_ldm(module, 2, up_attention)
        assert ldm_to_diffusers_unet_path(ldm, 2) == module
        assert decode_kohya_path(ldm.replace(".", "_")) == ldm


# --------------------------------------------------------------------- reading and round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_diffusers_peft_file_reads_with_every_update_exact(peft_files, arch):
    path, want = peft_files[arch]
    info = inspect_lora(path)
    assert info.layouts == ["peft"]
    assert {m.alpha for n, m in info.weights.modules.items() if n.startswith("unet.")} == {3.0}
    assert_same_updates(updates(info.weights), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_peft_kohya_internal_peft_keeps_every_update_exact(peft_files, arch, tmp_path):
    path, want = peft_files[arch]
    first = load_lora(path)
    kohya = load_lora(save_lora(first, tmp_path / "k.safetensors"))
    peft = load_lora(save_lora(kohya, tmp_path / "p.safetensors", format="peft"))
    again = load_lora(save_lora(peft, tmp_path / "k2.safetensors"))
    for weights in (kohya, peft, again):
        assert_same_updates(updates(weights), want)
        for name, module in weights.modules.items():  # the factors themselves, not only their product
            assert torch.equal(module.down, first.modules[name].down) and torch.equal(module.up, first.modules[name].up)
    # SDXL's add_embedding is written with its original name (label_emb), which diffusers maps.
    expected_layouts = ["kohya", "kohya-ldm"] if arch == "sdxl" else ["kohya"]
    assert inspect_lora(tmp_path / "k.safetensors").layouts == expected_layouts


@pytest.mark.parametrize("arch", ARCHS)
def test_default_file_loads_in_diffusers_without_stray_keys_and_changes_the_output(
    peft_files, tiny_model_dirs, arch, tmp_path
):
    path, want = peft_files[arch]
    written = save_lora(load_lora(path), tmp_path / "expert.safetensors")
    with safe_open(written, "pt") as handle:
        assert all(key.startswith(("lora_unet_", "lora_te")) for key in handle.keys())  # noqa: SIM118 - safe_open is not iterable

    def image(pipe):
        return pipe(
            "a red cube",
            num_inference_steps=1,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    pipe = load_pipe(tiny_model_dirs[arch])
    base = image(pipe)
    with diffusers_warnings(include_peft=True) as messages:
        pipe.load_lora_weights(str(written))
    assert not [m for m in messages if "unexpected" in m or "missing" in m or "did not match" in m], messages
    # Every module of the file arrived in a peft layer, at the strength the source had.
    assert_same_updates(peft_updates(pipe), want)
    assert (image(pipe) - base).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_default_file_keys_are_all_in_comfyui_key_map(peft_files, tiny_pipes, arch, tmp_path):
    path, _ = peft_files[arch]
    written = save_lora(load_lora(path), tmp_path / "expert.safetensors")
    pipe = tiny_pipes[arch]
    accepted = comfyui_accepted_keys(pipe, arch)
    # ComfyUI also maps "lora_unet_" + every original (LDM) UNet name: tiny UNets have 1 layer per block.
    up_attention = {i: kind.startswith("CrossAttn") for i, kind in enumerate(pipe.unet.config.up_block_types)}
    for path_, layer in pipe.unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            ldm = "lora_unet_" + diffusers_to_ldm(path_, 1, up_attention).replace(".", "_")
            accepted |= {f"{ldm}.lora_down.weight", f"{ldm}.lora_up.weight", f"{ldm}.alpha"}
    with safe_open(written, "pt") as handle:
        keys = set(handle.keys())
    assert keys <= accepted, sorted(keys - accepted)[:5]
    text_keys = {key for key in keys if key.startswith("lora_te")}
    assert text_keys and all("_text_model_encoder_layers_" in key for key in text_keys)
    if arch == "sdxl":
        assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)


def test_mixed_ranks_and_alphas_survive_every_conversion_and_load_in_diffusers(tiny_model_dirs, tmp_path):
    pipe = load_pipe(tiny_model_dirs["sd1"])
    configs = add_peft_lora(
        pipe,
        rank=4,
        alpha=3,
        unet_targets=[*UNET_ATTENTION, "conv1", "ff.net.2"],
        seed=2,
        rank_pattern={"attn2.to_k": 2, "conv1": 3},
        alpha_pattern={"attn1.to_q": 7, "ff.net.2": 0.5},
    )
    want = peft_updates(pipe)
    source = save_peft_lora_with_diffusers(pipe, configs, tmp_path / "src")
    weights = load_lora(source)
    assert {m.alpha for m in weights.modules.values()} == {3.0, 7.0, 0.5}
    assert_same_updates(updates(weights), want)
    peft = save_lora(weights, tmp_path / "p.safetensors", format="peft")
    kohya = save_lora(weights, tmp_path / "k.safetensors")
    assert_same_updates(updates(load_lora(peft)), want)
    # kohya: modules off the common alpha are rescaled for diffusers' reader, exact up to rounding.
    assert_same_updates(updates(load_lora(kohya)), want, exact=False)
    for path in (peft, kohya):
        fresh = load_pipe(tiny_model_dirs["sd1"])
        fresh.load_lora_weights(str(path))
        assert_same_updates(peft_updates(fresh), want, exact=False)

    alpha_is_rank = LoraWeights({name: LoraModule(m.down, m.up, float(m.rank)) for name, m in weights.modules.items()})
    kohya_plain = save_lora(alpha_is_rank, tmp_path / "plain.safetensors")
    with safe_open(kohya_plain, "pt") as handle:
        assert not [key for key in handle.keys() if key.endswith(".alpha")]  # noqa: SIM118 - safe_open; alpha = rank
    assert_same_updates(updates(load_lora(kohya_plain)), updates(alpha_is_rank))


def test_peft_state_dict_without_prefix_needs_the_component_and_takes_its_alpha(tiny_model_dirs):
    from peft import get_peft_model_state_dict

    pipe = load_pipe(tiny_model_dirs["sd1"])
    configs = add_peft_lora(pipe, rank=4, alpha=16, seed=3)
    state_dict = get_peft_model_state_dict(pipe.unet)
    assert next(iter(state_dict)).startswith("down_blocks.")
    with pytest.raises(LoraFormatError, match="component"):
        lora_from_state_dict(state_dict)
    weights = lora_from_state_dict(state_dict, component="unet", alpha=configs["unet"].lora_alpha)
    assert_same_updates(updates(weights), peft_updates(pipe))
    with_default = {k: v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}  # the raw module state
    assert next(iter(with_default)).endswith(".lora_A.default.weight")
    assert_same_updates(updates(lora_from_state_dict(with_default, component="unet", alpha=16)), peft_updates(pipe))


def test_reads_kohya_ldm_comfyui_and_old_diffusers_layouts_into_the_same_modules(tiny_pipes):
    """Each layout is spelled here by its own rule, not by the library's writer."""
    pipe = tiny_pipes["sd1"]
    weights = random_lora(pipe, rank=3, alpha=1.5, unet_targets=UNET_ALL, text_targets=TEXT_ALL, seed=4)
    want = updates(weights)
    up_attention = {i: kind.startswith("CrossAttn") for i, kind in enumerate(pipe.unet.config.up_block_types)}
    kohya_ldm, comfy, lycoris, old = {}, {}, {}, {}
    for name, module in weights.modules.items():
        component, _, path = name.partition(".")
        if component == "unet":
            ldm = diffusers_to_ldm(path, 1, up_attention)
            kohya_key, comfy_key = "lora_unet_" + ldm.replace(".", "_"), "diffusion_model." + ldm
            lycoris_key = "lycoris_" + path.replace(".", "_")
        else:
            kohya_key = lycoris_key = "lora_te_" + path.replace(".", "_")
            comfy_key = "text_encoders.clip_l.transformer." + path
        for prefix, out in ((kohya_key, kohya_ldm), (comfy_key, comfy), (lycoris_key, lycoris)):
            out.update(
                {
                    f"{prefix}.lora_down.weight": module.down,
                    f"{prefix}.lora_up.weight": module.up,
                    f"{prefix}.alpha": torch.tensor(module.alpha),
                }
            )
        if component == "unet" and path.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            procs = path.replace(".to_", ".processor.to_").removesuffix(".0")
            old |= {f"{procs}_lora.down.weight": module.down, f"{procs}_lora.up.weight": module.up}
    assert_same_updates(updates(lora_from_state_dict(kohya_ldm, ldm_layers_per_block=1)), want)
    assert_same_updates(updates(lora_from_state_dict(comfy, ldm_layers_per_block=1)), want)
    assert_same_updates(updates(lora_from_state_dict(lycoris)), want)
    attention = {n: m for n, m in weights.modules.items() if n.startswith("unet.") and ".attn" in n}
    read_old = lora_from_state_dict(old)
    assert_same_updates(
        {n: m.delta() for n, m in read_old.modules.items()},
        {n: LoraModule(m.down, m.up, float(m.rank)).delta() for n, m in attention.items()},
    )


def test_comfyui_trainer_file_dense_diffs_become_exact_and_bias_diffs_need_consent():
    weight_diff, conv_diff = torch.randn(8, 6), torch.randn(5, 4, 3, 3)
    state = {
        "diffusion_model.input_blocks.1.1.proj_in.diff": weight_diff,
        "diffusion_model.input_blocks.1.0.in_layers.2.diff": conv_diff,
        "diffusion_model.input_blocks.1.1.proj_in.diff_b": torch.zeros(8),
        "diffusion_model.input_blocks.1.1.norm.diff": torch.zeros(8),
    }
    weights = lora_from_state_dict(state)  # all-zero bias / norm differences are dropped silently
    assert torch.equal(weights.modules["unet.down_blocks.0.attentions.0.proj_in"].delta(), weight_diff)
    assert torch.equal(weights.modules["unet.down_blocks.0.resnets.0.conv1"].delta(), conv_diff)
    state["diffusion_model.input_blocks.1.1.proj_in.diff_b"] = torch.ones(8)
    with pytest.raises(LoraFormatError, match="bias / norm differences.*drop_bias_diffs"):
        lora_from_state_dict(state)
    assert len(lora_from_state_dict(state, drop_bias_diffs=True).modules) == 2


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "LoKr"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale", "DoRA"),
        ("unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector", "DoRA"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "Tucker"),
    ],
)
def test_adapters_without_low_rank_form_are_refused_naming_the_format(key, named):
    state = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2),
        key: torch.zeros(2, 2),
    }
    with pytest.raises(LoraFormatError, match=named):
        lora_from_state_dict(state, source="odd.safetensors")


# ---------------------------------------------------------------------------------- bad files


class _Trap:
    """Unpickling this object would create a file: proof that a refused file was never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".safetensors"])
def test_pickle_files_are_refused_without_being_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(LoraFormatError, match="pickle") as error:
        load_lora(path)
    assert str(path) in str(error.value) and "arbitrary code" in str(error.value)
    assert not marker.exists()


def test_truncated_lying_and_non_lora_files_raise_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1),
        },
        str(good),
    )
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-7])
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    header["lora_unet_conv_in.lora_up.weight"]["shape"] = [64, 2, 1, 1]
    lying_header = json.dumps(header).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(lying_header)) + lying_header + raw[8 + header_size :])
    not_lora = tmp_path / "checkpoint.safetensors"
    save_file({"conv_in.weight": torch.zeros(2), "time_embedding.linear_1.bias": torch.zeros(2)}, str(not_lora))
    half_lora = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4)}, str(half_lora))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    cases = {
        truncated: "truncated",
        lying: "header lies",
        not_lora: "not a LoRA",
        half_lora: "lacks its up",
        garbage: "not a safetensors file",
        tmp_path / "missing.safetensors": "no such file",
    }
    for path, message in cases.items():
        with pytest.raises(LoraFormatError, match=message) as error:
            load_lora(path)
        assert str(path) in str(error.value)
    assert len(load_lora(good).modules) == 1


# ----------------------------------------------------------------------------------- metadata


def test_metadata_holds_ours_kohya_and_modelspec_fields_as_strings(peft_files, tmp_path):
    path, _ = peft_files["sdxl"]
    weights = load_lora(path)
    ours = lora_metadata(
        base_model="tiny:sdxl",
        skill="countbench",
        method="selma",
        weights=[0.5, 0.5],
        recipe_sha256="ab" * 32,
        title="countbench expert",
    )
    kohya = save_lora(weights, tmp_path / "k.safetensors", metadata=ours)
    peft = save_lora(weights, tmp_path / "p.safetensors", format="peft", metadata=ours)
    for written in (kohya, peft):
        with safe_open(written, "pt") as handle:
            metadata = handle.metadata()
        assert all(isinstance(value, str) for value in metadata.values())
        assert metadata["selma.base_model"] == "tiny:sdxl" and metadata["selma.skill"] == "countbench"
        assert json.loads(metadata["selma.weights"]) == [0.5, 0.5]
        assert metadata["selma.architecture"] == "sdxl" and metadata["selma.toolkit_version"]
        assert metadata["selma.rank"] == "2,4" and metadata["selma.alpha"] == "3,5"
        assert "to_q" in json.loads(metadata["selma.targets"])["unet"]
        assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "3"
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_sd_model_name"] == "tiny:sdxl"
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert metadata["modelspec.title"] == "countbench expert"
    with safe_open(peft, "pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 3 and adapter["text_encoder_2.lora_alpha"] == 5
    with safe_open(kohya, "pt") as handle:
        assert "lora_adapter_metadata" not in handle.metadata()  # stale for kohya keys
    reread = load_lora(kohya)
    assert metadata_value(reread, "skill") == "countbench"
    plain = save_lora(LoraWeights(reread.modules, {"base_model": "x/y"}), tmp_path / "plain.safetensors")
    assert metadata_value(load_lora(plain), "base_model") == "x/y"
    with safe_open(plain, "pt") as handle:
        assert handle.metadata()["selma.base_model"] == "x/y" and "base_model" not in handle.metadata()


def test_guess_architecture_from_shapes_then_metadata(tiny_pipes):
    sdxl = random_lora(tiny_pipes["sdxl"], text_targets=["q_proj"])
    assert guess_architecture(sdxl) == "sdxl"  # second text encoder, two transformer blocks
    sd1 = random_lora(tiny_pipes["sd1"], unet_targets=["proj_in"])
    assert guess_architecture(sd1) == "sd1"  # conv proj_in
    sd2_attention = random_lora(tiny_pipes["sd2"])
    assert guess_architecture(sd2_attention) is None  # tiny widths and attention only: nothing tells
    sd2_attention.metadata["ss_base_model_version"] = "sd_v2"
    assert guess_architecture(sd2_attention) == "sd2"
    sd1.metadata["selma.architecture"] = "sdxl"  # shapes win over metadata that contradicts them
    assert guess_architecture(sd1) == "sd1"


# ------------------------------------------------------------------------------------------ CLI


def test_cli_info_and_convert_make_a_diffusers_file_comfyui_ready(cli, peft_files, tmp_path):
    path, want = peft_files["sd1"]
    out = tmp_path / "kohya.safetensors"
    result = cli("lora", "convert", str(path), str(out))
    assert result.returncode == 0, result.stderr
    assert_same_updates(updates(load_lora(out)), want)
    info = cli("lora", "info", str(out))
    assert info.returncode == 0, info.stderr
    for expected in ("kohya", "sd1", "131", "text_encoder 12", "2 x12", "4 x119", "3 x119", "5 x12", "ss_network_dim"):
        assert expected in info.stdout, expected
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04K\x01.")
    refused = cli("lora", "info", str(bad))
    assert refused.returncode == 2 and "pickle" in refused.stderr and "Traceback" not in refused.stderr

"""The family registry (selma_toolkit/architectures.py): one record per base-model family, and
every module reads family facts from it instead of comparing names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selma_toolkit import architectures
from selma_toolkit.architectures import (
    COMFY_CLIP_COMPONENTS,
    COMPONENTS,
    FAMILIES,
    FAMILY_NAMES,
    KOHYA_TEXT_PREFIXES,
    family_from_metadata,
    family_of_comfy_model,
    family_of_pipeline,
    get_family,
)
from selma_toolkit.lora.keys import kohya_module_name, module_from_key

PACKAGE = Path(architectures.__file__).parent


def test_every_family_record_is_consistent():
    assert set(FAMILY_NAMES) == set(FAMILIES)
    for family in FAMILIES.values():
        components = family.components
        assert len(set(components)) == len(components), family.name
        assert set(components) <= set(COMPONENTS)
        tokenizers = [encoder.tokenizer for encoder in family.text_encoders]
        assert len(set(tokenizers)) == len(tokenizers), family.name
        assert len(family.tiny.text_activations) == len(family.text_encoders), family.name
        assert family.kohya_base_version.startswith(family.kohya_version_prefixes), family.name
        assert family.modelspec_architecture.startswith(family.modelspec_prefixes), family.name


def test_unknown_family_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"architecture 'sd3x': expected one of sd1, sd2, sdxl, sd3, flux, chroma, "
        r"qwen-image, z-image, flux2-klein",
    ):
        get_family("sd3x")


@pytest.mark.parametrize("arch", FAMILY_NAMES)
def test_each_tiny_model_is_recognised_as_its_family_from_its_files(arch, tiny_model_dirs):
    folder = tiny_model_dirs[arch]
    index = json.loads((folder / "model_index.json").read_text())
    config = json.loads((folder / get_family(arch).denoiser / "config.json").read_text())
    assert family_of_pipeline(index["_class_name"], config).name == arch
    assert index["_class_name"] == get_family(arch).pipeline_class
    assert [name for name in index if name.startswith("text_encoder")] == list(get_family(arch).text_encoder_components)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"selma.architecture": "sd2"}, "sd2"),
        ({"architecture": "sdxl"}, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-v2-512/lora"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        ({"ss_base_model_version": "flux1"}, "flux"),
        ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
        ({"modelspec.architecture": "stable-diffusion-3.5-large/lora"}, "sd3"),
        ({"ss_base_model_version": "sd3"}, "sd3"),
        ({"selma.architecture": "qwen-image"}, "qwen-image"),
        ({"modelspec.architecture": "flux-2-klein-4b/lora"}, "flux2-klein"),
        ({"ss_base_model_version": "flux2_klein"}, "flux2-klein"),
        ({"modelspec.architecture": "z-image/lora"}, "z-image"),
        ({"ss_base_model_version": "chroma"}, "chroma"),
        ({"modelspec.architecture": "hunyuan-dit/lora"}, None),
        ({}, None),
    ],
)
def test_family_from_metadata_reads_ours_kohyas_and_modelspecs_names(metadata, expected):
    family = family_from_metadata(metadata)
    assert (family.name if family else None) == expected


def test_comfyui_model_classes_map_to_families():
    assert family_of_comfy_model("SD15").name == "sd1"
    assert family_of_comfy_model("SD20").name == "sd2"
    assert family_of_comfy_model("SDXL").name == "sdxl"
    assert family_of_comfy_model("Flux").name == "flux"
    assert family_of_comfy_model("FluxSchnell").name == "flux"
    assert family_of_comfy_model("SD3").name == "sd3"
    assert family_of_comfy_model("Chroma").name == "chroma"
    assert family_of_comfy_model("QwenImage").name == "qwen-image"
    assert family_of_comfy_model("Lumina2").name == "z-image"  # ComfyUI's Z-Image model class
    assert family_of_comfy_model("Flux2").name == "flux2-klein"
    assert family_of_comfy_model("HunyuanDiT") is None


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_kohya_text_encoder_names_round_trip_through_the_registry_prefixes(arch):
    family = get_family(arch)
    for encoder in family.text_encoders:
        canonical = f"{encoder.component}.text_model.encoder.layers.0.self_attn.q_proj"
        name = kohya_module_name(canonical, family=family)
        assert name.startswith(encoder.kohya_prefix)
        assert module_from_key(name) == (canonical, "kohya")
        comfy = f"text_encoders.{encoder.comfy_clip}.transformer.text_model.encoder.layers.0.self_attn.q_proj"
        assert module_from_key(comfy) == (canonical, "comfyui")
    # lora_te1_ must be tried before lora_te_ (its prefix): longest first
    prefixes = [prefix for prefix, _ in KOHYA_TEXT_PREFIXES]
    assert prefixes == sorted(prefixes, key=len, reverse=True)
    # t5xxl is SD 3's third text encoder, Flux's second and Chroma's first: no single component, so
    # not in the table; Qwen-Image's and Z-Image / FLUX.2 [klein]'s language models are their only encoder.
    assert set(COMFY_CLIP_COMPONENTS) == {"clip_l", "clip_h", "clip_g", "qwen25_7b", "qwen3_4b"}


def test_no_module_outside_the_registry_compares_family_names():
    """Family facts live in architectures.py: elsewhere a family name may appear in prose, a
    default argument or a help text, but not in a comparison, a membership test or a mapping."""
    names = "|".join(re.escape(name) for name in FAMILY_NAMES)
    rule = re.compile(rf"""(==|!=|\bin\s*[\(\[\{{])\s*["']({names})["']|["']({names})["']\s*:""")
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "comfyui_nodes").rglob("*.py")]:
        if path.name == "architectures.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if rule.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

"""The embedded tiny models: standard diffusers layout, loadable by DiffusionPipeline, deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from selma_toolkit.errors import ModelError
from selma_toolkit.models import architecture_from_config, detect_architecture, resolve_model


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_model_loads_and_generates(tiny_model_dirs, arch):
    from diffusers import DiffusionPipeline

    path = tiny_model_dirs[arch]
    expected = {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if arch == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
    assert expected <= {p.name for p in path.iterdir()}
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red cube left of a blue ball",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert detect_architecture(str(path)) == arch


def test_sd2_is_v_prediction_and_sdxl_has_two_text_encoders(tiny_model_dirs):
    scheduler = json.loads((tiny_model_dirs["sd2"] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    index = json.loads((tiny_model_dirs["sdxl"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"][1] == "CLIPTextModelWithProjection"


def test_same_seed_writes_the_same_weights(tmp_path, tiny_model_dirs):
    from selma_toolkit.tiny import create_tiny_model

    again = create_tiny_model(tmp_path / "again", "sd1")
    assert (again / "tokenizer/tokenizer.json").read_text() == (
        tiny_model_dirs["sd1"] / "tokenizer/tokenizer.json"
    ).read_text()
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(tiny_model_dirs["sd1"] / part), load_file(again / part)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    other = load_file(create_tiny_model(tmp_path / "other", "sd1", seed=1) / "unet/diffusion_pytorch_model.safetensors")
    assert any(
        not torch.equal(other[k], first_k)
        for k, first_k in load_file(tiny_model_dirs["sd1"] / "unet/diffusion_pytorch_model.safetensors").items()
    )


def test_tiny_spec_resolves_to_a_cached_model():
    path = resolve_model("tiny:sd2")
    assert (resolve_model("tiny:sd2") == path) and detect_architecture("tiny:sd2") == "sd2"
    with pytest.raises(ModelError, match="tiny:<arch>"):
        resolve_model("tiny:sd9")


def test_tokenizer_keeps_common_words_whole():
    from selma_toolkit.tiny import tiny_tokenizer

    tokens = tiny_tokenizer().tokenize("two red apples on a table")
    assert tokens[:2] == ["two</w>", "red</w>"] and "table</w>" in tokens


def test_bad_model_references_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle"):
        resolve_model(str(tmp_path / "model.ckpt"))
    with pytest.raises(ModelError, match="owner/name"):
        resolve_model(str(tmp_path / "missing"))


def test_architecture_from_unet_config():
    assert architecture_from_config({"addition_embed_type": "text_time"}) == "sdxl"
    assert architecture_from_config({"use_linear_projection": True}) == "sd2"
    assert architecture_from_config({"attention_head_dim": 8, "cross_attention_dim": 768}) == "sd1"

"""SELMA LoRA Loader, LORA_STACK in and out, catalog names from the local cache, and saving only what fits,
without ComfyUI: the FAKE folder_paths and comfy.* modules of tests/support_comfyui.py, the real toolkit,
the real huggingface_hub cache lookup. tests/test_comfyui_real.py runs the same nodes in a real ComfyUI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from support_comfyui import full_size_expert
from support_nodes import SelmaLoraLoader, SelmaMergeLoraStack, SelmaSaveLora, merge, run, sha256, stack

from selma_toolkit.errors import LoraFormatError
from selma_toolkit.lora import load_lora, lora_from_state_dict, merge_experts, save_lora

ATTENTION = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
)


@pytest.fixture
def experts(loras, models):
    """Three SD 1.5 experts in the loras folder (two layers and CLIP-L's first q_proj each): their files."""
    files = []
    (loras / "selma").mkdir()
    for seed, name in enumerate(("count", "whoops", "narratives")):
        expert = full_size_expert(
            "sd1",
            seed=seed,
            rank=2,
            unet_layers=ATTENTION,
            text_layers=("layers.0.self_attn.q_proj",),
            models=models["sd1"],
        )
        files.append(save_lora(expert, loras / "selma" / f"{name}.safetensors"))
    return files


def loader(model, clip, names_and_weights=(), method="selma", strength_model=1.0, strength_clip=1.0, **options):
    """SELMA LoRA Loader with the slots filled in order (the rest None)."""
    slots = {}
    for index in range(1, 6):
        name, weight = names_and_weights[index - 1] if index <= len(names_and_weights) else ("None", 1.0)
        slots.update({f"expert_{index}": name, f"weight_{index}": weight})
    return SelmaLoraLoader().run(
        model=model,
        clip=clip,
        method=method,
        strength_model=strength_model,
        strength_clip=strength_clip,
        rank=0,
        normalize_weights=True,
        **slots,
        **options,
    )


def assert_same_updates(merged, expected) -> None:
    """Two LoRAs (LoraWeights) make the same update of every module."""
    assert set(merged.modules) == set(expected.modules)
    for name, module in expected.modules.items():
        torch.testing.assert_close(merged.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------- LoRA Loader


def test_lora_loader_merges_the_chosen_experts_and_a_stack_and_applies_one_lora(experts, sd15_comfy):
    model, clip, calls = sd15_comfy
    stack_in = [("selma/narratives.safetensors", 2.0, 2.0)]  # CR LoRA Stack's (file, model weight, clip weight)
    out = loader(
        model,
        clip,
        [("selma/count.safetensors", 1.0), ("selma/whoops.safetensors", 1.0)],
        "delta",
        0.8,
        0.5,
        lora_stack=stack_in,
    )
    patched_model, patched_clip, lora, summary = out["result"]
    assert (patched_model, patched_clip) == ("patched MODEL", "patched CLIP")
    assert [(c[2], c[3], c[4]) for c in calls] == [(lora, 0.8, 0.5)]  # one LoRA, LoraLoader's strengths
    # The library's merge of the same files, weights 1, 1, 2 normalised to 1/4, 1/4, 1/2 (slots first, then the stack).
    assert_same_updates(
        lora_from_state_dict(lora, lora.metadata),
        merge_experts([load_lora(f) for f in experts], "delta", [0.25, 0.25, 0.5]),
    )
    record = json.loads(lora.metadata["selma.merge"])
    assert [(e["name"], e["sha256"]) for e in record["experts"]] == [
        (f"selma/{n}.safetensors", sha256(f)) for n, f in zip(("count", "whoops", "narratives"), experts, strict=True)
    ]
    assert out["ui"] == {"text": [summary]} and summary.startswith("delta merge of 3 experts")


def test_lora_loader_reruns_when_a_chosen_file_changes_and_needs_an_expert(experts, sd15_comfy, models):
    model, clip, _ = sd15_comfy
    names = {
        "expert_1": "selma/count.safetensors",
        "expert_2": "None",
        "expert_3": "selma/whoops.safetensors",
        "weight_1": 1.0,
    }
    first = SelmaLoraLoader.IS_CHANGED(**names)
    assert first == f"{sha256(experts[0])},{sha256(experts[1])}"
    assert SelmaLoraLoader.IS_CHANGED(**{**names, "weight_1": 0.3}) == first  # widgets are ComfyUI's own cache key
    save_lora(
        full_size_expert("sd1", seed=9, rank=2, unet_layers=ATTENTION, text_layers=(), models=models["sd1"]), experts[1]
    )
    assert SelmaLoraLoader.IS_CHANGED(**names) != first
    with pytest.raises(
        LoraFormatError, match=r"SELMA LoRA Loader: expert_1 to expert_5: no expert to merge\. Choose one in expert_1"
    ):
        loader(model, clip)


def test_lora_loader_refuses_a_merge_that_does_not_fit_the_model(loras, models, sd15_comfy):
    from selma_toolkit.tiny import build_tiny_pipeline

    model, clip, calls = sd15_comfy
    tiny = build_tiny_pipeline("sd1")  # 32-channel SD 1.x layers: names that exist in SD 1.5, shapes that do not
    save_lora(
        full_size_expert(
            "sd1",
            seed=0,
            rank=2,
            unet_layers=ATTENTION,
            text_layers=(),
            models=(tiny.unet, {"text_encoder": tiny.text_encoder}),
        ),
        loras / "tiny.safetensors",
    )
    with pytest.raises(LoraFormatError, match="SELMA LoRA Loader: the LoRA does not fit this SD15 model"):
        loader(model, clip, [("tiny.safetensors", 1.0)])
    with pytest.raises(LoraFormatError, match="does not fit"):  # at strength 0 too: refused, not silently unused
        loader(model, clip, [("tiny.safetensors", 1.0)], strength_model=0.0, strength_clip=0.0)
    assert calls == []


def test_expert_lists_offer_the_loras_folder_and_pulled_catalog_experts(
    experts, loras, tmp_path, monkeypatch, sd15_comfy
):
    import huggingface_hub.constants

    # The real Hugging Face cache layout, as an earlier pull leaves it (models--owner--name/snapshots/<commit>/file).
    cache = tmp_path / "hf-cache"
    commit = "0" * 40
    snapshot = cache / "models--alice--counting" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "counting.safetensors").write_bytes(experts[0].read_bytes())
    (cache / "models--alice--counting" / "refs").mkdir()
    (cache / "models--alice--counting" / "refs" / "main").write_text(commit)
    catalog = tmp_path / "catalog.toml"
    entry = (
        'repo = "alice/{}"\nfile = "{}.safetensors"\nskill = "countbench"\nbase_model = "sd15"\n'
        'architecture = "sd1"\nsha256 = "{}"\n'
    )
    catalog.write_text(
        f"[counting]\n{entry.format('counting', 'counting', sha256(experts[0]))}"
        f"[elsewhere]\n{entry.format('elsewhere', 'elsewhere', '1' * 64)}"
    )  # never pulled
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("SELMA_CATALOG", str(catalog))
    choices = SelmaLoraLoader.INPUT_TYPES()["required"]["expert_2"][0]
    assert choices == [
        "None",
        "selma/count.safetensors",
        "selma/narratives.safetensors",
        "selma/whoops.safetensors",
        "catalog:counting",
    ]
    model, clip, _ = sd15_comfy
    lora = loader(model, clip, [("catalog:counting", 1.0)])["result"][2]
    assert json.loads(lora.metadata["selma.merge"])["experts"][0]["sha256"] == sha256(experts[0])
    (snapshot / "counting.safetensors").write_bytes(experts[1].read_bytes())  # the cached file changed since the pull
    with pytest.raises(
        LoraFormatError, match=r"'catalog:counting': the cached file .* does not have the catalog's sha256"
    ):
        loader(model, clip, [("catalog:counting", 1.0)])
    with pytest.raises(LoraFormatError, match="'catalog:elsewhere': no pulled catalog expert of that name"):
        loader(model, clip, [("catalog:elsewhere", 1.0)])


# ------------------------------------------------------------------------------- LORA_STACK


def test_merge_lora_stack_writes_a_fitting_merge_once_and_emits_it_as_a_stack_entry(experts, loras, sd15_comfy):
    model, clip, _ = sd15_comfy
    stack_in = [("selma/count.safetensors", 1.0, 1.0), ("None", 1.0, 1.0), ("selma/whoops.safetensors", 3.0, 3.0)]
    inputs = dict(model=model, clip=clip, lora_stack=stack_in, method="selma", strength_model=0.9, strength_clip=0.7)
    (entry,), summary = run(SelmaMergeLoraStack, **inputs)
    name, strength_model, strength_clip = entry
    assert name.startswith("selma/stack/merged-") and (strength_model, strength_clip) == (0.9, 0.7)
    written = loras / name
    assert_same_updates(load_lora(written), merge_experts([load_lora(f) for f in experts[:2]], "selma", [0.25, 0.75]))
    assert "selma merge of 2 experts" in summary
    stat = written.stat()
    again = run(SelmaMergeLoraStack, **inputs)
    assert again[0] == [entry] and written.stat().st_mtime_ns == stat.st_mtime_ns  # the same merge, not written again
    other = run(SelmaMergeLoraStack, **{**inputs, "method": "delta"})
    assert other[0][0][0] != name and len(list((loras / "selma" / "stack").iterdir())) == 2


def test_merge_lora_stack_writes_nothing_for_a_merge_that_does_not_fit(loras, sd15_comfy, models):
    from selma_toolkit.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("sd1")
    save_lora(
        full_size_expert(
            "sd1",
            seed=0,
            rank=2,
            unet_layers=ATTENTION,
            text_layers=(),
            models=(tiny.unet, {"text_encoder": tiny.text_encoder}),
        ),
        loras / "tiny.safetensors",
    )
    model, clip, _ = sd15_comfy
    with pytest.raises(LoraFormatError, match="SELMA Merge LoRA Stack: the LoRA does not fit this SD15 model"):
        run(
            SelmaMergeLoraStack,
            model=model,
            clip=clip,
            lora_stack=[("tiny.safetensors", 1.0, 1.0)],
            method="selma",
            strength_model=1.0,
            strength_clip=1.0,
        )
    assert not (loras / "selma").exists()


def test_stack_entries_need_one_weight_per_expert_and_the_right_shape(experts, sd15_comfy):
    model, clip, _ = sd15_comfy
    with pytest.raises(
        LoraFormatError,
        match=r"lora_stack entry 'selma/count.safetensors': model weight 1.0 and clip "
        r"weight 0.5 differ; a SELMA merge gives each expert one weight",
    ) as info:
        loader(model, clip, lora_stack=[("selma/count.safetensors", 1.0, 0.5)])
    assert "the merged LoRA's strength_clip input scales its text-encoder part" in str(info.value)
    with pytest.raises(
        LoraFormatError,
        match=r"lora_stack entry 1: not a LoRA stack entry; found 'count'; expected "
        r"\(file name, model weight, clip weight\)",
    ):
        loader(model, clip, lora_stack=["count"])
    with pytest.raises(LoraFormatError, match="SELMA Merge LoRA Stack: the lora_stack input: no expert to merge"):
        run(
            SelmaMergeLoraStack,
            model=model,
            clip=clip,
            lora_stack=[("None", 1.0, 1.0)],
            method="selma",
            strength_model=1.0,
            strength_clip=1.0,
        )


# ------------------------------------------------------------------------------- Save LoRA


def test_save_lora_given_the_model_writes_only_a_merge_that_fits_it(experts, loras, sd15_comfy, models):
    from selma_toolkit.tiny import build_tiny_pipeline

    model, clip, _ = sd15_comfy
    lora, _ = merge(stack(("selma/count.safetensors", 1.0), ("selma/whoops.safetensors", 1.0)))
    out = SelmaSaveLora().run(lora=lora, filename_prefix="selma/merged", format="kohya", model=model, clip=clip)
    assert out == {
        "ui": {"text": ["saved loras/selma/merged_00001_.safetensors"]},
        "result": ("selma/merged_00001_.safetensors",),
    }
    tiny = build_tiny_pipeline("sd1")
    save_lora(
        full_size_expert(
            "sd1",
            seed=0,
            rank=2,
            unet_layers=ATTENTION,
            text_layers=(),
            models=(tiny.unet, {"text_encoder": tiny.text_encoder}),
        ),
        loras / "tiny.safetensors",
    )
    misfit, _ = merge(stack(("tiny.safetensors", 1.0)))
    before = sorted(os.listdir(loras / "selma"))
    with pytest.raises(LoraFormatError, match="SELMA Save LoRA: the LoRA does not fit this SD15 model"):
        SelmaSaveLora().run(lora=misfit, filename_prefix="selma/merged", format="kohya", model=model, clip=clip)
    with pytest.raises(LoraFormatError, match="SELMA Save LoRA: the clip input: connect both model and clip"):
        SelmaSaveLora().run(lora=misfit, filename_prefix="selma/merged", format="kohya", model=model)
    assert sorted(os.listdir(loras / "selma")) == before  # nothing written

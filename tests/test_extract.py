"""`selma lora extract`: known LoRAs fused into the tiny sd1 / sd2 / sdxl / flux models with diffusers'
fuse_lora come back from the fused and the base model, checked against the known updates computed
here independently (scale B A in float64); the errors for pairs no LoRA explains; the file's
metadata; and the extracted file loaded by diffusers and merged with another expert."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support_extract import fused_model, known_lora, saved_as, single_file, total_update

from selma_toolkit.errors import ModelError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import load_lora
from selma_toolkit.lora.extract import EXTRACT_METADATA_KEY, extract_lora, save_extraction
from selma_toolkit.tiny import build_tiny_pipeline, create_tiny_model

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def relative_errors(extracted, updates: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        name: float((extracted.modules[name].delta(torch.float64) - want).norm() / want.norm())
        for name, want in updates.items()
    }


@pytest.fixture(scope="module")
def fused(tiny_model_dirs, tmp_path_factory):
    """Per family: (base folder, fused fp32 folder, the known LoRA), built once."""
    root = tmp_path_factory.mktemp("fused")
    made = {}
    for family, text in (("sd1", ("q_proj", "v_proj", "out_proj")), ("sdxl", ()), ("flux", ())):
        pipe = build_tiny_pipeline(family)
        lora = known_lora(pipe, family, rank=4, seed=1, text_targets=text)
        made[family] = (tiny_model_dirs[family], fused_model(tiny_model_dirs[family], [lora], root / family), lora)
    return made


# ---------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_fp32_fused_lora_comes_back_at_its_rank_within_1e_4(fused, family):
    base, model, lora = fused[family]
    extraction = extract_lora(model, base)
    assert set(extraction.weights.modules) == set(lora.modules), "exactly the adapted layers changed"
    assert {name: m.rank for name, m in extraction.weights.modules.items()} == dict.fromkeys(lora.modules, 4)
    errors = relative_errors(extraction.weights, total_update([lora], [1.0]))
    assert max(errors.values()) < 1e-4, max(errors.items(), key=lambda item: item[1])
    summary = extraction.summary()
    assert summary["unchanged"] == summary["compared"] - len(lora.modules) and summary["found_ranks"] == {
        4: len(lora.modules)
    }


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fp16_models_give_the_update_back_at_the_rounding_floor(fused, family, tmp_path):
    base, model, lora = fused[family]
    base16, model16 = (
        saved_as(base, tmp_path / "base16", torch.float16),
        saved_as(model, tmp_path / "model16", torch.float16),
    )
    extraction = extract_lora(model16, base16)
    assert {m.rank for m in extraction.weights.modules.values()} == {4} and set(extraction.weights.modules) == set(
        lora.modules
    )
    updates = total_update([lora], [1.0])
    from selma_toolkit.lora.model_weights import open_model_weights

    with open_model_weights(model16, "m") as fine, open_model_weights(base16, "b") as start:
        for name, want in updates.items():
            raw = (fine.read(name).double() - start.read(name).double()).reshape(want.shape[0], -1)
            u, s, vh = torch.linalg.svd(raw)
            oracle = float(((u[:, :4] * s[:4]) @ vh[:4] - want.reshape(raw.shape)).norm())  # the rank known in advance
            got = float((extraction.weights.modules[name].delta(torch.float64) - want).norm())
            assert got <= float((raw - want.reshape(raw.shape)).norm()), f"{name}: worse than the raw difference"
            assert got <= 1.05 * oracle, f"{name}: {got} against {oracle} for the rank-4 truncation"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # five adapters on purpose
def test_stacked_loras_are_found_at_their_summed_rank_and_full_rank_where_it_reaches_the_width(
    tiny_model_dirs, tmp_path
):
    # As the authors' set_adapters merge: five rank-8 experts, each weighted 1/len(model id) -> rank 40,
    # which fills the 32-wide layers of the tiny UNet and not the 64-wide ones.
    pipe = build_tiny_pipeline("sd1")
    experts = [known_lora(pipe, "sd1", rank=8, seed=10 + i, relative=0.3) for i in range(5)]
    weights = [1 / 29, 1 / 31, 1 / 35, 1 / 38, 1 / 40]
    model = fused_model(tiny_model_dirs["sd1"], experts, tmp_path / "stacked", weights=weights)
    extraction = extract_lora(model, tiny_model_dirs["sd1"])
    layers = {layer.name: layer for layer in extraction.changed}
    assert set(layers) == set(experts[0].modules)
    assert {(layer.width, layer.found) for layer in layers.values()} == {(32, 32), (64, 40)}
    assert all(layer.status == "full-rank" for layer in layers.values() if layer.width == 32)
    errors = relative_errors(extraction.weights, total_update(experts, weights))
    assert max(errors.values()) < 1e-4


def test_a_full_fine_tune_gives_its_best_rank_n_approximation_with_the_energy_it_captures(tiny_model_dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    model = tmp_path / "finetuned"
    shutil.copytree(tiny_model_dirs["sd1"], model)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * parameter.std().nan_to_num(0.01) * torch.randn_like(parameter))
    unet.save_pretrained(model / "unet")
    with pytest.raises(
        ModelError, match=r"\(is .*sd1 the model .*finetuned was trained from\?\)\. Set rank to a value of your choice "
    ):
        extract_lora(model, tiny_model_dirs["sd1"])
    extraction = extract_lora(model, tiny_model_dirs["sd1"], rank=4)
    assert extraction.rank == 4 and {m.rank for m in extraction.weights.modules.values()} <= {4}
    assert any(m.is_conv for m in extraction.weights.modules.values()), "conv layers are extracted too (LoCon)"
    energies = [layer.energy for layer in extraction.changed if layer.status == "low-rank"]
    assert energies and all(0 < e < 1 for e in energies)
    with torch.no_grad():  # the energy is what the rank-4 truncation keeps, by an independent SVD
        layer = extraction.changed[0]
        from selma_toolkit.lora.model_weights import open_model_weights

        with open_model_weights(model, "m") as fine, open_model_weights(tiny_model_dirs["sd1"], "b") as start:
            raw = (fine.read(layer.name).double() - start.read(layer.name).double()).reshape(layer.shape[0], -1)
        s = torch.linalg.svdvals(raw)
        assert layer.energy == pytest.approx(float(s[: layer.rank].square().sum() / s.square().sum()), rel=1e-3)


# -------------------------------------------------------------------------------------- errors


def test_a_wrong_base_is_refused_naming_both_models(fused, tmp_path):
    _, model, _ = fused["sd1"]
    other = create_tiny_model(tmp_path / "other-sd1", "sd1", seed=7)
    with pytest.raises(ModelError) as info:
        extract_lora(model, other)
    message = str(info.value)
    assert str(model) in message and str(other) in message
    assert (
        f"(is {other} the model {model} was trained from?). Set rank to a value of your choice (for a full "
        "fine-tune: its best rank-N approximation)"
    ) in message


def test_identical_models_and_copies_in_another_dtype_are_refused(fused, tmp_path):
    base, _, _ = fused["sd1"]
    with pytest.raises(ModelError, match="hold identical weights in all 131 compared layers: there is no difference"):
        extract_lora(base, base)
    copy16 = saved_as(base, tmp_path / "base16", torch.float16)
    with pytest.raises(
        ModelError, match=r"the same weights up to rounding \(one may be a copy of the other in another dtype\)"
    ):
        extract_lora(copy16, base)


def test_pickle_only_weights_are_refused_unless_opted_in_and_then_read_with_the_weights_only_loader(fused, tmp_path):
    from diffusers import UNet2DConditionModel

    base, model, lora = fused["sd1"]
    pickled = tmp_path / "pickled"
    shutil.copytree(model, pickled)
    for file in (pickled / "unet").glob("*.safetensors"):
        file.unlink()
    UNet2DConditionModel.from_pretrained(model / "unet").save_pretrained(pickled / "unet", safe_serialization=False)
    with pytest.raises(
        ModelError,
        match=r"the fine-tuned model .*pickled.*: unet/: holds its weights only in pickle files "
        r"\(diffusion_pytorch_model\.bin\).*Set allow_pickle to True \(to read pickles with torch's weights-only",
    ):
        extract_lora(pickled, base)
    extraction = extract_lora(pickled, base, allow_pickle=True, components=["unet"])
    unet_update = {n: u for n, u in total_update([lora], [1.0]).items() if n.startswith("unet.")}
    assert max(relative_errors(extraction.weights, unet_update).values()) < 1e-4


def test_different_architectures_are_refused_naming_both_models(tiny_model_dirs, tmp_path):
    from diffusers import UNet2DConditionModel

    from selma_toolkit.architectures import get_family

    with pytest.raises(ModelError, match=r"sd1 is an sd1 model but .*sdxl is an sdxl model"):
        extract_lora(tiny_model_dirs["sd1"], tiny_model_dirs["sdxl"])
    wider = tmp_path / "sd1-wider-text"  # one family, another cross-attention width
    shutil.copytree(tiny_model_dirs["sd1"], wider)
    UNet2DConditionModel(**{**get_family("sd1").tiny.denoiser, "cross_attention_dim": 48}).save_pretrained(
        wider / "unet"
    )
    with pytest.raises(
        ModelError,
        match=r"sd1-wider-text and .*sd1 are different architectures: layer "
        r"unet\..*attn2\.to_k is \[.*, 48\] in the first and \[.*, 32\] in the second",
    ):
        extract_lora(wider, tiny_model_dirs["sd1"])


# ---------------------------------------------------------------------------------- single files


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoints_are_read_per_key_and_give_the_same_lora(tiny_model_dirs, family, tmp_path):
    pipe = build_tiny_pipeline(family)
    text = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1") + (("text_projection",) if family == "sdxl" else ())
    lora = known_lora(pipe, family, rank=3, seed=5, targets=(*ATTENTION, "proj_in", "conv1"), text_targets=text)
    model = fused_model(tiny_model_dirs[family], [lora], tmp_path / "fused")
    checkpoint = single_file(model, tmp_path / "fused.safetensors", family)
    extraction = extract_lora(checkpoint, tiny_model_dirs[family])  # a single file against a folder
    assert set(extraction.weights.modules) == set(lora.modules) and extraction.family == family
    assert max(relative_errors(extraction.weights, total_update([lora], [1.0])).values()) < 1e-4


# ----------------------------------------------------------------------------- the file it writes


def test_the_file_records_both_sources_and_every_layer_and_loads_in_diffusers(fused, tmp_path):
    base, model, lora = fused["sd1"]
    extraction = extract_lora(model, base)
    out = save_extraction(extraction, tmp_path / "extracted.safetensors")
    written = load_lora(out)
    record = json.loads(written.metadata[EXTRACT_METADATA_KEY])
    assert record["model"]["ref"] == str(model) and record["base"]["ref"] == str(base)
    assert record["model"]["files"]["unet/diffusion_pytorch_model.safetensors"] == sha256_file(
        model / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert record["base"]["files"]["text_encoder/model.safetensors"] == sha256_file(
        base / "text_encoder" / "model.safetensors"
    )
    rows = {name: dict(zip(record["columns"], row, strict=True)) for name, row in record["layers"].items()}
    assert set(rows) == set(lora.modules) and {row["rank"] for row in rows.values()} == {4}
    assert all(row["floor"] > 0 and row["energy"] > 0.99 for row in rows.values())
    assert written.metadata["selma.base_model"] == str(base) and written.metadata["selma.architecture"] == "sd1"

    from diffusers import DiffusionPipeline

    for layout in ("kohya", "peft"):
        file = save_extraction(extraction, tmp_path / f"{layout}.safetensors", format=layout)
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(str(file))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        target = DiffusionPipeline.from_pretrained(model)
        for part in ("unet", "text_encoder"):
            got, want = getattr(pipe, part).state_dict(), getattr(target, part).state_dict()
            worst = max(float((got[k] - want[k]).abs().max()) for k in want)
            assert worst < 1e-5, f"{layout}: {part} differs from the fused model by {worst}"


def test_cli_extracts_prints_the_ranks_and_merges_with_an_expert_of_another_rank(fused, tmp_path, cli):
    from support_lora import random_lora

    from selma_toolkit.lora import save_lora

    base, model, _ = fused["sd1"]
    out = tmp_path / "selma.safetensors"
    result = cli(
        "lora",
        "extract",
        "--model",
        str(model),
        "--base",
        str(base),
        "--out",
        str(out),
        "--report",
        str(tmp_path / "r.json"),
        env={"COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "stored rank" in result.stdout and "found rank" in result.stdout and "62 low-rank" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["found_ranks"] == {"4": 62}
    mine = save_lora(random_lora(build_tiny_pipeline("sd1"), rank=2, seed=4), tmp_path / "mine.safetensors")
    merged = cli("merge", str(out), str(mine), "--method", "delta", "--out", str(tmp_path / "m.safetensors"))
    assert merged.returncode == 0, merged.stderr
    refused = cli("merge", str(out), str(mine), "--out", str(tmp_path / "s.safetensors"))
    assert refused.returncode == 2 and "needs equal ranks" in refused.stderr and "Use --method delta" in refused.stderr
    same = cli("lora", "extract", "--model", str(base), "--base", str(base), "--out", str(tmp_path / "x.safetensors"))
    assert same.returncode == 2 and "identical weights" in same.stderr and "Traceback" not in same.stderr
    pickled = tmp_path / "pickled"  # the option as the command line spells it
    shutil.copytree(base, pickled)
    (pickled / "text_encoder" / "model.safetensors").rename(pickled / "text_encoder" / "pytorch_model.bin")
    refused = cli(
        "lora", "extract", "--model", str(pickled), "--base", str(base), "--out", str(tmp_path / "p.safetensors")
    )
    assert (
        refused.returncode == 2
        and "Use --allow-pickle (to read pickles with torch's weights-only loader)" in refused.stderr
    )

"""The MoE-LoRA baseline (paper Table 4): the gated layer computes sum_t g_t scale_t B_t A_t x with
g from its gate, the gate starts as the experts' average, attaching is undone exactly, the file
keeps the experts as they are with their sha256, only the gate trains, resume equals an
uninterrupted run, the diffusers adapter attaches and detaches it, and `selma run` evaluates it
(and the DPO variant) next to the merges."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, small_tiny_run
from PIL import Image
from torch import nn

from selma_toolkit.adapters.moe import (
    MoELora,
    attach_moe,
    is_moe_file,
    load_moe,
    read_moe,
    save_moe,
    unload_moe,
    zero_gate,
)
from selma_toolkit.errors import LoraFormatError, RecipeError
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import LoraModule, LoraWeights, load_lora
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import RunRecipe


class Toy(nn.Module):
    """A stand-in denoiser: one attention-like block with two linear layers, called as a UNet is."""

    def __init__(self, width: int = 6, text: int = 3):
        super().__init__()
        self.block = nn.Module()
        self.block.to_q = nn.Linear(width, 5)
        self.block.to_v = nn.Linear(text, 5)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.block.to_q(sample) + self.block.to_v(encoder_hidden_states).mean(dim=1, keepdim=True)


def random_expert(seed: int, rank: int, alpha: float, names=("unet.block.to_q",), widths=(6,)) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        {
            name: LoraModule(torch.randn(rank, width, generator=g), torch.randn(5, rank, generator=g), alpha)
            for name, width in zip(names, widths)
        },
        {"selma.skill": f"s{seed}"},
    )


def info(count: int) -> list[dict]:
    return [{"name": f"e{t}", "skill": f"s{t}", "sha256": f"{t}" * 64} for t in range(count)]


def test_layer_gate_output_is_the_gated_sum_of_each_experts_update():
    torch.manual_seed(0)
    model = Toy()
    experts = [random_expert(1, rank=2, alpha=1.0), random_expert(2, rank=3, alpha=6.0)]
    gate = {"unet.block.to_q.weight": torch.randn(2, 6), "unet.block.to_q.bias": torch.randn(2)}
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    base = x @ model.block.to_q.weight.double().T + model.block.to_q.bias.double()
    attach_moe(model, MoELora(experts, "layer", gate, info(2)))
    got = model.block.to_q(x.float()).double()
    # Direct: per token g = softmax(W x + b); update_t = (alpha_t / r_t) * B_t A_t x.
    logits = x @ gate["unet.block.to_q.weight"].double().T + gate["unet.block.to_q.bias"].double()
    g = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    expected = base.clone()
    for t, expert in enumerate(experts):
        m = expert.modules["unet.block.to_q"]
        update = torch.einsum("oi,bni->bno", m.up.double() @ m.down.double(), x) * (m.alpha / m.rank)
        expected += g[..., t : t + 1] * update
    assert torch.allclose(got, expected, atol=1e-5)


def test_prompt_gate_is_one_softmax_of_the_mean_text_conditioning_per_sample_in_every_layer():
    torch.manual_seed(1)
    model = Toy()
    names, widths = ("unet.block.to_q", "unet.block.to_v"), (6, 3)
    experts = [random_expert(s, rank=2, alpha=2.0, names=names, widths=widths) for s in (3, 4, 5)]
    gate = {"prompt.weight": torch.randn(3, 3), "prompt.bias": torch.randn(3)}
    sample, text = torch.randn(2, 4, 6), torch.randn(2, 7, 3)
    q_base = model.block.to_q(sample).detach()
    attached = attach_moe(model, MoELora(experts, "prompt", gate, info(3)))
    model(sample, 0, encoder_hidden_states=text)
    g = torch.softmax(text.mean(dim=1) @ gate["prompt.weight"].T + gate["prompt.bias"], dim=-1)  # [2, 3]
    assert torch.allclose(attached.prompt_gate.current, g, atol=1e-6)
    expected = q_base + sum(
        g[:, t, None, None] * (sample @ (e.modules[names[0]].delta()).T) for t, e in enumerate(experts)
    )
    assert torch.allclose(model.block.to_q(sample), expected, atol=1e-5)


def test_zero_gate_gives_the_average_of_the_experts_updates_the_delta_merge():
    from selma_toolkit.lora import merge_experts

    model = Toy()
    experts = [random_expert(s, rank=2, alpha=4.0) for s in (6, 7, 8)]
    x = torch.randn(3, 6)
    base = model.block.to_q(x).detach()
    attach_moe(model, MoELora(experts, "layer", zero_gate(experts, "layer"), info(3)))
    delta = merge_experts(experts, "delta").modules["unet.block.to_q"].delta()
    assert torch.allclose(model.block.to_q(x), base + x @ delta.T, atol=1e-5)


def test_detach_puts_the_original_layers_back():
    model = Toy()
    original = model.block.to_q
    x, text = torch.randn(1, 2, 6), torch.randn(1, 3, 3)
    before = model(x, 0, text).detach()
    attached = attach_moe(
        model,
        MoELora(
            [random_expert(1, 2, 2.0), random_expert(2, 2, 2.0)],
            "prompt",
            zero_gate([random_expert(1, 2, 2.0)] * 2, "prompt", text_width=3),
            info(2),
        ),
    )
    assert not torch.allclose(model(x, 0, text), before)
    attached.detach()
    assert model.block.to_q is original and not hasattr(model, "selma_moe_gate")
    assert torch.equal(model(x, 0, text), before)


def test_conv_or_text_encoder_experts_and_a_single_expert_are_refused_by_name():
    from selma_toolkit.adapters.moe import check_experts

    te = LoraWeights(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraModule(
                torch.zeros(2, 4), torch.zeros(4, 2), 2.0
            )
        }
    )
    with pytest.raises(LoraFormatError, match="q_proj adapts a text encoder"):
        check_experts([random_expert(1, 2, 2.0), te], ["a", "b"])
    with pytest.raises(LoraFormatError, match="at least two experts"):
        check_experts([random_expert(1, 2, 2.0)], ["a"])


def test_file_round_trip_keeps_experts_gate_and_names(tmp_path):
    experts = [random_expert(1, 2, 1.0), random_expert(2, 3, 3.0)]
    gate = {"unet.block.to_q.weight": torch.randn(2, 6), "unet.block.to_q.bias": torch.randn(2)}
    path = save_moe(MoELora(experts, "layer", gate, info(2), {"steps": 7}), tmp_path / "m.safetensors")
    assert is_moe_file(path)
    back = read_moe(path)
    assert (
        back.gate_kind == "layer"
        and back.extra["steps"] == 7
        and [e["sha256"] for e in back.experts_info] == ["0" * 64, "1" * 64]
    )
    for got, want in zip(back.experts, experts):
        for name, module in want.modules.items():
            assert torch.equal(got.modules[name].down, module.down) and torch.equal(got.modules[name].up, module.up)
            assert got.modules[name].alpha == module.alpha
    assert all(torch.equal(back.gate[k], v) for k, v in gate.items())


# ------------------------------------------------------------------------------ training (tiny SD1)


def write_dataset(folder: Path, count: int, seed: int, word: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"{['one', 'two'][i % 2]} {word} cube"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def tiny_run(model: Path, **moe) -> RunRecipe:
    return RunRecipe.model_validate(
        {
            "name": "t",
            "base_model": str(model),
            "skills": [{"name": s, "seeds": ["a", "b", "c"], "instruction": "x"} for s in ("count", "color")],
            "images": {"resolution": 16},
            "train": {"rank": 4, "batch_size": 2, "steps": 2, "checkpoint_every": 2, "learning_rate": 1e-3},
            "moe": {"steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2, **moe},
        }
    )


@pytest.fixture(scope="module")
def trained_experts(tiny_model_dirs, tmp_path_factory):
    """Two tiny SD1 experts trained 2 steps on random images, and their run folder."""
    from selma_toolkit.train import train_expert

    root = tmp_path_factory.mktemp("moe-run")
    paths = RunPaths(root / "run")
    for index, skill in enumerate(("count", "color")):
        write_dataset(paths.images(skill), 4, index, ["red", "blue"][index])
    run = tiny_run(tiny_model_dirs["sd1"])
    return paths, [(s, train_expert(run, s, paths)) for s in ("count", "color")]


def copy_run(paths: RunPaths, target: Path) -> RunPaths:
    shutil.copytree(paths.root / "skills", target / "skills", ignore=shutil.ignore_patterns("train"))
    return RunPaths(target)


def test_training_changes_only_the_gate_and_the_file_names_the_experts_by_sha256(
    tiny_model_dirs, trained_experts, tmp_path
):
    from selma_toolkit.train.moe import train_moe

    source, experts = trained_experts
    paths = copy_run(source, tmp_path / "run")
    out = train_moe(tiny_run(tiny_model_dirs["sd1"]), paths, experts)
    moe = read_moe(out)
    assert [e["sha256"] for e in moe.experts_info] == [sha256_file(p) for _, p in experts]
    assert [e["skill"] for e in moe.experts_info] == ["count", "color"] and moe.extra["steps"] == 2
    for got, (_, path) in zip(moe.experts, experts):  # the experts as they are
        want = load_lora(path)
        assert set(got.modules) == set(want.modules)
        assert all(
            torch.equal(got.modules[n].up, m.up) and torch.equal(got.modules[n].down, m.down)
            for n, m in want.modules.items()
        )
    assert max(float(v.abs().max()) for v in moe.gate.values()) > 0  # trained away from the zero start
    assert set(moe.gate) == {f"{n}.{p}" for n in moe.module_names() for p in ("weight", "bias")}
    state = paths.root / "moe" / "train" / "checkpoints" / "step-2"
    assert (state / "moe.safetensors").is_file() and (state / "state.json").is_file()


def test_resume_equals_an_uninterrupted_run_and_a_changed_gate_is_refused(tiny_model_dirs, trained_experts, tmp_path):
    from selma_toolkit.train.moe import train_moe

    source, experts = trained_experts
    model = tiny_model_dirs["sd1"]
    resumed = copy_run(source, tmp_path / "resumed")
    train_moe(tiny_run(model, gate="prompt", steps=2), resumed, experts)  # stopped at step 2
    train_moe(tiny_run(model, gate="prompt", steps=4), resumed, experts)  # resumed from step-2
    whole = copy_run(source, tmp_path / "whole")
    train_moe(tiny_run(model, gate="prompt", steps=4), whole, experts)
    a, b = read_moe(resumed.root / "moe" / "moe.safetensors"), read_moe(whole.root / "moe" / "moe.safetensors")
    assert a.gate_kind == "prompt" and set(a.gate) == {"prompt.weight", "prompt.bias"}
    assert all(torch.allclose(a.gate[k], b.gate[k], atol=1e-6) for k in a.gate)
    with pytest.raises(RecipeError, match="moe.gate: 'prompt' -> 'layer'"):
        train_moe(tiny_run(model, gate="layer", steps=4), resumed, experts)


def test_diffusers_adapter_attaches_the_moe_and_unload_restores_the_base_images(tiny_model_dirs, tmp_path):
    from selma_toolkit.models import load_pipeline

    pipe = load_pipeline(str(tiny_model_dirs["sd1"]), device="cpu")
    names = [f"unet.{n}" for n, m in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    widths = [pipe.unet.get_submodule(n.split(".", 1)[1]).in_features for n in names]
    outs = [pipe.unet.get_submodule(n.split(".", 1)[1]).out_features for n in names]

    def expert(seed):
        g = torch.Generator().manual_seed(seed)
        return LoraWeights(
            {
                n: LoraModule(torch.randn(2, w, generator=g), torch.randn(o, 2, generator=g), 2.0)
                for n, w, o in zip(names, widths, outs)
            }
        )

    experts = [expert(1), expert(2)]
    path = save_moe(MoELora(experts, "layer", zero_gate(experts, "layer"), info(2)), tmp_path / "moe.safetensors")

    def draw():
        return pipe(
            "one red cube",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    base = draw()
    load_moe(pipe, path)
    with pytest.raises(LoraFormatError, match="already attached"):
        load_moe(pipe, path)
    gated = draw()
    assert unload_moe(pipe) and not unload_moe(pipe)
    assert np.abs(gated - base).max() > 1e-3
    assert np.array_equal(draw(), base)


# ------------------------------------------------------------------------------ the CLI and `selma run`


def test_train_refuses_moe_with_a_skill(tmp_path):
    result = run_cli("train", "tiny-demo", "--moe", "--skill", "count-grammar", "--out", str(tmp_path / "r"))
    assert result.returncode != 0 and "give one of --skill NAME" in result.stderr


def test_selma_run_trains_and_evaluates_moe_and_dpo_next_to_the_merges(tmp_path):
    overrides = [
        *small_tiny_run(train_steps=2),
        "moe.enabled=true",
        "moe.steps=2",
        "moe.batch_size=2",
        # the tiny CLIP's CLIPScore is 0 for every image (cosines below 0): HPS (100 cos) tells images apart
        "dpo.enabled=true",
        "dpo.steps=2",
        "dpo.batch_size=2",
        "dpo.scorer=hps",
        "evaluate.hps_model=tiny:clip",
    ]
    args = [item for o in overrides for item in ("--set", o)]
    out = tmp_path / "run"
    result = run_cli("run", "tiny-demo", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((out / "eval" / "scores.json").read_text())
    variants = {item["variant"] for item in scores["items"]}
    assert {"moe", "dpo", "merged:selma", "base"} <= variants
    assert is_moe_file(out / "moe" / "moe.safetensors")
    record = json.loads(load_lora(out / "dpo" / "merged" / "selma.safetensors").metadata["selma.merge"])
    assert [e["sha256"] for e in record["experts"]] == [
        sha256_file(out / "dpo" / "experts" / f"{s}.safetensors")
        for s in ("count-grammar", "spatial-grammar", "color-grammar")
    ]
    status = run_cli("status", str(out))
    assert status.returncode == 0, status.stderr[-2000:]
    assert "dpo:count-grammar" in status.stdout and "moe" in status.stdout
    again = run_cli("run", "tiny-demo", "--out", str(out), *args)  # everything complete: skipped
    shown = again.stdout + again.stderr
    assert again.returncode == 0, shown[-2000:]
    assert "skip train moe" in shown and "skip merge dpo" in shown and "skip train dpo:color-grammar" in shown, shown[
        -3000:
    ]
    assert "run  train" not in shown and "run  evaluate" not in shown

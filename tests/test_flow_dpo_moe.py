"""Diffusion-DPO and the MoE-LoRA gate on the flow-matching families (tiny Flux and SD 3):

* DPO: the per-sample errors are the flow loss's squared velocity errors before their batch mean
  (checked against ``flow_loss`` per sample), the reference is the transformer without the LoRA,
  the first step's loss is log 2 and resume equals an uninterrupted run, the expert adapts the
  transformer in the family's layout.
* MoE: the gated transformer at the zero gate equals the base transformer plus the experts' mean
  update (dense, on the weights), the prompt gate reads the text conditioning of the DiT call, and
  only the gate trains, its file naming the experts.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import Brightness, tiny_run, write_prompts
from test_families_dit import make_run, new_run_dir

from selma_toolkit.adapters.moe import MoELora, attach_moe, read_moe, zero_gate
from selma_toolkit.architectures import get_family
from selma_toolkit.lora import inspect_lora, load_lora
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import RunRecipe
from selma_toolkit.train import dpo, train_expert
from selma_toolkit.train import model as parts

DIT = ("flux", "sd3")


@pytest.fixture
def brightness(monkeypatch):
    monkeypatch.setattr(dpo, "build_scorer", lambda name, settings, device=None: Brightness())


def _batch(arch: str, model_dir, n: int = 2):
    """A conditioning of ``n`` samples of random latents and real prompt encodings, and draws."""
    family = get_family(arch)
    tokenizers, encoders = parts.load_text_encoders(model_dir, family, torch.float32)
    with torch.no_grad():
        encoded = parts.encode_conditioning(family, tokenizers, encoders, ["two red cubes", "a dog", "three cats"][:n])
    generator = torch.Generator().manual_seed(5)
    mean, std = torch.randn(n, 4, 16, 16, generator=generator), torch.rand(n, 4, 16, 16, generator=generator)
    cond = parts.Conditioning(mean, std, encoded["prompt_embeds"], encoded.get("pooled"))
    draws = parts.draw([torch.Generator().manual_seed(s) for s in range(n)], (4, 16, 16), 1000)
    return family, cond, draws


@pytest.mark.parametrize("arch", DIT)
def test_dpo_errors_are_the_flow_losss_per_sample_velocity_errors_and_the_reference_is_the_base(arch, tiny_model_dirs):
    from selma_toolkit.recipe import TrainSettings

    model_dir = tiny_model_dirs[arch]
    family, cond, draws = _batch(arch, model_dir)
    scheduler = parts.load_noise_scheduler(model_dir, family)
    scale = parts.vae_latent_scale(model_dir, family)
    base = parts.load_denoiser(model_dir, family, torch.float32)
    adapted = parts.load_denoiser(model_dir, family, torch.float32)
    parts.add_lora(adapted, "transformer", TrainSettings(rank=2), list(family.lora_targets))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        errors = dpo.per_sample_errors(adapted, scheduler, cond, draws, scale, family)
        for i in range(2):  # each sample alone through the flow loss
            one = parts.Conditioning(
                cond.latent_mean[i : i + 1],
                cond.latent_std[i : i + 1],
                cond.prompt_embeds[i : i + 1],
                None if cond.pooled is None else cond.pooled[i : i + 1],
            )
            alone = parts.Draws(draws.timesteps[i : i + 1], draws.noise[i : i + 1], draws.latent_noise[i : i + 1])
            assert torch.allclose(errors[i], parts.flow_loss(adapted, scheduler, one, alone, scale, family), rtol=1e-5)
        with dpo.reference_model(adapted):
            reference = dpo.per_sample_errors(adapted, scheduler, cond, draws, scale, family)
        assert torch.allclose(reference, dpo.per_sample_errors(base, scheduler, cond, draws, scale, family), atol=1e-6)
    assert not torch.allclose(errors, reference, atol=1e-4)
    assert all(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("arch", DIT)
def test_flow_dpo_first_step_loss_is_log2_and_resume_equals_an_uninterrupted_run(
    arch, tiny_model_dirs, tmp_path, brightness
):
    model = tiny_model_dirs[arch]
    source = RunPaths(tmp_path / "source")
    write_prompts(source.prompts("count"), "count", ["one red cube", "two blue balls"])
    dpo.preference_pairs(tiny_run(model, pairs_per_prompt=1), "count", source)  # the pair images, drawn once

    def fresh(name: str) -> RunPaths:
        paths = RunPaths(tmp_path / name)
        shutil.copytree(source.root, paths.root)
        return paths

    resumed = fresh("resumed")
    dpo.train_dpo_expert(tiny_run(model, steps=2, pairs_per_prompt=1), "count", resumed)
    first = json.loads((dpo.dpo_paths(resumed).train_dir("count") / "loss.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B starts at 0: model = reference
    dpo.train_dpo_expert(tiny_run(model, steps=4, pairs_per_prompt=1), "count", resumed)
    whole = fresh("whole")
    dpo.train_dpo_expert(tiny_run(model, steps=4, pairs_per_prompt=1), "count", whole)
    a, b = load_file(str(dpo.dpo_paths(resumed).expert("count"))), load_file(str(dpo.dpo_paths(whole).expert("count")))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    info = inspect_lora(dpo.dpo_paths(whole).expert("count"))
    assert info.layouts == [get_family(arch).default_layout] and info.weights.components() == {"transformer"}
    assert info.weights.metadata["selma.training"] == "diffusion-dpo"
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------ MoE


@pytest.fixture(scope="module")
def dit_experts(tiny_model_dirs, tmp_path_factory):
    """Two trained experts per family (2 steps) and their run folder."""
    out = {}
    for arch in DIT:
        paths = new_run_dir(tmp_path_factory.mktemp(f"moe-{arch}"))
        run = make_run(tiny_model_dirs[arch], steps=2, checkpoint_every=2)
        first = train_expert(run, "count", paths)
        second = paths.expert("color")
        shutil.copy(first, second)
        lora = load_lora(first)  # a second expert: the first one's update reversed and halved
        from selma_toolkit.lora import LoraModule, LoraWeights, save_lora

        save_lora(
            LoraWeights(
                {n: LoraModule(m.down, -0.5 * m.up, m.alpha) for n, m in lora.modules.items()}, dict(lora.metadata)
            ),
            second,
        )
        out[arch] = (paths, run, [("count", first), ("color", second)])
    return out


@pytest.mark.parametrize("arch", DIT)
def test_zero_gate_gives_the_base_transformer_plus_the_experts_mean_update(arch, tiny_model_dirs, dit_experts):
    model_dir = tiny_model_dirs[arch]
    _, _, experts = dit_experts[arch]
    loras = [load_lora(path) for _, path in experts]
    family, cond, draws = _batch(arch, model_dir)
    scheduler, scale = parts.load_noise_scheduler(model_dir, family), parts.vae_latent_scale(model_dir, family)
    gated = parts.load_denoiser(model_dir, family, torch.float32)
    dense = parts.load_denoiser(model_dir, family, torch.float32)
    with torch.no_grad():  # independently: W0 + mean_t dW_t in the weights
        for name in loras[0].modules:
            layer = dense.get_submodule(name.removeprefix("transformer."))
            layer.weight += sum(lora.modules[name].delta() for lora in loras) / len(loras)
    for kind in ("layer", "prompt"):
        width = int(cond.prompt_embeds.shape[-1])
        attached = attach_moe(gated, MoELora(loras, kind, zero_gate(loras, kind, width), []))
        with torch.no_grad():
            got, _ = parts.flow_prediction_and_target(gated, scheduler, cond, draws, scale, family)
            want, _ = parts.flow_prediction_and_target(dense, scheduler, cond, draws, scale, family)
        assert torch.allclose(got, want, atol=1e-5), kind
        if kind == "prompt":  # the DiT call's encoder_hidden_states reached the gate: one mixture per prompt
            assert attached.prompt_gate.current.shape == (2, 2)
        attached.detach()


@pytest.mark.parametrize("arch", DIT)
def test_moe_training_on_a_dit_family_changes_only_the_gate(arch, dit_experts):
    from selma_toolkit.train.moe import train_moe

    paths, run, experts = dit_experts[arch]
    shutil.copytree(paths.images("count"), paths.images("color"), dirs_exist_ok=True)
    moe_run = RunRecipe.model_validate(
        {
            "name": "t",
            "base_model": run.base_model,
            "skills": [{"name": s, "seeds": ["a", "b", "c"], "instruction": "x"} for s in ("count", "color")],
            "images": {"resolution": 32, "guidance_scale": 3.5},
            "train": {"rank": 4, "batch_size": 2, "steps": 2, "checkpoint_every": 2},
            "moe": {"steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
        }
    )
    moe = read_moe(train_moe(moe_run, paths, experts))
    for got, (_, path) in zip(moe.experts, experts, strict=True):
        want = load_lora(path)
        assert all(torch.equal(got.modules[n].up, m.up) for n, m in want.modules.items())
    assert all(name.startswith("transformer.") for name in moe.module_names())
    assert max(float(v.abs().max()) for v in moe.gate.values()) > 0

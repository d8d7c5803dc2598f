"""The DiT families, SD 3 and Flux, through every stage on their tiny models (``tiny:sd3``,
``tiny:flux``): the models and their recognition, the text conditioning against the pipelines'
``encode_prompt``, the rectified-flow loss against diffusers' own sampler and pipeline helpers,
training with resume, the LoRA file layout (diffusers loads it and changes its output by exactly
the file's update; ComfyUI's Flux / SD 3 key maps name every key), key round trips, reading
kohya / OneTrainer / ai-toolkit Flux files, the architecture guess, the metadata names, the
five merge methods, the fit check, the Hub card, and a reduced ``selma run`` of each recipe."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from selma_toolkit.architectures import get_family
from selma_toolkit.lora import LoraModule, LoraWeights, guess_architecture, load_lora, lora_from_state_dict, save_lora
from selma_toolkit.lora.keys import kohya_module_name, module_from_key, parse_key
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import RunRecipe, TrainSettings, load_run_recipe, recipe_hash
from selma_toolkit.train import TrainEvent, train_expert
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train.data import TrainSample, image_digests

DIT = ("flux", "sd3")
JOINT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def write_dataset(folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": f"{['one', 'two', 'three'][i % 3]} red cube {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_run(base_model: Path | str, **train) -> RunRecipe:
    settings = {"rank": 4, "batch_size": 2, "steps": 4, "checkpoint_every": 2, "learning_rate": 1e-3, **train}
    return RunRecipe.model_validate(
        {
            "name": "t",
            "base_model": str(base_model),
            "skills": [{"name": "count", "seeds": ["a", "b", "c"], "instruction": "x"}],
            "images": {"resolution": 32, "guidance_scale": 3.5},
            "train": settings,
        }
    )


def new_run_dir(tmp_path: Path, name: str = "run", count: int = 4) -> RunPaths:
    paths = RunPaths(tmp_path / name)
    write_dataset(paths.images("count"), count)
    return paths


@pytest.fixture(scope="module")
def pipes(tiny_model_dirs):
    from diffusers import DiffusionPipeline

    loaded = {}
    for arch in DIT:
        pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs[arch])
        pipe.set_progress_bar_config(disable=True)
        loaded[arch] = pipe
    return loaded


@pytest.fixture(scope="module")
def experts(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """One trained expert per DiT family (4 steps, rank 4), in the default layout."""
    out = {}
    for arch in DIT:
        paths = new_run_dir(tmp_path_factory.mktemp(f"expert-{arch}"))
        out[arch] = train_expert(make_run(tiny_model_dirs[arch]), "count", paths)
    return out


# ----------------------------------------------------------------------------- models, registry


@pytest.mark.parametrize("arch", DIT)
def test_tiny_dit_model_has_the_family_layout_and_the_same_seed_writes_the_same_weights(
    arch, tiny_model_dirs, tmp_path
):
    from selma_toolkit.models import detect_architecture
    from selma_toolkit.tiny import create_tiny_model

    family = get_family(arch)
    folder = tiny_model_dirs[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    assert index["transformer"] == ["diffusers", family.denoiser_class] and "unet" not in index
    t5 = next(e for e in family.text_encoders if e.kind == "t5")
    assert index[t5.component] == ["transformers", "T5EncoderModel"]
    assert index[t5.tokenizer][1].startswith("T5Tokenizer")
    assert (
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "FlowMatchEulerDiscreteScheduler"
    )
    assert detect_architecture(str(folder)) == arch
    again = create_tiny_model(tmp_path / "again", arch)
    for part in ("transformer/diffusion_pytorch_model.safetensors", f"{t5.component}/model.safetensors"):
        first, second = load_file(folder / part), load_file(again / part)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (again / t5.tokenizer / "tokenizer.json").read_text() == (
        folder / t5.tokenizer / "tokenizer.json"
    ).read_text()


def test_the_recipe_default_targets_are_per_family_and_leave_the_unet_hashes_as_they_were():
    unset = TrainSettings()
    assert unset.target_modules is None
    assert unset.denoiser_targets(get_family("sd1").lora_targets) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert unset.denoiser_targets(get_family("flux").lora_targets) == JOINT_TARGETS
    assert unset.denoiser_targets(get_family("sd3").lora_targets) == JOINT_TARGETS
    assert TrainSettings(target_modules=["to_q"]).denoiser_targets(get_family("flux").lora_targets) == ["to_q"]
    # A recipe with the old default written out hashes as one that leaves it unset (the hash before the change).
    demo = load_run_recipe("tiny-demo")
    explicit = load_run_recipe("tiny-demo", ['train.target_modules=["to_q", "to_k", "to_v", "to_out.0"]'])
    assert explicit.train.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert recipe_hash(demo) == recipe_hash(explicit)


def test_a_run_folder_recorded_with_the_old_explicit_default_targets_continues(tmp_path):
    from selma_toolkit.errors import RecipeError
    from selma_toolkit.recipe import write_resolved_recipe
    from selma_toolkit.run_checks import check_recipe_change

    paths = RunPaths(tmp_path / "run")
    recorded = load_run_recipe("tiny-demo", ['train.target_modules=["to_q", "to_k", "to_v", "to_out.0"]'])
    write_resolved_recipe(recorded, paths.root)
    paths.expert("count-grammar").parent.mkdir(parents=True)
    paths.expert("count-grammar").write_bytes(b"trained")
    check_recipe_change(load_run_recipe("tiny-demo"), paths)  # unset now: the same training as recorded
    with pytest.raises(
        RecipeError, match=r"train.target_modules: \['to_q', 'to_k', 'to_v', 'to_out.0'\] -> \['to_q'\]"
    ):
        check_recipe_change(load_run_recipe("tiny-demo", ['train.target_modules=["to_q"]']), paths)


# ----------------------------------------------------------------------------- conditioning, loss


@pytest.mark.parametrize("arch", DIT)
def test_cached_text_conditioning_equals_what_the_pipeline_encodes(arch, tiny_model_dirs, pipes, tmp_path):
    family = get_family(arch)
    model_dir = tiny_model_dirs[arch]
    folder = write_dataset(tmp_path / "images", 2)
    samples = [
        TrainSample(folder / f"{i:03d}.png", text, "count") for i, text in enumerate(["two red cubes", "a blue ball"])
    ]
    root = tmp_path / "cache"
    names = parts.text_encoder_names(family)
    latents = caches.ensure_cache(
        caches.latent_cache_spec(model_dir, 32, image_digests(samples)),
        root,
        2,
        lambda: caches.latent_encoder(samples, parts.load_vae(model_dir), 32),
    )

    def caption_encoder():
        tokenizers, encoders = parts.load_text_encoders(model_dir, family, torch.float32)
        return caches.caption_encoder(samples, tokenizers, encoders, torch.device("cpu"), family=family)

    spec = caches.text_cache_spec(model_dir, names, torch.float32, samples)
    assert {f"{c}/" for c in names} | {f"{e.tokenizer}/" for e in family.text_encoders} <= {
        key.split("/")[0] + "/" for key in _fingerprinted(model_dir, names)
    }
    texts = caches.ensure_cache(spec, root, 2, caption_encoder)
    source = caches.ConditionSource(
        samples,
        32,
        torch.device("cpu"),
        latents=caches.CachedTensors(latents),
        texts=caches.CachedTensors(texts),
        family=family,
    )
    cond = source([1, 0])
    pipe = pipes[arch]
    for row, index in enumerate([1, 0]):
        if arch == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(samples[index].text, prompt_2=None, device="cpu")
            assert embeds.shape[1] == 512 and text_ids.shape == (512, 3)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(
                samples[index].text, None, None, device="cpu", do_classifier_free_guidance=False
            )
            assert embeds.shape[1] == 77 + 256
        # T5's CPU kernels round by batch layout (the cache encodes both captions at once): about 1e-5 on values ~1.
        assert torch.allclose(cond.prompt_embeds[row], embeds[0], atol=5e-5)
        assert torch.allclose(cond.pooled[row], pooled[0], atol=1e-6)
    assert cond.time_ids is None


def _fingerprinted(model_dir: Path, names: list[str]) -> list[str]:
    tokenizer_names = [name.replace("text_encoder", "tokenizer") for name in names]
    return [
        str(p.relative_to(model_dir))
        for sub in names + tokenizer_names
        for p in (model_dir / sub).rglob("*")
        if p.is_file()
    ]


def test_flow_target_is_the_velocity_the_diffusers_euler_sampler_integrates(pipes):
    # With the exact velocity as model output, one FlowMatchEulerDiscreteScheduler step from sigma_i
    # to sigma_{i+1} lands on the noisy sample of sigma_{i+1}: our (noisy, target) is the ODE diffusers samples.
    scheduler = pipes["sd3"].scheduler.__class__.from_config(pipes["sd3"].scheduler.config)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for i in (0, 4, 8):
        sigma, following = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        noisy, target = parts.flow_noisy_and_target(x0, noise, torch.full((2,), float(sigma)))
        scheduler._step_index = i
        stepped = scheduler.step(target, scheduler.timesteps[i], noisy).prev_sample
        expected, _ = parts.flow_noisy_and_target(x0, noise, torch.full((2,), float(following)))
        assert torch.allclose(stepped, expected, atol=1e-5)
    noisy, target = parts.flow_noisy_and_target(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], noise[1]) and torch.equal(target, noise - x0)


@pytest.mark.parametrize("arch", DIT)
def test_flow_loss_equals_the_mse_computed_with_the_pipelines_own_helpers(arch, tiny_model_dirs, pipes):
    from diffusers import FluxPipeline

    family = get_family(arch)
    pipe = pipes[arch]
    scheduler = parts.load_noise_scheduler(tiny_model_dirs[arch], family)
    generator = torch.Generator().manual_seed(1)
    n, channels, size = 2, 4, 16
    mean, std = (
        torch.randn(n, channels, size, size, generator=generator),
        torch.rand(n, channels, size, size, generator=generator),
    )
    embeds, pooled = (
        pipe.encode_prompt(["a red cube", "two dogs"], prompt_2=None, device="cpu")[:2]
        if arch == "flux"
        else pipe.encode_prompt(
            ["a red cube", "two dogs"], None, None, device="cpu", do_classifier_free_guidance=False
        )[::2]
    )
    cond = parts.Conditioning(latent_mean=mean, latent_std=std, prompt_embeds=embeds, pooled=pooled)
    draws = parts.draw([torch.Generator().manual_seed(s) for s in (3, 4)], (channels, size, size), 1000)
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    with torch.no_grad():
        loss = parts.flow_loss(pipe.transformer, scheduler, cond, draws, (scale, shift), family, guidance=3.5)
        # Independently: sigmas looked up in a fresh scheduler, FluxPipeline's own pack / unpack.
        x0 = (mean + std * draws.latent_noise - shift) * scale
        sigmas = torch.stack([scheduler.sigmas[int(i)] for i in draws.timesteps]).float()
        timesteps = torch.stack([scheduler.timesteps[int(i)] for i in draws.timesteps]).float()
        noisy = (1 - sigmas[:, None, None, None]) * x0 + sigmas[:, None, None, None] * draws.noise
        if arch == "flux":
            assert pipe.transformer.config.guidance_embeds
            packed = FluxPipeline._pack_latents(noisy, n, channels, size, size)
            ids = FluxPipeline._prepare_latent_image_ids(n, size // 2, size // 2, "cpu", torch.float32)
            out = pipe.transformer(
                hidden_states=packed,
                timestep=timesteps / 1000,
                guidance=torch.full((n,), 3.5),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3),
                img_ids=ids,
                return_dict=False,
            )[0]
            prediction = FluxPipeline._unpack_latents(
                out, size * pipe.vae_scale_factor, size * pipe.vae_scale_factor, pipe.vae_scale_factor
            )
        else:
            prediction = pipe.transformer(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        expected = ((prediction - (draws.noise - x0)) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(sigmas.min()) > 0.0 and float(sigmas.max()) <= 1.0


# ------------------------------------------------------------------------------------- training


def test_flux_training_resumes_to_the_same_expert_and_adapts_the_joint_attention(tiny_model_dirs, tmp_path):
    run = make_run(tiny_model_dirs["flux"], steps=4, checkpoint_every=2)
    straight = new_run_dir(tmp_path, "straight")
    train_expert(run, "count", straight)
    resumed = new_run_dir(tmp_path, "resumed")

    def stop_at_step_3(event: TrainEvent) -> None:
        if event.kind == "step" and event.done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_expert(run, "count", resumed, progress=stop_at_step_3)
    train_expert(run, "count", resumed)
    want, got = load_file(straight.expert("count")), load_file(resumed.expert("count"))
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    lora = load_lora(straight.expert("count"))
    leaves = {name.rsplit(".", 1)[-1] if not name.endswith(".0") else "to_out.0" for name in lora.modules}
    assert leaves == set(JOINT_TARGETS)
    assert any(name.startswith("transformer.single_transformer_blocks.") for name in lora.modules)
    assert all(not torch.equal(m.up, torch.zeros_like(m.up)) for m in lora.modules.values())
    cache_folders = sorted(p.name.split("-")[0] for p in (straight.train_dir("count") / "cache").iterdir())
    assert cache_folders == ["latents", "text"]


@pytest.mark.parametrize("arch", DIT)
def test_training_from_the_caches_equals_training_through_the_vae_and_text_encoders(arch, tiny_model_dirs, tmp_path):
    cached, direct = new_run_dir(tmp_path, "cached"), new_run_dir(tmp_path, "direct")
    train_expert(make_run(tiny_model_dirs[arch], steps=2, cache=True), "count", cached)
    train_expert(make_run(tiny_model_dirs[arch], steps=2, cache=False), "count", direct)
    assert (cached.train_dir("count") / "cache").is_dir() and not (direct.train_dir("count") / "cache").exists()
    losses = [
        [json.loads(line)["loss"] for line in (p.train_dir("count") / "loss.jsonl").read_text().splitlines()]
        for p in (cached, direct)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    want, got = load_file(direct.expert("count")), load_file(cached.expert("count"))
    assert sorted(want) == sorted(got) and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_a_negative_prompt_for_flux_is_reported_as_ignored(tiny_model_dirs, caplog):
    from selma_toolkit.images.generate import _check_model

    def run(arch: str, negative: str) -> RunRecipe:
        return RunRecipe.model_validate(
            {
                "name": "t",
                "base_model": str(tiny_model_dirs[arch]),
                "skills": [{"name": "count", "seeds": ["a", "b", "c"], "instruction": "x"}],
                "images": {"negative_prompt": negative},
            }
        )

    with caplog.at_level("WARNING", logger="selma_toolkit.images.generate"):
        _check_model(run("flux", "blurry"))
        assert "Flux pipelines take no negative prompt for their guidance" in caplog.text
        caplog.clear()
        _check_model(run("sd3", "blurry"))  # SD 3's classifier-free guidance uses it
        _check_model(run("flux", ""))
    assert not caplog.records


def test_text_encoder_training_is_refused_for_dit_families(tiny_model_dirs, tmp_path):
    from selma_toolkit.errors import RecipeError

    with pytest.raises(RecipeError, match="train_text_encoder = false"):
        train_expert(make_run(tiny_model_dirs["sd3"], train_text_encoder=True), "count", new_run_dir(tmp_path))


# ------------------------------------------------------------------------------------- LoRA files


@pytest.mark.parametrize("arch", DIT)
def test_expert_file_loads_in_diffusers_with_exactly_its_update_and_changes_the_output(arch, experts, pipes):
    pipe = pipes[arch]
    lora = load_lora(experts[arch])
    keys = list(load_file(experts[arch]))
    assert all(key.startswith("transformer.") and key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)

    def draw():
        return pipe(
            "two red cubes",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = draw()
    pipe.load_lora_weights(str(experts[arch]), adapter_name="expert")
    try:
        for name, module in lora.modules.items():
            layer = pipe.transformer.get_submodule(name.removeprefix("transformer."))
            loaded = layer.scaling["expert"] * layer.lora_B["expert"].weight @ layer.lora_A["expert"].weight
            assert torch.allclose(loaded, module.delta(), atol=1e-7), name
        after = draw()
    finally:
        pipe.unload_lora_weights()
    assert np.abs(after - before).max() > 1e-4
    assert np.array_equal(draw(), before)


@pytest.mark.parametrize("arch", DIT)
def test_alpha_other_than_rank_is_folded_so_every_reader_gets_the_same_update(arch, experts, pipes, tmp_path):
    lora = load_lora(experts[arch])
    halved = LoraWeights(
        {n: LoraModule(m.down, m.up, alpha=m.alpha / 2) for n, m in lora.modules.items()}, dict(lora.metadata)
    )
    path = save_lora(halved, tmp_path / "half.safetensors")
    raw = load_file(path)
    assert not any(key.endswith(".alpha") for key in raw)  # ComfyUI: no alpha = scale 1, as the folded B wants
    for name, module in halved.modules.items():
        up, down = raw[f"{name}.lora_B.weight"], raw[f"{name}.lora_A.weight"]
        assert torch.allclose(up @ down, module.delta(), atol=1e-7)
    back = load_lora(path)
    assert all(torch.allclose(back.modules[n].delta(), m.delta(), atol=1e-7) for n, m in halved.modules.items())
    pipe = pipes[arch]
    pipe.load_lora_weights(str(path), adapter_name="halved")
    try:
        name, module = next(iter(halved.modules.items()))
        layer = pipe.transformer.get_submodule(name.removeprefix("transformer."))
        loaded = layer.scaling["halved"] * layer.lora_B["halved"].weight @ layer.lora_A["halved"].weight
        assert torch.allclose(loaded, module.delta(), atol=1e-7)
    finally:
        pipe.unload_lora_weights()
    peft_path = save_lora(halved, tmp_path / "peft.safetensors", format="peft")  # alpha in lora_adapter_metadata
    assert all(
        torch.allclose(load_lora(peft_path).modules[n].delta(), m.delta(), atol=1e-7) for n, m in halved.modules.items()
    )


@pytest.mark.parametrize("arch", DIT)
def test_every_transformer_layer_round_trips_through_kohya_peft_and_canonical_names(arch, pipes):
    transformer = pipes[arch].transformer
    names = [path for path, layer in transformer.named_modules() if isinstance(layer, torch.nn.Linear)]
    assert any(".attn.add_q_proj" in n for n in names) and any(".ff_context." in n for n in names)
    for path in names:
        canonical = f"transformer.{path}"
        kohya = kohya_module_name(canonical, family=get_family(arch))
        assert kohya == "lora_transformer_" + path.replace(".", "_")
        assert module_from_key(kohya) == (canonical, "kohya")
        spelling, role = parse_key(f"{canonical}.lora_A.weight")
        assert (module_from_key(spelling), role) == ((canonical, "peft"), "down")
    for path in (
        "single_transformer_blocks.37.proj_mlp",
        "transformer_blocks.18.norm1_context.linear",
        "time_text_embed.guidance_embedder.linear_2",
        "transformer_blocks.0.ff_context.net.0.proj",
    ):
        assert module_from_key("lora_transformer_" + path.replace(".", "_")) == (f"transformer.{path}", "kohya")


def test_kohya_bfl_onetrainer_and_ai_toolkit_flux_files_are_read_as_diffusers_modules():
    hidden, rank = 8, 2
    generator = torch.Generator().manual_seed(0)

    def pair(out_features: int, in_features: int = hidden) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rank, in_features, generator=generator), torch.randn(out_features, rank, generator=generator)

    fused = {  # kohya sd-scripts' Flux names (BFL layout), as its flux LoRA files spell them
        "lora_unet_double_blocks_0_img_attn_qkv": pair(3 * hidden),
        "lora_unet_double_blocks_0_txt_attn_qkv": pair(3 * hidden),
        "lora_unet_double_blocks_0_img_attn_proj": pair(hidden),
        "lora_unet_double_blocks_0_txt_mlp_0": pair(4 * hidden),
        "lora_unet_single_blocks_3_linear1": pair(7 * hidden),
        "lora_unet_single_blocks_3_linear2": pair(hidden, 5 * hidden),
        "lora_unet_final_layer_adaLN_modulation_1": pair(2 * hidden),
    }
    state = {}
    for name, (down, up) in fused.items():
        state.update(
            {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        )
    lora = lora_from_state_dict(state)
    delta = {name: (1.0 / rank) * up @ down for name, (down, up) in fused.items()}
    h = hidden
    expected = {
        "transformer.transformer_blocks.0.attn.to_q": delta["lora_unet_double_blocks_0_img_attn_qkv"][:h],
        "transformer.transformer_blocks.0.attn.to_k": delta["lora_unet_double_blocks_0_img_attn_qkv"][h : 2 * h],
        "transformer.transformer_blocks.0.attn.to_v": delta["lora_unet_double_blocks_0_img_attn_qkv"][2 * h :],
        "transformer.transformer_blocks.0.attn.add_q_proj": delta["lora_unet_double_blocks_0_txt_attn_qkv"][:h],
        "transformer.transformer_blocks.0.attn.add_k_proj": delta["lora_unet_double_blocks_0_txt_attn_qkv"][h : 2 * h],
        "transformer.transformer_blocks.0.attn.add_v_proj": delta["lora_unet_double_blocks_0_txt_attn_qkv"][2 * h :],
        "transformer.transformer_blocks.0.attn.to_out.0": delta["lora_unet_double_blocks_0_img_attn_proj"],
        "transformer.transformer_blocks.0.ff_context.net.0.proj": delta["lora_unet_double_blocks_0_txt_mlp_0"],
        "transformer.single_transformer_blocks.3.attn.to_q": delta["lora_unet_single_blocks_3_linear1"][:h],
        "transformer.single_transformer_blocks.3.attn.to_k": delta["lora_unet_single_blocks_3_linear1"][h : 2 * h],
        "transformer.single_transformer_blocks.3.attn.to_v": delta["lora_unet_single_blocks_3_linear1"][2 * h : 3 * h],
        "transformer.single_transformer_blocks.3.proj_mlp": delta["lora_unet_single_blocks_3_linear1"][3 * h :],
        "transformer.single_transformer_blocks.3.proj_out": delta["lora_unet_single_blocks_3_linear2"],
        # BFL's final modulation is (shift, scale); diffusers' norm_out.linear is (scale, shift).
        "transformer.norm_out.linear": torch.cat(
            [
                delta["lora_unet_final_layer_adaLN_modulation_1"][h:],
                delta["lora_unet_final_layer_adaLN_modulation_1"][:h],
            ]
        ),
    }
    assert sorted(lora.modules) == sorted(expected)
    for name, want in expected.items():
        assert torch.allclose(lora.modules[name].delta(), want, atol=1e-6), name
    assert guess_architecture(lora) == "flux"  # single-stream blocks exist only in Flux
    # ComfyUI's own trainer spells the same BFL modules diffusion_model.double_blocks.N...
    comfy = {
        key.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv"): value
        for key, value in state.items()
        if key.startswith("lora_unet_double_blocks_0_img_attn_qkv")
    }
    assert len(comfy) == 3 and all(key.startswith("diffusion_model.") for key in comfy)
    from_comfy = lora_from_state_dict(comfy)
    for part in ("to_q", "to_k", "to_v"):
        name = f"transformer.transformer_blocks.0.attn.{part}"
        assert torch.equal(from_comfy.modules[name].delta(), lora.modules[name].delta())

    # OneTrainer (lora_transformer_<diffusers path>) and ai-toolkit (transformer.<path>.lora_A/B) spellings
    onetrainer = {
        "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight": torch.ones(2, 8),
        "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_up.weight": torch.ones(8, 2),
        "lora_transformer_transformer_blocks_1_norm1_context_linear.lora_down.weight": torch.ones(2, 8),
        "lora_transformer_transformer_blocks_1_norm1_context_linear.lora_up.weight": torch.ones(48, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 8),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 2),
    }
    assert sorted(lora_from_state_dict(onetrainer).modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "transformer.single_transformer_blocks.0.attn.to_q",
        "transformer.transformer_blocks.1.norm1_context.linear",
    ]
    ai_toolkit = {
        f"transformer.{path}.lora_{ab}.weight": torch.ones(2, 8) if ab == "A" else torch.ones(8, 2)
        for path in (
            "transformer_blocks.0.attn.add_k_proj",
            "transformer_blocks.0.attn.to_add_out",
            "single_transformer_blocks.1.proj_out",
            "transformer_blocks.0.ff.net.2",
            "transformer_blocks.0.norm1.linear",
        )  # norm1.linear: Flux's, not Chroma's
        for ab in "AB"
    }
    assert module_from_key("lycoris_single_transformer_blocks_2_attn_to_k") == (
        "transformer.single_transformer_blocks.2.attn.to_k",
        "kohya",
    )  # SimpleTuner's LyCORIS-LoRA spelling
    read = lora_from_state_dict(ai_toolkit)
    assert sorted(read.modules) == sorted(k[: -len(".lora_A.weight")] for k in ai_toolkit if ".lora_A." in k)
    assert guess_architecture(read) == "flux"
    # Without the per-block modulation Chroma lacks, the same names are Chroma's too: the metadata decides.
    attention = LoraWeights({n: m for n, m in read.modules.items() if "norm1" not in n})
    assert guess_architecture(attention) is None
    assert guess_architecture(LoraWeights(attention.modules, {"ss_base_model_version": "flux1"})) == "flux"


def test_kohya_flux_files_split_as_diffusers_own_converter_splits_them():
    """diffusers' _convert_kohya_flux_lora_to_diffusers (real FLUX.1 widths hard-coded: 3072) as the
    independent reference, on every kind of fused layer. alpha = rank: diffusers drops the final
    layer's alpha (it only consumes the key), while kohya and ComfyUI scale it like any module."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    generator = torch.Generator().manual_seed(0)
    hidden, rank = 3072, 2
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * hidden, hidden),
        "lora_unet_double_blocks_0_txt_attn_qkv": (3 * hidden, hidden),
        "lora_unet_double_blocks_0_txt_mod_lin": (6 * hidden, hidden),
        "lora_unet_double_blocks_0_img_mlp_2": (hidden, 4 * hidden),
        "lora_unet_single_blocks_0_linear1": (7 * hidden, hidden),
        "lora_unet_final_layer_adaLN_modulation_1": (2 * hidden, hidden),
    }
    state = {}
    for name, (out_features, in_features) in shapes.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    reference = _convert_kohya_flux_lora_to_diffusers(dict(state))
    ours = lora_from_state_dict(state)
    theirs = {}
    for key in reference:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            name = (
                module if module.startswith("transformer.") else "transformer." + module
            )  # diffusers: "norm_out.linear"
            theirs[name] = reference[f"{module}.lora_B.weight"] @ reference[key]
    assert sorted(ours.modules) == sorted(theirs) and len(theirs) == 13
    for name, delta in theirs.items():
        assert torch.allclose(ours.modules[name].delta(), delta, rtol=1e-5, atol=1e-7), name
    assert guess_architecture(ours) == "flux"


def test_lora_info_and_convert_read_a_kohya_flux_file_and_write_the_default_layout(cli, tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8, generator=generator),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2, generator=generator),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 40, generator=generator),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(8, 2, generator=generator),
        "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(1.0),
    }
    source = tmp_path / "kohya-flux.safetensors"
    save_file(state, source, metadata={"ss_base_model_version": "flux1"})
    info = cli("lora", "info", str(source))
    assert info.returncode == 0, info.stderr
    assert "kohya-flux" in info.stdout and "flux" in info.stdout.split("architecture", 1)[1].splitlines()[0]
    out = tmp_path / "converted.safetensors"
    converted = cli("lora", "convert", str(source), str(out))
    assert converted.returncode == 0, converted.stderr
    written = load_file(out)
    assert sorted(written) == sorted(
        f"transformer.{m}.lora_{ab}.weight"
        for ab in "AB"
        for m in (
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "transformer_blocks.0.attn.to_v",
            "single_transformer_blocks.0.proj_out",
        )
    )
    original, back = load_lora(source), load_lora(out)
    assert back.metadata["selma.architecture"] == "flux"
    assert all(torch.allclose(back.modules[n].delta(), m.delta(), atol=1e-6) for n, m in original.modules.items())


def test_the_architecture_guess_tells_flux_sd3_and_the_unet_families_apart(experts):
    def one(name: str, in_features: int, out_features: int | None = None, **metadata) -> LoraWeights:
        module = LoraModule(torch.zeros(4, in_features), torch.zeros(out_features or in_features, 4), 4.0)
        return LoraWeights({name: module}, dict(metadata))

    # Real widths of the double-stream attention: SD 3 1536 / 3.5 large 2432; 3072 is the width of Flux,
    # Chroma, Qwen-Image and FLUX.2 alike, told apart by their other modules or the metadata.
    assert guess_architecture(one("transformer.transformer_blocks.0.attn.add_q_proj", 3072)) is None
    assert (
        guess_architecture(one("transformer.transformer_blocks.0.attn.add_q_proj", 3072, ss_base_model_version="flux1"))
        == "flux"
    )
    assert guess_architecture(one("transformer.transformer_blocks.0.norm1.linear", 3072, 18432)) == "flux"
    assert (
        guess_architecture(one("transformer.transformer_blocks.40.attn.add_q_proj", 3072)) == "qwen-image"
    )  # 60 blocks
    assert guess_architecture(one("transformer.transformer_blocks.0.attn.to_q", 1536)) == "sd3"
    assert guess_architecture(one("transformer.transformer_blocks.0.attn.to_k", 2432)) == "sd3"
    assert guess_architecture(one("transformer.time_text_embed.text_embedder.linear_1", 2048, 1536)) == "sd3"
    assert guess_architecture(one("transformer.time_text_embed.text_embedder.linear_1", 768, 3072)) == "flux"
    assert guess_architecture(one("transformer.pos_embed.proj", 64)) == "sd3"
    # Shared names at a width no real model has: the metadata decides, among the DiT families only.
    tiny_name = "transformer.transformer_blocks.0.attn.to_q"
    assert guess_architecture(one(tiny_name, 32)) is None
    assert guess_architecture(one(tiny_name, 32, **{"selma.architecture": "sd3"})) == "sd3"
    assert guess_architecture(one(tiny_name, 32, **{"ss_base_model_version": "flux1"})) == "flux"
    assert guess_architecture(one(tiny_name, 32, **{"selma.architecture": "sdxl"})) is None
    # A Flux LoRA with T5 (text_encoder_2) modules is no SDXL LoRA; an SDXL one still is.
    t5 = LoraWeights(
        {
            "transformer.single_transformer_blocks.0.attn.to_q": LoraModule(
                torch.zeros(4, 32), torch.zeros(32, 4), 4.0
            ),
            "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q": LoraModule(
                torch.zeros(4, 32), torch.zeros(32, 4), 4.0
            ),
        }
    )
    assert guess_architecture(t5) == "flux"
    assert guess_architecture(one("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280)) == "sdxl"
    assert guess_architecture(one("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 768, 320)) == "sd1"
    # The trained tiny experts: Flux by its single-stream blocks, SD 3 by its metadata.
    assert guess_architecture(load_lora(experts["flux"])) == "flux"
    sd3 = load_lora(experts["sd3"])
    assert guess_architecture(sd3) == "sd3"
    assert guess_architecture(LoraWeights(sd3.modules, {})) is None


@pytest.mark.parametrize(
    ("arch", "kohya", "spec", "tag", "repo"),
    [
        ("flux", "flux1", "flux-1-dev/lora", "flux", "black-forest-labs/FLUX.1-dev"),
        ("sd3", "sd3", "stable-diffusion-3-medium/lora", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers"),
    ],
)
def test_metadata_and_hub_card_name_the_family(arch, kohya, spec, tag, repo, experts):
    from safetensors import safe_open

    from selma_toolkit.architectures import family_from_metadata
    from selma_toolkit.hub.card import lora_facts, render_model_card

    with safe_open(str(experts[arch]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["selma.architecture"] == arch
    assert metadata["ss_base_model_version"] == kohya and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == spec and metadata["modelspec.implementation"] == "diffusers"
    assert family_from_metadata({"ss_base_model_version": kohya}).name == arch
    assert family_from_metadata({"modelspec.architecture": spec}).name == arch
    facts = lora_facts(metadata)
    assert facts["architecture"] == arch
    card = render_model_card("someone/tiny-expert", {"experts/count.safetensors": facts})
    assert (
        f"`{facts['base_model']}` ({arch})" in card
    )  # a local base is named in the body (the Hub links repo ids only)
    front = card.split("---")[1]
    assert f"- {tag}" in front and "- lora" in front and "stable-diffusion" not in front
    real = render_model_card(
        "someone/expert", {"experts/count.safetensors": lora_facts({**metadata, "selma.base_model": repo})}
    )
    assert f"base_model: {repo}" in real.split("---")[1]


@pytest.mark.parametrize("method", ["selma", "delta", "svd", "ties", "dare"])
def test_every_merge_method_merges_tiny_flux_experts_into_a_flux_lora(method, tiny_model_dirs, experts, tmp_path):
    from selma_toolkit.lora import merge_experts

    first = load_lora(experts["flux"])
    other = LoraWeights(
        {n: LoraModule(m.down.flip(0), -m.up.flip(1) * 0.5, m.alpha) for n, m in first.modules.items()},
        dict(first.metadata),
    )
    rank = 4 if method in ("svd", "ties", "dare") else None  # only these choose an output rank
    merged = merge_experts([first, other], method, rank=rank, density=0.5, seed=0)
    assert set(merged.modules) == set(first.modules)
    assert guess_architecture(merged) == "flux"
    if method == "delta":  # the exact average of the two updates
        for name in first.modules:
            want = (first.modules[name].delta() + other.modules[name].delta()) / 2
            assert torch.allclose(merged.modules[name].delta(), want, atol=1e-6)
    path = save_lora(merged, tmp_path / f"{method}.safetensors")
    assert all(key.startswith("transformer.") for key in load_file(path))
    from selma_toolkit.expert_fit import base_layer_shapes, check_expert_fits

    check_expert_fits(
        load_lora(path), base_layer_shapes(str(tiny_model_dirs["flux"])), source=method, base_model="tiny:flux"
    )


def test_fit_check_lists_the_transformer_and_t5_layers_and_refuses_the_other_family(tiny_model_dirs, experts):
    from selma_toolkit.errors import LoraFormatError
    from selma_toolkit.expert_fit import base_layer_shapes, check_expert_fits

    flux_layers = base_layer_shapes(str(tiny_model_dirs["flux"]))
    assert "transformer.single_transformer_blocks.0.proj_mlp" in flux_layers
    assert "transformer.transformer_blocks.0.attn.to_add_out" in flux_layers
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in flux_layers  # T5: no text_model.
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in flux_layers
    check_expert_fits(load_lora(experts["flux"]), flux_layers, source="flux expert", base_model="tiny:flux")
    with pytest.raises(LoraFormatError, match="does not fit base_model 'tiny:flux'"):
        check_expert_fits(load_lora(experts["sd3"]), flux_layers, source="sd3 expert", base_model="tiny:flux")


def test_comfyui_node_fit_check_names_flux_and_sd3_models():
    from comfyui_nodes.fit import check_lora_fits
    from selma_toolkit.errors import LoraFormatError

    flux_lora = {
        "transformer.single_transformer_blocks.0.norm.linear.lora_A.weight": torch.zeros(4, 32),
        "transformer.single_transformer_blocks.0.norm.linear.lora_B.weight": torch.zeros(96, 4),
    }
    check_lora_fits(flux_lora, "Flux", matched=1)
    check_lora_fits(flux_lora, "FluxSchnell", matched=1)
    with pytest.raises(LoraFormatError, match="the LoRA is for flux but the MODEL is SD3 \\(sd3\\)"):
        check_lora_fits(flux_lora, "SD3", matched=1)
    with pytest.raises(LoraFormatError, match="the LoRA is for flux but the MODEL is SDXL"):
        check_lora_fits(flux_lora, "SDXL", matched=1)


def comfy_key_map_builders() -> dict:
    """ComfyUI's pure diffusers -> BFL / MMDiT key-map builders, executed from COMFYUI_PATH's
    comfy/utils.py source (skips the test without it)."""
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set")
    source = (Path(root) / "comfy" / "utils.py").read_text()
    tree = ast.parse(source)
    wanted = {"flux_to_diffusers", "mmdit_to_diffusers", "MMDIT_MAP_BASIC", "MMDIT_MAP_BLOCK", "swap_scale_shift"}
    nodes = [
        n
        for n in tree.body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))
    ]
    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "comfy/utils.py", "exec"), namespace)
    return namespace


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", DIT)
def test_comfyui_key_map_names_every_key_of_the_written_files(arch, experts, pipes):
    """ComfyUI's own diffusers -> BFL / MMDiT maps (comfy/utils.py flux_to_diffusers /
    mmdit_to_diffusers; comfy/lora.py maps ``transformer.<key>`` through them) know every module
    the expert file names. Read from COMFYUI_PATH's source (its pure dict builders only)."""
    namespace = comfy_key_map_builders()
    config = pipes[arch].transformer.config
    if arch == "flux":
        key_map = namespace["flux_to_diffusers"](
            {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers, "hidden_size": 32},
            output_prefix="diffusion_model.",
        )
    else:
        key_map = namespace["mmdit_to_diffusers"](
            {"depth": config.num_layers, "num_blocks": config.num_layers}, output_prefix="diffusion_model."
        )
    comfy_names = {"transformer." + key[: -len(".weight")] for key in key_map if key.endswith(".weight")}
    written = {key.rsplit(".lora_", 1)[0] for key in load_file(experts[arch])}
    assert written <= comfy_names, sorted(written - comfy_names)


# ------------------------------------------------------------------------------------- selma run


@pytest.mark.slow
@pytest.mark.parametrize("arch", DIT)
def test_reduced_selma_run_of_the_tiny_recipe_writes_every_stage(arch, cli, tmp_path):
    from conftest import TINY_RUN_SKILLS, small_tiny_run

    out = tmp_path / "run"
    overrides = [item for o in small_tiny_run(train_steps=2) for item in ("--set", o)]
    result = cli(
        "run",
        f"tiny-{arch}",
        "--out",
        str(out),
        *overrides,
        "--set",
        "images.batch_size=2",
        "--set",
        'evaluate.merge_methods=["delta", "svd", "ties", "dare"]',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for skill in TINY_RUN_SKILLS:
        expert = load_lora(out / "experts" / f"{skill}.safetensors")
        assert guess_architecture(expert) == arch and expert.metadata["selma.base_model"] == f"tiny:{arch}"
        assert len(list((out / "skills" / skill / "images").glob("*.png"))) == 2
    for method in ("selma", "delta", "svd", "ties", "dare"):
        merged = load_lora(out / "merged" / f"{method}.safetensors")
        assert guess_architecture(merged) == arch
        assert json.loads(merged.metadata["selma.merge"])["method"] == method
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert {f"merged:{m}" for m in ("selma", "delta", "svd", "ties", "dare")} <= set(scores["variants"])
    assert (out / "report" / "index.html").is_file()

"""The newer DiT families on their tiny models (``tiny:chroma``, ``tiny:qwen-image``, ``tiny:z-image``,
``tiny:flux2-klein``): the models and their recognition, the in-memory Qwen tokenizer (Qwen-Image's
34-token system prompt, Qwen3's chat template), the text conditioning against the pipelines'
``encode_prompt``, the normalised latents and the velocity prediction against the transformer
called as each pipeline calls it, training from caches, the expert files in each family's layout
(diffusers loads them with exactly the file's update), and a reduced ``selma run`` of each recipe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_families_dit import make_run, new_run_dir, write_dataset

from selma_toolkit.architectures import get_family
from selma_toolkit.lora import guess_architecture, inspect_lora, load_lora
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train import train_expert
from selma_toolkit.train.data import TrainSample, image_digests

NEW = ("chroma", "qwen-image", "z-image", "flux2-klein")
PROMPTS = ["two red cubes on a table", "a dog"]


@pytest.fixture(scope="module")
def pipes(tiny_model_dirs):
    from diffusers import DiffusionPipeline

    loaded = {}
    for arch in NEW:
        pipe = DiffusionPipeline.from_pretrained(tiny_model_dirs[arch])
        pipe.set_progress_bar_config(disable=True)
        loaded[arch] = pipe
    return loaded


@pytest.fixture(scope="module")
def experts(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """One trained expert per family (2 steps, rank 4, alpha 2: the scale is not 1), default layout."""
    out = {}
    for arch in NEW:
        paths = new_run_dir(tmp_path_factory.mktemp(f"expert-{arch}"))
        out[arch] = train_expert(
            make_run(tiny_model_dirs[arch], steps=2, checkpoint_every=2, alpha=2.0), "count", paths
        )
    return out


# ----------------------------------------------------------------------------- models, tokenizer


@pytest.mark.parametrize("arch", NEW)
def test_tiny_model_has_the_family_classes_and_the_same_seed_writes_the_same_weights(arch, tiny_model_dirs, tmp_path):
    from selma_toolkit.models import detect_architecture
    from selma_toolkit.tiny import create_tiny_model

    family = get_family(arch)
    folder = tiny_model_dirs[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    assert index["transformer"] == ["diffusers", family.denoiser_class]
    assert index["vae"] == ["diffusers", family.vae_class]
    assert index["text_encoder"] == ["transformers", family.text_encoders[0].model_class]
    assert detect_architecture(str(folder)) == arch
    again = create_tiny_model(tmp_path / "again", arch)
    for part in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        first, second = load_file(folder / part), load_file(again / part)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), part
    assert (again / "tokenizer" / "tokenizer.json").read_text() == (folder / "tokenizer" / "tokenizer.json").read_text()


def test_tiny_chat_tokenizer_has_qwen_images_34_token_system_prompt_and_qwen3s_chat_template(pipes):
    pipe = pipes["qwen-image"]
    tokenizer = pipe.tokenizer
    prefix, _ = pipe.prompt_template_encode.split("{}")
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    ids = tokenizer(pipe.prompt_template_encode.format("two red cubes")).input_ids
    # The prompt's own tokens start right after the 34 dropped ones.
    assert tokenizer.decode(ids[34:37]) == "two red cube"
    messages = [{"role": "user", "content": "a dog"}]
    assert (
        pipes["z-image"].tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        == "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    )
    assert pipes["flux2-klein"].tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    ) == ("<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The FLUX.2 [klein] encoder is deep enough for the hidden states the pipeline stacks (9, 18, 27).
    assert pipes["flux2-klein"].text_encoder.config.num_hidden_layers >= 28


# ----------------------------------------------------------------------------- conditioning, loss


def _pipeline_encoding(arch: str, pipe, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt states [L, D], mask [L] or None) of one prompt, as the family's pipeline encodes it."""
    if arch == "chroma":
        embeds, _, mask, *_ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        return embeds[0], mask[0]
    if arch == "qwen-image":
        embeds, mask = pipe.encode_prompt(text, device="cpu", max_sequence_length=512)
        return embeds[0], mask[0] if mask is not None else torch.ones(embeds.shape[1])
    if arch == "z-image":
        embeds, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        return embeds[0], None
    embeds, _ = pipe.encode_prompt(text, device="cpu")
    return embeds[0], None


@pytest.mark.parametrize("arch", NEW)
def test_cached_text_conditioning_equals_what_the_pipeline_encodes(arch, tiny_model_dirs, pipes, tmp_path):
    family = get_family(arch)
    model_dir = tiny_model_dirs[arch]
    folder = write_dataset(tmp_path / "images", 2)
    samples = [TrainSample(folder / f"{i:03d}.png", text, "count") for i, text in enumerate(PROMPTS)]
    names = parts.text_encoder_names(family)

    def caption_encoder():
        tokenizers, encoders = parts.load_text_encoders(model_dir, family, torch.float32)
        return caches.caption_encoder(samples, tokenizers, encoders, torch.device("cpu"), family=family)

    latents = caches.ensure_cache(
        caches.latent_cache_spec(model_dir, 32, image_digests(samples)),
        tmp_path,
        2,
        lambda: caches.latent_encoder(samples, parts.load_vae(model_dir, family), 32, family),
    )
    texts = caches.ensure_cache(
        caches.text_cache_spec(model_dir, names, torch.float32, samples), tmp_path, 2, caption_encoder
    )
    source = caches.ConditionSource(
        samples,
        32,
        torch.device("cpu"),
        latents=caches.CachedTensors(latents),
        texts=caches.CachedTensors(texts),
        family=family,
    )
    cond = source([1, 0])
    for row, index in enumerate([1, 0]):
        embeds, mask = _pipeline_encoding(arch, pipes[arch], PROMPTS[index])
        if arch in ("qwen-image", "z-image"):  # the prompt's own tokens, then zero padding masked out
            own = int(cond.text_mask[row].sum())
            assert own == embeds.shape[0] and not cond.text_mask[row, own:].any()
            assert not cond.prompt_embeds[row, own:].any()
            got = cond.prompt_embeds[row, :own]
        else:
            got = cond.prompt_embeds[row]
            if mask is not None:
                assert torch.equal(cond.text_mask[row].float(), mask.float())
        # The cache encodes both captions in one batch: CPU kernels round by batch layout, about 1e-6.
        assert torch.allclose(got, embeds, atol=5e-5), arch
    assert cond.pooled is None and cond.time_ids is None
    assert cond.latent_mean.shape[1:] == ((4, 8, 8) if arch == "qwen-image" else (4, 16, 16))


def _latents_as_the_pipeline_normalises(arch: str, pipe, z: torch.Tensor) -> torch.Tensor:
    """x0 from the VAE's latents z [n, C, h, w], as each pipeline's decode inverts it (FLUX.2: in its
    2x2-patchified layout, as Flux2KleinPipeline._encode_vae_image normalises)."""
    config = pipe.vae.config
    if arch == "qwen-image":
        mean, std = (
            torch.tensor(config.latents_mean).view(1, -1, 1, 1),
            torch.tensor(config.latents_std).view(1, -1, 1, 1),
        )
        return (z - mean) / std
    if arch == "flux2-klein":
        patches = pipe._patchify_latents(z)
        bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps)
        return (patches - bn_mean) / bn_std
    return (z - config.shift_factor) * config.scaling_factor


def _velocity_as_the_pipeline_calls(arch: str, pipe, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The transformer's output for ``noisy`` (the pipeline's latent layout; FLUX.2: patchified),
    each prompt of PROMPTS encoded and the transformer called alone, as the pipeline's loop does."""
    outputs = []
    for i, text in enumerate(PROMPTS):
        x, t = noisy[i : i + 1], timesteps[i : i + 1]
        if arch == "chroma":
            embeds, text_ids, mask, *_ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
            n, c, h, w = x.shape
            packed = pipe._pack_latents(x, n, c, h, w)
            ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", x.dtype)
            attention = pipe._prepare_attention_mask(n, packed.shape[1], x.dtype, mask)
            out = pipe.transformer(
                hidden_states=packed,
                timestep=t / 1000,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=ids,
                attention_mask=attention,
                return_dict=False,
            )[0]
            outputs.append(
                pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
            )
        elif arch == "qwen-image":
            embeds, mask = pipe.encode_prompt(text, device="cpu", max_sequence_length=512)
            n, c, h, w = x.shape
            packed = pipe._pack_latents(x, n, c, h, w)
            out = pipe.transformer(
                hidden_states=packed,
                timestep=t / 1000,
                guidance=None,
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=[[(1, h // 2, w // 2)]],
                return_dict=False,
            )[0]
            outputs.append(
                pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)[
                    :, :, 0
                ]
            )
        elif arch == "z-image":
            embeds, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
            out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, embeds, return_dict=False)[0]
            outputs.append(-torch.stack(out).squeeze(2))
        else:
            embeds, text_ids = pipe.encode_prompt(text, device="cpu")
            ids = pipe._prepare_latent_ids(x)
            out = pipe.transformer(
                hidden_states=pipe._pack_latents(x),
                timestep=t / 1000,
                guidance=None,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
            outputs.append(pipe._unpack_latents_with_ids(out, ids))
    return torch.cat(outputs)


@pytest.mark.parametrize("arch", NEW)
def test_flow_prediction_and_loss_equal_the_transformer_called_as_the_pipeline_calls_it(arch, tiny_model_dirs, pipes):
    family = get_family(arch)
    pipe = pipes[arch]
    model_dir = tiny_model_dirs[arch]
    scheduler = parts.load_noise_scheduler(model_dir, family)
    generator = torch.Generator().manual_seed(1)
    size = 8 if arch == "qwen-image" else 16
    mean, std = torch.randn(2, 4, size, size, generator=generator), torch.rand(2, 4, size, size, generator=generator)
    tokenizers, encoders = parts.load_text_encoders(model_dir, family, torch.float32)
    with torch.no_grad():
        encoded = parts.encode_conditioning(family, tokenizers, encoders, PROMPTS)
    cond = parts.Conditioning(
        latent_mean=mean, latent_std=std, prompt_embeds=encoded["prompt_embeds"], text_mask=encoded.get("text_mask")
    )
    draws = parts.draw([torch.Generator().manual_seed(s) for s in (3, 4)], (4, size, size), 1000)
    latent_scale = parts.vae_latent_scale(model_dir, family)
    with torch.no_grad():
        prediction, target = parts.flow_prediction_and_target(
            pipe.transformer, scheduler, cond, draws, latent_scale, family
        )
        loss = parts.flow_loss(pipe.transformer, scheduler, cond, draws, latent_scale, family)
        # Independently: x0 and noise in the pipeline's own latent layout, sigmas from a fresh scheduler.
        z = mean + std * draws.latent_noise
        noise = pipe._patchify_latents(draws.noise) if arch == "flux2-klein" else draws.noise
        x0 = _latents_as_the_pipeline_normalises(arch, pipe, z)
        sigmas = torch.stack([scheduler.sigmas[int(i)] for i in draws.timesteps]).float().view(-1, 1, 1, 1)
        timesteps = torch.stack([scheduler.timesteps[int(i)] for i in draws.timesteps]).float()
        expected = _velocity_as_the_pipeline_calls(arch, pipe, (1 - sigmas) * x0 + sigmas * noise, timesteps)
    if arch == "flux2-klein":  # compared in the pipeline's patchified layout (a permutation of ours)
        prediction, target = pipe._patchify_latents(prediction), pipe._patchify_latents(target)
    assert torch.allclose(target, noise - x0, atol=1e-6)
    assert torch.allclose(prediction, expected, atol=2e-5), float((prediction - expected).abs().max())
    assert torch.allclose(loss, ((expected - (noise - x0)) ** 2).mean(), rtol=1e-4)


# ------------------------------------------------------------------------------------- training, files


@pytest.mark.parametrize("arch", ["qwen-image", "z-image"])
def test_training_from_padded_caches_equals_training_through_the_encoders(arch, tiny_model_dirs, tmp_path):
    cached, direct = new_run_dir(tmp_path, "cached"), new_run_dir(tmp_path, "direct")
    train_expert(make_run(tiny_model_dirs[arch], steps=2, cache=True), "count", cached)
    train_expert(make_run(tiny_model_dirs[arch], steps=2, cache=False), "count", direct)
    losses = [
        [json.loads(line)["loss"] for line in (p.train_dir("count") / "loss.jsonl").read_text().splitlines()]
        for p in (cached, direct)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    want, got = load_lora(direct.expert("count")), load_lora(cached.expert("count"))
    assert sorted(want.modules) == sorted(got.modules)
    assert all(torch.allclose(want.modules[n].delta(), got.modules[n].delta(), atol=1e-6) for n in want.modules)


# The keys each family's default layout writes (lora/writing.py).
LAYOUT_KEYS = {
    "chroma": ("peft", "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"),
    "qwen-image": ("ai-toolkit", "diffusion_model.transformer_blocks.0.attn.add_q_proj.lora_A.weight"),
    "z-image": ("ai-toolkit", "diffusion_model.noise_refiner.0.attention.to_q.lora_A.weight"),
    "flux2-klein": ("ai-toolkit", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"),
}


@pytest.mark.parametrize("arch", NEW)
def test_expert_file_is_in_the_family_layout_and_diffusers_loads_exactly_its_update(arch, experts, pipes):
    layout, key = LAYOUT_KEYS[arch]
    info = inspect_lora(experts[arch])
    raw = load_file(experts[arch])
    assert info.layouts == [layout] and key in raw and not any(k.endswith(".alpha") for k in raw)
    assert guess_architecture(info.weights) == arch
    family = get_family(arch)
    leaves = {name.split(".attn.")[-1].split(".attention.")[-1] for name in info.weights.modules}
    assert leaves == {target.removeprefix("attn.") for target in family.lora_targets} - (
        {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} if arch == "z-image" else set()
    )
    if arch == "flux2-klein":  # q, k, v of rank 4 each fused into one LoRA of rank 12, block-diagonal B
        assert raw[key].shape[0] == 12 and raw[key.replace("lora_A", "lora_B")].shape[1] == 12
        assert {m.rank for m in info.weights.modules.values()} == {4}  # read back as the three rank-4 LoRAs
    pipe = pipes[arch]

    def draw():
        arguments = family.pipeline_arguments(None, 3.5, 1)
        return pipe(
            prompt="two red cubes",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **arguments,
        ).images

    before = draw()
    pipe.load_lora_weights(str(experts[arch]), adapter_name="expert")
    try:
        for name, module in info.weights.modules.items():
            layer = pipe.transformer.get_submodule(name.removeprefix("transformer."))
            loaded = layer.scaling["expert"] * layer.lora_B["expert"].weight @ layer.lora_A["expert"].weight
            assert torch.allclose(loaded, module.delta(), atol=1e-7), name
        after = draw()
    finally:
        pipe.unload_lora_weights()
    assert np.abs(after - before).max() > 1e-6  # two steps of training: a small change, but one (FLUX.2's ~2e-5)
    assert np.array_equal(draw(), before)


@pytest.mark.comfyui
def test_comfyui_0364_loads_every_key_of_a_qwen_image_expert(experts, tiny_model_dirs):
    """ComfyUI's own key map (comfy/lora.py: a Qwen-Image model ComfyUI detects from the tiny
    transformer's state dict) patches every module of the ai-toolkit-layout expert, key by key."""
    from support_comfyui import comfyui_install, run_in_comfyui

    install = comfyui_install()
    if install is None:
        pytest.skip("COMFYUI_PATH is not set")
    comfyui, python = install
    config = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in get_family("qwen-image").tiny.denoiser.items()
    }
    answer = run_in_comfyui(python, comfyui, "qwen-image-key-check", str(experts["qwen-image"]), json.dumps(config))
    assert answer["model"] == "QwenImage" and answer["unloaded"] == []
    assert answer["patched"] == len(inspect_lora(experts["qwen-image"]).weights.modules) == answer["keys"] // 2


@pytest.mark.comfyui
def test_comfyui_maps_every_key_of_a_chroma_expert_as_for_flux(experts, pipes):
    """ComfyUI's Chroma model is a Flux model: its key map takes transformer.<diffusers path> through
    flux_to_diffusers (comfy/utils.py), which names every module of the expert."""
    from test_families_dit import comfy_key_map_builders

    config = pipes["chroma"].transformer.config
    key_map = comfy_key_map_builders()["flux_to_diffusers"](
        {"depth": config.num_layers, "depth_single_blocks": config.num_single_layers, "hidden_size": 32},
        output_prefix="diffusion_model.",
    )
    comfy_names = {"transformer." + key[: -len(".weight")] for key in key_map if key.endswith(".weight")}
    written = {key.rsplit(".lora_", 1)[0] for key in load_file(experts["chroma"])}
    assert written <= comfy_names, sorted(written - comfy_names)


# ------------------------------------------------------------------------------------- selma run


@pytest.mark.slow
@pytest.mark.parametrize("arch", NEW)
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
        'evaluate.merge_methods=["delta", "dare"]',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    layout = LAYOUT_KEYS[arch][0]
    for skill in TINY_RUN_SKILLS:
        info = inspect_lora(out / "experts" / f"{skill}.safetensors")
        assert info.layouts == [layout] and guess_architecture(info.weights) == arch
        assert info.weights.metadata["selma.base_model"] == f"tiny:{arch}"
        assert len(list((out / "skills" / skill / "images").glob("*.png"))) == 2
    for method in ("selma", "delta", "dare"):
        merged = inspect_lora(out / "merged" / f"{method}.safetensors")
        assert merged.layouts == [layout] and guess_architecture(merged.weights) == arch
        assert json.loads(merged.weights.metadata["selma.merge"])["method"] == method
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert {f"merged:{m}" for m in ("selma", "delta", "dare")} <= set(scores["variants"])
    assert (out / "report" / "index.html").is_file()


# The real run recipes: what the common LoRA trainers default to for each model (the recipes' comments).
REAL_RECIPES = {
    "flux-selma": ("flux", "black-forest-labs/FLUX.1-dev", 28, 3.5),
    "qwen-image-selma": ("qwen-image", "Qwen/Qwen-Image", 50, 4.0),
    "z-image-selma": ("z-image", "Tongyi-MAI/Z-Image", 50, 4.0),
    "flux2-klein-selma": ("flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B", 50, 4.0),
}


@pytest.mark.parametrize("name", sorted(REAL_RECIPES))
def test_real_run_recipes_hold_the_common_trainers_defaults_for_their_model(name):
    from selma_toolkit.recipe import load_run_recipe

    arch, model, steps, guidance = REAL_RECIPES[name]
    run = load_run_recipe(name)
    family = get_family(arch)
    assert run.base_model == model and family.published_model == model
    assert (run.images.steps, run.images.guidance_scale, run.images.resolution) == (steps, guidance, 1024)
    assert run.images.resolution % 16 == 0  # VAE x8 and 2x2 patches
    assert (run.train.rank, run.train.alpha, run.train.learning_rate) == (16, 16, 1e-4)
    assert run.train.mixed_precision == "bf16" and run.train.target_modules is None  # the family's default targets
    assert run.train.lora_format is None  # the family's default layout
    assert len(run.skills) == 5 and run.merge.method == "selma"

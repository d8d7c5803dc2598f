"""Base models: resolve a model reference, tell its architecture, load it as a diffusers pipeline.

A model reference is a Hub repo id (``stabilityai/stable-diffusion-2``), a local diffusers folder
(with model_index.json), a single-file ``.safetensors`` checkpoint, ``tiny:<arch>`` (the
embedded default, built on first use), or ``toy:shapes`` / ``toy:shapes-web`` (the pretrained shapes-world
bases, package data of selma_toolkit.toyworld). Every stage loads models through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import DENOISERS, Family, family_of_pipeline, family_titles
from selma_toolkit.config.registries import MODEL_SOURCES, import_object
from selma_toolkit.errors import ModelDownloadError, ModelError, SelmaError

UNSAFE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def resolve_model(spec: str) -> str:
    """A local path for ``tiny:<arch>`` (built on first use) and local folders; Hub ids unchanged.

    A local path that exists but is not a diffusers folder or a .safetensors file is an error here,
    before anything heavy is loaded.
    """
    for prefix, source in MODEL_SOURCES.items():
        if spec.startswith(prefix):
            try:
                return str(import_object(source)(spec))
            except ValueError as exc:
                raise ModelError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.suffix.lower() in UNSAFE_SUFFIXES:
        raise ModelError(
            f"{spec}: {path.suffix} checkpoints are pickle files and loading one can run arbitrary code; "
            "selma-toolkit loads weights only from .safetensors. Convert it with a tool you trust, or use "
            "the model's diffusers folder or Hub id."
        )
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise ModelError(
                f"{spec}: folder has no model_index.json; expected a diffusers model folder "
                "(as written by save_pretrained or `selma tiny create`)"
            )
        if path.is_file() and path.suffix.lower() != ".safetensors":
            raise ModelError(f"{spec}: expected a diffusers folder or a .safetensors checkpoint")
        return str(path)
    if spec.count("/") != 1 or spec.startswith(("/", ".", "~")):
        raise ModelError(f"{spec}: no such folder or file, and not a Hub repo id of the form owner/name")
    return spec


def architecture_from_config(unet_config: dict[str, Any], pipeline_class: str = "") -> str:
    """The family name (sd1, sd2, ... flux2-klein) from a denoiser config and the pipeline class when known:
    the rules live in the family records (``architectures.family_of_pipeline``)."""
    return family_of_pipeline(pipeline_class, unet_config).name


def detect_architecture(spec: str, revision: str | None = None) -> str:
    """The family name of a model (sd1, sd2, ... flux2-klein), as metadata and messages write it."""
    return detect_family(spec, revision).name


def detect_family(spec: str, revision: str | None = None) -> Family:
    """Read model_index.json and the denoiser's config.json (unet/ or transformer/, local or from
    the Hub): the model's family record (selma_toolkit.architectures), which the stages pass down."""
    path = Path(resolve_model(spec))
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text())
            denoiser = _denoiser(spec, index)
            config_path = path / denoiser / "config.json"
            unet_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"{spec}: model_index.json or its denoiser's config.json is not valid JSON ({exc}); "
                "expected a diffusers model folder"
            ) from None
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = json.loads(Path(hf_hub_download(spec, "model_index.json", revision=revision)).read_text())
        except Exception as exc:
            raise hub_model_error(f"{spec}: could not read model_index.json from the Hub", exc) from None
        denoiser = _denoiser(spec, index)
        try:
            unet_config = json.loads(
                Path(hf_hub_download(spec, f"{denoiser}/config.json", revision=revision)).read_text()
            )
        except Exception as exc:
            raise hub_model_error(f"{spec}: could not read {denoiser}/config.json from the Hub", exc) from None
    pipeline_class = index.get("_class_name", "")
    family = family_of_pipeline(pipeline_class, unet_config)
    if family.denoiser != denoiser:  # a transformer no family's rule claims (another DiT model)
        raise ModelError(
            f"{spec}: pipeline {pipeline_class!r} with a {denoiser} is none of the supported families; "
            f"expected {family_titles()}"
        )
    return family


def pipeline_family(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline (its class and its denoiser's config)."""
    denoiser = next((getattr(pipe, name) for name in DENOISERS if getattr(pipe, name, None) is not None), None)
    return family_of_pipeline(type(pipe).__name__, dict(getattr(denoiser, "config", {}) or {}))


def _denoiser(spec: str, index: dict[str, Any]) -> str:
    """The denoiser component a model_index.json lists (unet, or the DiT families' transformer)."""
    for name in DENOISERS:
        if name in index:
            return name
    raise ModelError(
        f"{spec}: pipeline {index.get('_class_name', '')!r} has no UNet or transformer; expected {family_titles()}"
    )


def hub_model_error(message: str, exc: BaseException) -> SelmaError:
    """The error for a failed read of a model's files from the Hub: ``ModelError`` (exit 2) when
    the Hub says the reference names nothing (no such repo, revision or file, an invalid id), else
    ``ModelDownloadError`` (exit 1: no network, a server error, offline without a cached copy)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # LocalEntryNotFoundError (not found in the cache, the Hub unreachable) is an EntryNotFoundError
    # too, and GatedRepoError a RepositoryNotFoundError: both are tested first.
    if isinstance(exc, (LocalEntryNotFoundError, GatedRepoError)):
        return ModelDownloadError(
            f"{message} ({exc}); check the network, HF_ENDPOINT / HF_HUB_OFFLINE, or log in "
            "(`hf auth login`) for a gated or private model, then run the command again"
        )
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, HFValidationError)):
        return ModelError(f"{message} ({exc}); check the repo id and revision")
    return ModelDownloadError(f"{message} ({type(exc).__name__}: {exc}); run the command again once the Hub answers")


def default_dtype(device: str, requested: str = "auto"):
    """float16 on CUDA, float32 elsewhere, unless a dtype is requested."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    spec: str,
    *,
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    scheduler: str | None = None,
    safety_checker: bool = False,
    config: str | None = None,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    cpu_offload: bool = False,
):
    """Load a text-to-image pipeline of one of the families (SD 1.x ... FLUX.2 [klein]) with diffusers.

    ``scheduler`` names a diffusers scheduler class built from the model's own scheduler config.
    ``safety_checker`` is off by default: for dataset generation it silently blacks out images.
    A single-file ``.safetensors`` model needs ``config`` (a local diffusers folder, or
    ``tiny:<arch>``, of the same architecture), so nothing fetches a config at run time.
    Attention is torch SDPA (diffusers' default processor on torch 2); ``attention_slicing``,
    ``vae_tiling`` and ``cpu_offload`` (CUDA only: model-level offload) trade speed for memory.
    """
    import diffusers

    device = device or default_device()
    torch_dtype = default_dtype(device, dtype)  # passed as dtype= (diffusers >= 0.42 name)
    source = resolve_model(spec)
    extra: dict[str, Any] = {}
    if not safety_checker:
        extra.update(safety_checker=None, requires_safety_checker=False)
    try:
        if source.endswith(".safetensors"):
            if config is None:
                raise ModelError(
                    f"{spec}: a single-file checkpoint needs a local config (a diffusers folder of the same "
                    "architecture) so that no config is fetched at run time"
                )
            config_dir = Path(resolve_model(config))
            if not config_dir.is_dir():
                raise ModelError(
                    f"config {config!r}: expected a local diffusers folder (with model_index.json), so that "
                    "no config is fetched at run time"
                )
            # DiffusionPipeline itself has no from_single_file: the concrete class named by the config does.
            class_name = json.loads((config_dir / "model_index.json").read_text())["_class_name"]
            pipeline_class = getattr(diffusers, class_name, None)
            if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
                raise ModelError(
                    f"config {config!r}: pipeline {class_name!r} cannot load single-file checkpoints; "
                    f"expected an {family_titles()} diffusers folder"
                )
            pipe = pipeline_class.from_single_file(
                source,
                config=str(config_dir),
                dtype=torch_dtype,
                local_files_only=True,
                **_accepted(str(config_dir), extra),
            )
        else:
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                source, revision=revision, dtype=torch_dtype, **_accepted(source, extra)
            )
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(f"{spec}: could not load the model ({exc})") from None
    if scheduler:
        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise ModelError(
                f"scheduler {scheduler!r} is not a diffusers scheduler class (e.g. 'DPMSolverMultistepScheduler')"
            )
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if cpu_offload:
        if not str(device).startswith("cuda"):
            raise ModelError(
                f"cpu_offload: model CPU offload moves parts to a CUDA device on demand; the device here is "
                f"{device!r}. Set images.cpu_offload = false on a machine without CUDA"
            )
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)


def _accepted(source: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Only pass safety-checker arguments to pipelines that have one (SD 1.x)."""
    path = Path(source)
    index_path = path / "model_index.json"
    if path.is_dir() and index_path.is_file():
        index = json.loads(index_path.read_text())
        if "safety_checker" not in index:
            return {}
    return extra

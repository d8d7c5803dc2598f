"""Scorers: images + prompts -> one number per image.

Every scorer's model comes from the recipe's ``[evaluate]`` section; ``tiny:clip``, ``tiny:vqa`` and
the tiny VQA judges (``tiny:blip2``, ``tiny:paligemma``, ``tiny:llava``) name the embedded tiny random
models (selma_toolkit.tiny, selma_toolkit.tiny_vlm), on which every code path here runs.

| name | model (recipe field) | score per image |
| --- | --- | --- |
| ``clipscore`` | ``clip_model`` | ``100 * max(cos(image, text), 0)`` (torchmetrics' CLIPScore) |
| ``pickscore`` | ``pickscore_model`` (+ ``pickscore_processor``) | ``logit_scale.exp() * cos`` (the PickScore authors' code) |
| ``hps`` | ``hps_model`` (+ ``hps_clip_config``) | ``100 * cos`` (HPS v2 reports cos as a percentage) |
| ``imagereward`` | ``imagereward_model`` (extra ``[eval]``) | the ImageReward package's ``score`` |
| ``vqascore`` | ``vqa_model`` | ``100 * P(yes)`` for "does this figure show <prompt>?" (evaluate/vqa.py, evaluate/vlm.py) |
| ``questions`` | ``vqa_model`` + ``questions`` | ``100 *`` share of the prompt's questions answered correctly, DSG rule |
| ``toyworld`` | none (segmentation) | ``100 *`` share of DSG-style questions right on a shapes-world image (selma_toolkit.toyworld) |

Models load on the first ``score`` call, so building the scorers (which checks every setting, the
pickle opt-ins included) is cheap and fails before any image is generated. Weights load only from
safetensors, except the two published pickled checkpoints, each behind an explicit opt-in with its
sha256 pinned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selma_toolkit import tiny
from selma_toolkit.config.registries import SCORER_NAMES, SCORERS, SHIPPED_SCORER_MODELS, import_object
from selma_toolkit.errors import ModelError
from selma_toolkit.evaluate.openclip import clip_state_dict_from_open_clip
from selma_toolkit.io import sha256_file
from selma_toolkit.models import default_device

if TYPE_CHECKING:
    from PIL.Image import Image

    from selma_toolkit.config.evaluate import EvaluateSettings

logger = logging.getLogger(__name__)


class Scorer(Protocol):
    """What score_variants needs from a scorer."""

    name: str  # metric key in scores.json, e.g. "clipscore"
    label: str  # shown in the report, e.g. "CLIPScore"
    model_id: str  # the model reference from the recipe (a scorer may add ``cache_key`` when more matters)
    description: str  # one line for the report: what the number is, and caveats

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        """One score per image (None where the scorer does not apply, e.g. a prompt without questions)."""
        ...

    # A scorer may also have ``score_by_id(images, prompt_ids)``, which score_variants then calls instead:
    # a benchmark's questions scorer, whose prompts are told apart by id (two TIFA items share a caption).


def resolve_scorer_model(spec: str, field: str) -> str:
    """A local folder for ``tiny:clip`` / ``tiny:vqa`` (built on first use) and for ``toy:judge``
    (the shapes world's shipped judge, package data); other references unchanged."""
    if spec in SHIPPED_SCORER_MODELS:
        try:
            return str(import_object(SHIPPED_SCORER_MODELS[spec])())
        except ValueError as exc:
            raise ModelError(f"evaluate.{field} = {spec!r}: {exc}") from None
    if tiny.is_tiny_spec(spec):
        try:
            return str(tiny.ensure_tiny_scorer_model(spec))
        except ValueError as exc:
            raise ModelError(f"evaluate.{field} = {spec!r}: {exc}") from None
    return spec


def load_pretrained(cls: Any, spec: str, field: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` on a recipe model reference, safetensors only, with a clear error."""
    source = resolve_scorer_model(spec, field)
    if kwargs.pop("weights", True):
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"evaluate.{field} = {spec!r}: could not load it with {cls.__name__} ({exc}). Expected a local folder or "
            "Hub id with safetensors weights (pickled .bin weights are not loaded), or one of the tiny models "
            f"{', '.join(tiny.TINY_PREFIX + name for name in tiny.SCORER_MODELS)}."
        ) from None


def require_pickle_opt_in(spec: str, field: str, allow: bool, sha256: str | None) -> None:
    """Refuse a pickled checkpoint unless the recipe opted in to pickles for this scorer and pinned
    the file's sha256 (checked before anything is downloaded or unpickled)."""
    prefix = field.removesuffix("_model")
    if not allow:
        raise ModelError(
            f"evaluate.{field} = {spec!r} is a pickled PyTorch checkpoint: unpickling a file can run arbitrary code "
            f"on this machine. It is read only if you accept that risk for this scorer and pin the exact file: set "
            f'evaluate.{prefix}_allow_pickle = true and evaluate.{prefix}_sha256 = "<sha256 of the file>" '
            "(the Hub shows it on the file's page), or use a model in safetensors format."
        )
    if sha256 is None:
        raise ModelError(
            f"evaluate.{prefix}_allow_pickle is true but evaluate.{prefix}_sha256 is not set: a pickled checkpoint is "
            f'read only when its sha256 is pinned. Add evaluate.{prefix}_sha256 = "<sha256 of {spec}>".'
        )


def pinned_pickle(spec: str, field: str, allow: bool, sha256: str | None) -> Path:
    """The local path of a pickled checkpoint (``owner/repo:file.pt`` on the Hub, or a local file),
    returned only after the opt-in check and if the file's sha256 equals the pinned one."""
    require_pickle_opt_in(spec, field, allow, sha256)
    prefix = field.removesuffix("_model")
    path = _fetch_file(spec, field)
    actual = sha256_file(path)
    if actual != sha256:
        raise ModelError(
            f"{path}: sha256 is {actual}, but evaluate.{prefix}_sha256 pins {sha256}: this is not the file you "
            "pinned, so it is not loaded. Check the file (or the pin) and try again."
        )
    return path


def _fetch_file(spec: str, field: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    repo, sep, filename = spec.partition(":")
    if not sep or repo.count("/") != 1 or not filename:
        raise ModelError(
            f"evaluate.{field} = {spec!r}: no such file, and not a Hub file of the form owner/repo:file.pt"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:
        raise ModelError(f"evaluate.{field} = {spec!r}: could not download {filename} from {repo} ({exc})") from None


def _features(output: Any) -> Any:
    """transformers 5 returns a model output (projected features in pooler_output); 4.x a tensor."""
    return output if hasattr(output, "dim") else output.pooler_output


class ClipSimilarityScorer:
    """A CLIP-architecture model scoring an image against its prompt by the cosine of their embeddings.

    ``scale``: ``"clipscore"`` -> 100 * max(cos, 0); ``"logit_scale"`` -> logit_scale.exp() * cos
    (PickScore); ``"percent"`` -> 100 * cos (HPS v2).
    """

    def __init__(
        self,
        name: str,
        label: str,
        model_id: str,
        description: str,
        scale: str,
        load: Any,
        device: str | None = None,
        batch_size: int = 16,
    ):
        self.name, self.label, self.model_id, self.description = name, label, model_id, description
        self.scale = scale
        self.batch_size = batch_size
        self.device = device
        self._load = load
        self._model: Any = None
        self._processor: Any = None

    def _ensure_loaded(self) -> None:
        if self._model is None:
            self.device = self.device or default_device()
            model, self._processor = self._load()
            self._model = model.to(self.device).eval()

    def embeddings(self, images: Sequence[Image], prompts: Sequence[str]):
        """L2-normalised image and text embeddings, [n, d] each (float32)."""
        import torch

        self._ensure_loaded()
        max_length = self._model.config.text_config.max_position_embeddings
        image_parts, text_parts = [], []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch_images = [image.convert("RGB") for image in images[start : start + self.batch_size]]
                batch_prompts = list(prompts[start : start + self.batch_size])
                pixels = self._processor(images=batch_images, return_tensors="pt")["pixel_values"].to(self.device)
                tokens = self._processor(
                    text=batch_prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
                )
                image_parts.append(_features(self._model.get_image_features(pixel_values=pixels)).float())
                text_parts.append(
                    _features(
                        self._model.get_text_features(
                            input_ids=tokens["input_ids"].to(self.device),
                            attention_mask=tokens["attention_mask"].to(self.device),
                        )
                    ).float()
                )
        image_embeds = torch.nn.functional.normalize(torch.cat(image_parts), dim=-1)
        text_embeds = torch.nn.functional.normalize(torch.cat(text_parts), dim=-1)
        return image_embeds, text_embeds

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        image_embeds, text_embeds = self.embeddings(images, prompts)
        cos = (image_embeds * text_embeds).sum(dim=-1)
        if self.scale == "clipscore":
            values = 100.0 * cos.clamp(min=0.0)
        elif self.scale == "logit_scale":
            values = self._model.logit_scale.detach().exp().float().cpu() * cos.cpu()
        else:
            values = 100.0 * cos
        return [float(v) for v in values.cpu()]


def _clip_loader(model_spec: str, model_field: str, processor_spec: str | None, processor_field: str):
    def load():
        from transformers import AutoProcessor, CLIPModel

        model = load_pretrained(CLIPModel, model_spec, model_field)
        processor = load_pretrained(AutoProcessor, processor_spec or model_spec, processor_field, weights=False)
        return model, processor

    return load


def _hps_pickle_loader(settings: EvaluateSettings):
    """HPS v2's published checkpoint is an open_clip state dict in a pickle; it is read (after the
    opt-in and pin) with torch.load(weights_only=True) into a transformers CLIPModel built from
    ``hps_clip_config``, so open_clip (and torchvision) are not needed."""

    def load():
        import torch
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        path = pinned_pickle(settings.hps_model, "hps_model", settings.hps_allow_pickle, settings.hps_sha256)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path}: could not read it as a PyTorch state dict ({exc})") from None
        config = load_pretrained(CLIPConfig, settings.hps_clip_config, "hps_clip_config", weights=False)
        model = CLIPModel(config)
        state_dict = clip_state_dict_from_open_clip(checkpoint.get("state_dict", checkpoint), str(path))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelError(
                f"{path}: the checkpoint does not fit evaluate.hps_clip_config = {settings.hps_clip_config!r} "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]}); set hps_clip_config to the CLIP it was trained from"
            )
        processor = load_pretrained(AutoProcessor, settings.hps_clip_config, "hps_clip_config", weights=False)
        return model, processor

    return load


class ImageRewardScorer:
    """ImageReward (BLIP + reward head), through the image-reward package (extra ``[eval]``),
    imported only when this scorer is built."""

    name, label = "imagereward", "ImageReward"
    description = "ImageReward reward model score (higher is better)."

    def __init__(self, settings: EvaluateSettings, device: str | None = None):
        self.model_id = settings.imagereward_model
        self.settings = settings
        self.device = device
        self._model: Any = None
        # Checked now so that a missing opt-in or package fails before images are generated.
        require_pickle_opt_in(
            self.model_id, "imagereward_model", settings.imagereward_allow_pickle, settings.imagereward_sha256
        )
        try:
            import ImageReward  # noqa: F401
        except ImportError:
            raise ModelError(
                "scorer 'imagereward' needs the image-reward package: pip install 'selma-toolkit[eval]' "
                "(or drop 'imagereward' from evaluate.scorers)"
            ) from None

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float | None]:
        if self._model is None:
            import ImageReward

            path = pinned_pickle(self.model_id, "imagereward_model", True, self.settings.imagereward_sha256)
            med_config = _fetch_file(_sibling(self.model_id, "med_config.json"), "imagereward_model")
            self.device = self.device or default_device()
            self._model = ImageReward.load(str(path), device=self.device, med_config=str(med_config))
        return [float(self._model.score(prompt, image.convert("RGB"))) for image, prompt in zip(images, prompts)]


def _sibling(spec: str, filename: str) -> str:
    """The file ``filename`` beside ``spec`` (a local path or ``owner/repo:file``)."""
    if Path(spec).expanduser().is_file():
        return str(Path(spec).expanduser().with_name(filename))
    return f"{spec.partition(':')[0]}:{filename}"


def build_clipscore(settings: EvaluateSettings, device: str | None) -> Scorer:
    return ClipSimilarityScorer(
        "clipscore",
        "CLIPScore",
        settings.clip_model,
        "100 * max(cos(image, prompt), 0) in CLIP embedding space.",
        "clipscore",
        _clip_loader(settings.clip_model, "clip_model", None, "clip_model"),
        device,
        settings.batch_size,
    )


def build_pickscore(settings: EvaluateSettings, device: str | None) -> Scorer:
    return ClipSimilarityScorer(
        "pickscore",
        "PickScore",
        settings.pickscore_model,
        "PickScore human-preference model: logit_scale * cos.",
        "logit_scale",
        _clip_loader(settings.pickscore_model, "pickscore_model", settings.pickscore_processor, "pickscore_processor"),
        device,
        settings.batch_size,
    )


def build_hps(settings: EvaluateSettings, device: str | None) -> Scorer:
    if settings.hps_model.endswith((".pt", ".pth", ".bin")):
        # Refuse now (before images are generated) if the opt-in or the pin is missing.
        require_pickle_opt_in(settings.hps_model, "hps_model", settings.hps_allow_pickle, settings.hps_sha256)
        load = _hps_pickle_loader(settings)
    else:
        load = _clip_loader(settings.hps_model, "hps_model", None, "hps_model")
    return ClipSimilarityScorer(
        "hps",
        "HPS v2",
        settings.hps_model,
        "Human Preference Score v2: 100 * cos.",
        "percent",
        load,
        device,
        settings.batch_size,
    )


def build_imagereward(settings: EvaluateSettings, device: str | None) -> Scorer:
    return ImageRewardScorer(settings, device)


def build_scorer(name: str, settings: EvaluateSettings, device: str | None = None) -> Scorer:
    """The scorer called ``name`` (one of SCORER_NAMES) with its models from ``settings``."""
    if name not in SCORERS:
        raise ModelError(f"unknown scorer {name!r}; expected one of {', '.join(SCORER_NAMES)}")
    return import_object(SCORERS[name])(settings, device)


def build_scorers(settings: EvaluateSettings, device: str | None = None) -> list[Scorer]:
    """Every scorer the recipe lists, in its order."""
    return [build_scorer(name, settings, device) for name in settings.scorers]

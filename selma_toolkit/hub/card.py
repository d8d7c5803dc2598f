"""What `selma hub push` uploads, and the model card written for it.

``plan_upload(path, repo_id)`` collects the files of one push (an expert file, a merged LoRA, or a
run folder in the ``RunPaths`` layout) and renders README.md from ``hub/model_card.md`` with
huggingface_hub's ``ModelCard`` / ``ModelCardData`` (YAML metadata the Hub reads: base_model,
library_name, pipeline_tag, license, tags). The card's facts come from the LoRA files'
``__metadata__``, the resolved recipe and the run's files; nothing is made up: a fact that is not
known is left out.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_toolkit import __version__
from selma_toolkit.architectures import FAMILIES, family_from_metadata
from selma_toolkit.errors import DatasetError, HubError, RecipeError
from selma_toolkit.hub.names import REPO_ID, check_safetensors_name
from selma_toolkit.io import read_jsonl
from selma_toolkit.lora.merging.record import metadata_record
from selma_toolkit.paths import RunPaths
from selma_toolkit.resources import shipped_dir, shipped_skill

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SAMPLES = 16
MAX_SCORE_ROWS = 60
SAMPLES_FILE = "samples.png"


@dataclass
class UploadPlan:
    """The files of one commit (path in repo -> local file or bytes) and its message."""

    files: dict[str, Path | bytes]
    commit_message: str
    commit_description: str = ""
    # Small files whose bytes are scanned before upload; LoRA files are checked through their header.
    _scanned: list[str] = field(default_factory=list)

    def refuse_if_contains(self, secret: str) -> None:
        """Raise HubError if the secret (the Hub token) is in any file to upload or in a LoRA header."""
        needle = secret.encode()
        for name, content in self.files.items():
            if isinstance(content, bytes):
                data = content
            elif name.lower().endswith(".safetensors"):
                data = json.dumps(lora_file_metadata(content)).encode()
            else:
                data = content.read_bytes()
            if needle in data:
                raise HubError(f"refusing to upload {name}: it contains your Hub token; remove it from the file first")


# ------------------------------------------------------------------------------- LoRA metadata


def lora_file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (header only; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise HubError(f"{path}: not a readable .safetensors file ({exc})") from None


def _field(meta: dict[str, str], name: str, *foreign: str) -> str | None:
    """Our field ``name`` as selma_toolkit.lora writes it (``selma.<name>``, or plain), else the
    first of the ``foreign`` keys other trainers write (kohya ``ss_*``, ``modelspec.*``)."""
    for key in (f"selma.{name}", name, *foreign):
        if meta.get(key):
            return meta[key]
    return None


def _string_list(value: str | None) -> list[str]:
    """A list field: a JSON list (how selma_toolkit.lora writes lists) or a comma-separated string."""
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value.split(",")
    items = parsed if isinstance(parsed, list) else [parsed]
    return [str(item).strip() for item in items if str(item).strip()]


def lora_facts(meta: dict[str, str]) -> dict[str, Any]:
    """Base model, architecture, skills, rank, alpha, merge record and license from a LoRA's metadata."""
    merge = metadata_record(meta)  # the selma.merge record, read where it is written (lora/merging/record.py)
    skills = _string_list(_field(meta, "skills")) or _string_list(_field(meta, "skill"))
    if merge:
        skills += [e["skill"] for e in merge.get("experts", []) if e.get("skill") and e["skill"] not in skills]
    family = family_from_metadata(meta)  # ours, else kohya's or ModelSpec's name for the base
    architecture = family.name if family is not None else None
    return {
        "base_model": _field(meta, "base_model", "ss_sd_model_name"),
        "architecture": architecture,
        "skills": skills,
        "rank": _field(meta, "rank", "ss_network_dim"),
        "alpha": _field(meta, "alpha", "ss_network_alpha"),
        "merge": merge,
        "license": _field(meta, "license", "modelspec.license"),
    }


# --------------------------------------------------------------------------------- run content


def _read_recipe(path: Path):
    from selma_toolkit.config.recipes import RunRecipe
    from selma_toolkit.recipe import load_recipe

    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        log.warning("%s: not used for the model card (%s)", path, exc)
        return None
    return recipe if isinstance(recipe, RunRecipe) else None


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    try:
        return len(read_jsonl(path))
    except DatasetError as exc:
        log.warning("%s: not counted (%s)", path, exc)
        return None


def _score_rows(scores: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten scores.json into (key path, number) rows; its exact shape belongs to the evaluate stage."""
    if isinstance(scores, bool):
        return []
    if isinstance(scores, (int, float)):
        return [(prefix, round(scores, 4))]
    rows: list[tuple[str, Any]] = []
    if isinstance(scores, dict):
        for key, value in scores.items():
            rows += _score_rows(value, f"{prefix} / {key}" if prefix else str(key))
    return rows


def sample_grid(images: list[Path], columns: int = 4, cell: int = 256) -> bytes:
    """A PNG grid of up to MAX_SAMPLES images, each fitted into a ``cell`` square."""
    from PIL import Image

    images = images[:MAX_SAMPLES]
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (cell * min(columns, len(images)), cell * rows), "white")
    for index, path in enumerate(images):
        with Image.open(path) as image:
            tile = image.convert("RGB")
            tile.thumbnail((cell, cell))
            grid.paste(tile, ((index % columns) * cell, (index // columns) * cell))
    out = io.BytesIO()
    grid.save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------------------- planning


def plan_upload(path: Path, repo_id: str) -> UploadPlan:
    """Everything one push uploads, README.md included. ``path``: a ``.safetensors`` file, or a run folder."""
    if path.is_file():
        check_safetensors_name(path.name, str(path))
        run = RunPaths(path.parent.parent) if path.parent.name in ("experts", "merged") else None
        loras = {path.name: path}
    elif path.is_dir():
        run = RunPaths(path)
        loras = {
            f"{sub}/{p.name}": p for sub in ("experts", "merged") for p in sorted((path / sub).glob("*.safetensors"))
        }
        if not loras:
            raise HubError(
                f"{path}: no experts/*.safetensors or merged/*.safetensors to push; train or merge first, or give a LoRA file"
            )
    else:
        raise HubError(f"{path}: no such file or folder; expected a .safetensors LoRA file or a run folder")

    files: dict[str, Path | bytes] = dict(loras)
    recipe = None
    if run is not None and run.recipe.is_file():
        recipe = _read_recipe(run.recipe)
        files["recipe.toml"] = run.recipe
    scores, images = None, []
    if path.is_dir():
        scores_path = run.eval_dir / "scores.json"
        if scores_path.is_file():
            files["eval/scores.json"] = scores_path
            try:
                scores = json.loads(scores_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                log.warning("%s: uploaded but not shown in the card (%s)", scores_path, exc)
        samples = (
            sorted(p for p in run.eval_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if run.eval_dir.is_dir()
            else []
        )
        if samples:
            files[SAMPLES_FILE] = sample_grid(samples)
            images.append(SAMPLES_FILE)
        report_dir = run.report.parent
        for chart in sorted(report_dir.glob("*.png")) if report_dir.is_dir() else []:
            files[f"report/{chart.name}"] = chart
            images.append(f"report/{chart.name}")

    facts = {name: lora_facts(lora_file_metadata(p)) for name, p in loras.items()}
    readme = render_model_card(
        repo_id, facts, recipe=recipe, run=run if path.is_dir() else None, scores=scores, images=images
    )
    files["README.md"] = readme.encode("utf-8")

    kinds = [("expert", "experts/"), ("merged LoRA", "merged/")]
    if path.is_file():
        message = f"Upload SELMA {'merged LoRA' if path.parent.name == 'merged' else 'expert'} {path.name}"
    else:
        counts = [
            f"{sum(n.startswith(prefix) for n in loras)} {kind}{'s' if kind == 'expert' else ''}"
            for kind, prefix in kinds
        ]
        message = f"Upload SELMA run {recipe.name if recipe else path.name}: {', '.join(counts)}"
    description = f"Pushed with selma-toolkit {__version__}. Files:\n" + "\n".join(f"- {name}" for name in files)
    return UploadPlan(files=files, commit_message=message, commit_description=description)


# ---------------------------------------------------------------------------------------- card


def render_model_card(
    repo_id: str,
    loras: dict[str, dict[str, Any]],
    *,
    recipe=None,
    run: RunPaths | None = None,
    scores: Any = None,
    images: list[str] | None = None,
) -> str:
    """README.md text: YAML metadata via ModelCardData, body from the ``hub/model_card.md`` template."""
    from huggingface_hub import ModelCard, ModelCardData

    from selma_toolkit.config.recipes import RunRecipe
    from selma_toolkit.recipe import load_skill_recipe

    first = next(iter(loras.values()))
    base_model = (recipe.base_model if recipe else None) or first["base_model"]
    architecture = next((f["architecture"] for f in loras.values() if f["architecture"]), None)
    if architecture is None and base_model and base_model.startswith("tiny:"):
        architecture = base_model.removeprefix("tiny:").split(":")[0]  # tiny:<family>[:<seed>]
    family = FAMILIES.get(architecture or "")  # None: a base model of no known family
    lora_skills = list(dict.fromkeys(s for f in loras.values() for s in f["skills"]))
    recipe_skills = {s.name: s for s in recipe.skills} if recipe else {}
    skill_names = lora_skills or list(recipe_skills)
    license_ = (recipe.license if recipe else None) or first["license"]
    if license_ is None:
        license_ = RunRecipe.model_fields["license"].default
        log.info(
            "no license recorded in the LoRA file or a recipe; the card says %s (the recipe default): edit it if wrong",
            license_,
        )

    skills = []
    for name in skill_names:
        skill = recipe_skills.get(name)
        description = skill.description if skill else None
        if skill is None and shipped_skill(name):
            # No run recipe came with the file: say what the skill is from the shipped recipe of that name.
            description = load_skill_recipe(name).description
        counts = {}
        if run is not None:
            counts = {
                "prompts": _count_lines(run.prompts(name)),
                "images": _count_lines(run.images(name) / "metadata.jsonl"),
            }
        skills.append({"name": name, "recipe": skill, "description": description, **counts})

    family_tag = family.hub_tag if family else "stable-diffusion"
    tags = ["lora", "text-to-image", family_tag, "selma", *skill_names]
    card_data = ModelCardData(
        # The Hub links base_model only to a repo id; a local folder or tiny: model is named in the body instead.
        base_model=base_model if base_model and REPO_ID.match(base_model) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license_,
        tags=list(dict.fromkeys(tags)),
    )
    lora_names = list(loras)
    main_file = next((n for n in lora_names if n.startswith("merged/")), lora_names[0])
    card = ModelCard.from_template(
        card_data,
        template_path=str(shipped_dir("hub") / "model_card.md"),
        repo_id=repo_id,
        title=f"SELMA {'merged expert' if main_file.startswith('merged/') or len(skill_names) > 1 else 'skill expert'}: "
        + (", ".join(skill_names) or repo_id.split("/")[1]),
        base_model=base_model,
        architecture=architecture,
        skills=skills,
        loras=[{"file": name, **facts} for name, facts in loras.items()],
        main_file=main_file,
        example_prompt=next((s["recipe"].seeds[0] for s in skills if s["recipe"]), None)
        or next(
            (load_skill_recipe(s["name"]).seeds[0] for s in skills if shipped_skill(s["name"])),
            "a photo of two apples on a table",
        ),
        recipe=recipe,
        # train.target_modules unset: the family's default layers (architectures.py), as training used them.
        lora_targets=recipe.train.denoiser_targets((family or FAMILIES["sd1"]).lora_targets) if recipe else [],
        has_recipe_file=recipe is not None,
        score_rows=_score_rows(scores)[:MAX_SCORE_ROWS] if scores is not None else [],
        images=images or [],
        version=__version__,
    )
    # Optional sections leave runs of blank lines that Jinja's whitespace control cannot remove cleanly.
    return re.sub(r"\n{3,}", "\n\n", str(card))

"""The layer weights of a whole model, listed from file headers and read one tensor at a time.

A model is a diffusers folder (``unet/``, ``transformer/``, ``text_encoder*/`` subfolders, each
with ``*.safetensors``, sharded with an index json, or ``.fp16`` variants) or a single-file
checkpoint in the original layout (``lora.ldm_names``). Only Linear and Conv weights count as
layers (2-D / 4-D ``.weight`` tensors, embeddings excepted); norms, biases and the VAE are not
listed. Weights are keyed by canonical module name (``unet.<path>``, ``text_encoder.text_model.<path>``),
so a folder and a single file of the same model list the same names.

Pickle files (``.bin``, ``.ckpt``...) are refused unless the caller opts in; then they are read
with torch's weights-only loader (memory-mapped where the file format allows).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selma_toolkit.architectures import COMPONENTS, FAMILIES, family_of_pipeline
from selma_toolkit.errors import ModelError, Remedy
from selma_toolkit.lora.core import canonical_module_name
from selma_toolkit.lora.ldm_names import layers_per_block, map_single_file_key, other_layout, single_file_family
from selma_toolkit.lora.safetensors_file import PICKLE_SUFFIXES, read_tensor, safetensors_header

# Module names that are embeddings (a 2-D weight, but no Linear): token / position tables, T5's.
_EMBEDDINGS = {
    "token_embedding",
    "position_embedding",
    "positional_embedding",
    "embed_tokens",
    "shared",
    "relative_attention_bias",
    "pos_embed",
}
_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers, transformers, transformers' pickles
_VARIANT = re.compile(r"\.(fp16|bf16)(?:-\d+-of-\d+)?\.(safetensors|bin)$|\.index\.(fp16|bf16)\.json$")
PICKLE_OPT_IN = Remedy.set("allow_pickle", True, note="to read pickles with torch's weights-only loader")
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


@dataclass(frozen=True)
class TensorSource:
    """Where one layer weight lies: ``key`` of ``file`` (only ``rows`` of it, or transposed, for
    a fused or transposed original-layout tensor); ``shape`` is the layer's weight shape."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str  # as stored: "F16", "BF16", "F32"...
    rows: tuple[int, int] | None = None
    transpose: bool = False
    offset: int = 0  # where its data starts in the file: reading in this order reads each file front to back


@dataclass
class ModelWeights:
    """A model's layer weights (canonical module name -> :class:`TensorSource`), its family when
    known, and the files read; :meth:`read` returns one weight in its stored dtype."""

    label: str  # how messages name it: "the fine-tuned model 'x'"
    path: Path
    layout: str  # "diffusers" or "single-file"
    family: str | None
    weights: dict[str, TensorSource]
    files: list[Path]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _headers: dict[Path, tuple[dict[str, Any], int]] = field(default_factory=dict, repr=False)

    def components(self) -> set[str]:
        return {name.split(".", 1)[0] for name in self.weights}

    def in_file_order(self, names) -> list[str]:
        """``names`` in the order their data lies in this model's files."""
        index = {file: position for position, file in enumerate(self.files)}
        return sorted(names, key=lambda name: (index[self.weights[name].file], self.weights[name].offset, name))

    def dtypes(self) -> Counter[str]:
        """How many layer weights are stored in each dtype."""
        return Counter(source.dtype for source in self.weights.values())

    def read(self, name: str) -> torch.Tensor:
        """The weight of layer ``name`` as the layer holds it ([out, in] or [out, in, kh, kw])."""
        source = self.weights[name]
        if source.file.suffix.lower() == ".safetensors":
            if source.file not in self._handles:
                self._handles[source.file] = open(source.file, "rb")  # noqa: SIM115 - closed by close()
            entries, data_start = self._headers[source.file]
            tensor = read_tensor(self._handles[source.file], entries[source.key], data_start)
        else:
            tensor = self._handles[source.file][source.key]
        if source.rows is not None:
            tensor = tensor[source.rows[0] : source.rows[1]]
        if source.transpose:
            tensor = tensor.T
        return tensor.contiguous()

    def close(self) -> None:
        for handle in self._handles.values():
            if hasattr(handle, "close"):
                handle.close()
        self._handles.clear()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_layer_weight(module: str, shape: tuple[int, ...]) -> bool:
    """A Linear ([out, in]) or Conv ([out, in, kh, kw]) weight, not an embedding table."""
    return len(shape) in (2, 4) and module.rsplit(".", 1)[-1] not in _EMBEDDINGS


def open_model_weights(
    path: str | Path, label: str, *, components: set[str] | None = None, allow_pickle: bool = False
) -> ModelWeights:
    """List the layer weights of the model at ``path`` (a diffusers folder or a single-file
    checkpoint) without reading them; ``components`` restricts the model parts listed.
    ``label`` names the model in messages. Pickle files need ``allow_pickle``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _open_folder(path, label, components, allow_pickle)
    if path.is_file():
        return _open_single_file(path, label, components, allow_pickle)
    raise ModelError(f"{label}: {path} is neither a diffusers folder nor a checkpoint file")


# ------------------------------------------------------------------------------ diffusers folder


def _open_folder(folder: Path, label: str, wanted: set[str] | None, allow_pickle: bool) -> ModelWeights:
    index = _read_json(folder / "model_index.json", label) if (folder / "model_index.json").is_file() else {}
    present = [c for c in COMPONENTS if (folder / c).is_dir() and (not index or c in index)]
    if not present:
        raise ModelError(
            f"{label}: {folder} has no model part folder ({', '.join(COMPONENTS)}); expected a diffusers "
            "model folder (as save_pretrained writes it) or a single-file .safetensors checkpoint"
        )
    weights: dict[str, TensorSource] = {}
    files: list[Path] = []
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    handles: dict[Path, Any] = {}
    for component in present:
        if wanted is not None and component not in wanted:
            continue
        for file in _weight_files(folder / component, label, allow_pickle):
            files.append(file)
            for key, shape, dtype, offset in _tensor_entries(file, headers, handles):
                if key.endswith(".weight"):
                    module = canonical_module_name(component, key[: -len(".weight")])
                    if is_layer_weight(module, shape):
                        weights[module] = TensorSource(file, key, shape, dtype, offset=offset)
    denoiser = next((c for c in present if c in ("unet", "transformer")), None)
    config = (
        _read_json(folder / denoiser / "config.json", label)
        if denoiser and (folder / denoiser / "config.json").is_file()
        else {}
    )
    family = family_of_pipeline(index.get("_class_name", ""), config).name if config else None
    return ModelWeights(label, folder, "diffusers", family, weights, files, handles, headers)


def _weight_files(folder: Path, label: str, allow_pickle: bool) -> list[Path]:
    """A component's weight files: full precision first, else an fp16 / bf16 variant (what a
    Hub download of the variant leaves); sharded files through their index."""
    for suffix in (".safetensors", ".bin"):
        if suffix == ".bin" and not allow_pickle:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise ModelError(
                    what=f"holds its weights only in pickle files ({', '.join(pickles[:3])}), and loading a pickle "
                    "can run arbitrary code",
                    where=(label, f"{folder.name}/"),
                    remedies=[PICKLE_OPT_IN],
                )
            break
        for variant in ("", ".fp16", ".bf16"):
            for stem in _STEMS:
                index_file = folder / f"{stem}{suffix}.index{variant}.json"
                if index_file.is_file():
                    shards = sorted(set(_read_json(index_file, label).get("weight_map", {}).values()))
                    missing = [s for s in shards if not (folder / s).is_file()]
                    if missing:
                        raise ModelError(
                            f"{label}: {index_file.name} lists {missing[0]}, which is not in {folder}; "
                            "the download is incomplete"
                        )
                    return [folder / s for s in shards]
                single = folder / f"{stem}{variant}{suffix}"
                if single.is_file():
                    return [single]
    raise ModelError(
        f"{label}: {folder} holds no weight file (diffusion_pytorch_model.safetensors, model.safetensors "
        "or their .fp16 variants)"
    )


# ----------------------------------------------------------------------------------- single file


def _open_single_file(file: Path, label: str, wanted: set[str] | None, allow_pickle: bool) -> ModelWeights:
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    handles: dict[Path, Any] = {}
    if file.suffix.lower() != ".safetensors" and not allow_pickle:
        raise ModelError(
            what=f"a {file.suffix} file is a Python pickle, and loading one can run arbitrary code; give a "
            ".safetensors checkpoint or the diffusers folder",
            where=(label, file.name),
            remedies=[PICKLE_OPT_IN],
        )
    entries = list(_tensor_entries(file, headers, handles))
    keys = [entry[0] for entry in entries]
    if other_layout(keys):
        raise ModelError(
            f"{label}: {file.name} is an SD 3 / Flux single-file checkpoint; single files are read for "
            "SD 1.x, SD 2.x and SDXL: give the model's diffusers folder or Hub id instead"
        )
    blocks = layers_per_block(keys)
    weights: dict[str, TensorSource] = {}
    for key, shape, dtype, offset in entries:
        for mapped in map_single_file_key(key, shape, blocks):
            layer_shape = shape if mapped.rows is None else (mapped.rows[1] - mapped.rows[0], *shape[1:])
            layer_shape = tuple(reversed(layer_shape)) if mapped.transpose else layer_shape
            component = mapped.module.split(".", 1)[0]
            if (wanted is None or component in wanted) and is_layer_weight(mapped.module, layer_shape):
                weights[mapped.module] = TensorSource(
                    file, key, layer_shape, dtype, mapped.rows, mapped.transpose, offset
                )
    if not weights:
        raise ModelError(
            f"{label}: {file.name} has no UNet or text-encoder weight in the original (LDM) layout "
            "(model.diffusion_model.*, cond_stage_model.*, conditioner.embedders.*); is it a LoRA or a VAE?"
        )
    family = single_file_family(keys) or _unet_family(weights)
    return ModelWeights(label, file, "single-file", family, weights, [file], handles, headers)


def _unet_family(weights: dict[str, TensorSource]) -> str | None:
    """A UNet-only checkpoint's family from its cross-attention width (768, 1024, 2048)."""
    widths = {s.shape[1] for name, s in weights.items() if name.endswith("attn2.to_k")}
    found = [f.name for f in FAMILIES.values() if f.denoiser == "unet" and f.cross_attention_dim in widths]
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------------------- files


def _tensor_entries(file: Path, headers: dict, handles: dict):
    """(key, shape, stored dtype, data offset) of every tensor in ``file``; headers (safetensors)
    or the loaded mapping (pickles) are kept for reading."""
    if file.suffix.lower() == ".safetensors":
        entries, _, data_start = safetensors_header(file)
        headers[file] = (entries, data_start)
        for key, entry in entries.items():
            yield key, tuple(int(d) for d in entry["shape"]), entry["dtype"], int(entry["data_offsets"][0])
        return
    tensors = _load_pickle(file)
    handles[file] = tensors
    for key, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor):
            yield key, tuple(tensor.shape), _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), 0


def _load_pickle(file: Path) -> dict[str, Any]:
    """A pickled state dict through torch's weights-only unpickler (no code runs), memory-mapped
    when the file is in torch's zip format; a checkpoint's ``state_dict`` entry when it has one."""
    try:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be mapped
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{file}: torch's weights-only loader refused or could not read it ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelError(
            f"{file}: expected a state dict (a mapping of names to tensors), found {type(loaded).__name__}"
        )
    return loaded


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{label}: {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{label}: {path}: expected a JSON object")
    return data


def variant_file(name: str) -> bool:
    """Whether a weight file name is an fp16 / bf16 variant (``model.fp16.safetensors``,
    ``diffusion_pytorch_model.fp16-00001-of-00002.safetensors``, ``....index.fp16.json``)."""
    return _VARIANT.search(name) is not None

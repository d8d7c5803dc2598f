"""LoRA files: every layout read into one internal form, written in the layouts diffusers and
ComfyUI load, and merged exactly. Needs only torch and safetensors (it runs inside ComfyUI).

The names below are imported on first use (PEP 562), so that torch-free parts such as the merge
method table (``lora/merging/methods.py``, read by recipe.py and the CLI at startup) can be
imported without torch."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "core": ("COMPONENTS", "LoraModule", "LoraWeights", "canonical_module_name"),
    "files": ("WRITE_FORMATS", "LoraFileInfo", "inspect_lora", "load_lora", "lora_from_state_dict", "lora_to_state_dict",
              "save_lora"),
    "safetensors_file": ("read_safetensors",),
    "metadata": ("file_metadata", "guess_architecture", "lora_metadata", "metadata_value"),
    "merge": ("MERGE_METHODS", "merge_experts", "merge_files"),
    "incremental": ("add_to_merge",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "COMPONENTS", "LoraModule", "LoraWeights", "canonical_module_name",
    "WRITE_FORMATS", "LoraFileInfo", "inspect_lora", "load_lora", "lora_from_state_dict", "lora_to_state_dict",
    "read_safetensors", "save_lora",
    "file_metadata", "guess_architecture", "lora_metadata", "metadata_value",
    "MERGE_METHODS", "merge_experts", "merge_files", "add_to_merge",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once: later lookups (and monkeypatch) see a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

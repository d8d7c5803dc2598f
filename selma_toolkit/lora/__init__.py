"""LoRA files: every layout read into one internal form, written in the layouts diffusers and
ComfyUI load, and merged exactly. Needs only torch and safetensors (it runs inside ComfyUI).

The names below are imported on first use (PEP 562), so that torch-free parts such as the merge
method table (``lora/merging/methods.py``, read by recipe.py and the CLI at startup) can be
imported without torch."""

from selma_toolkit.lazy import lazy_exports

_EXPORTS = {
    "core": ("COMPONENTS", "LoraModule", "LoraWeights", "canonical_module_name"),
    "files": ("WRITE_FORMATS", "LoraFileInfo", "inspect_lora", "load_lora", "lora_from_state_dict", "lora_to_state_dict",
              "save_lora"),
    "safetensors_file": ("read_safetensors",),
    "metadata": ("file_metadata", "guess_architecture", "lora_metadata", "metadata_value"),
    "merge": ("MERGE_METHODS", "merge_experts", "merge_files"),
    "incremental": ("add_to_merge",),
}

__all__ = [
    "COMPONENTS", "LoraModule", "LoraWeights", "canonical_module_name",
    "WRITE_FORMATS", "LoraFileInfo", "inspect_lora", "load_lora", "lora_from_state_dict", "lora_to_state_dict",
    "read_safetensors", "save_lora",
    "file_metadata", "guess_architecture", "lora_metadata", "metadata_value",
    "MERGE_METHODS", "merge_experts", "merge_files", "add_to_merge",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

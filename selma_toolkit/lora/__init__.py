"""LoRA files: every layout read into one internal form, written in the layouts diffusers and
ComfyUI load, and merged exactly. Needs only torch and safetensors (it runs inside ComfyUI).

The merge method table, which the recipe and the CLI read at startup without torch, is
``selma_toolkit/config/merge_methods.py``."""

from selma_toolkit.lora.core import COMPONENTS, LoraModule, LoraWeights, canonical_module_name
from selma_toolkit.lora.files import (
    WRITE_FORMATS,
    LoraFileInfo,
    inspect_lora,
    load_lora,
    lora_from_state_dict,
    lora_to_state_dict,
    save_lora,
)
from selma_toolkit.lora.incremental import add_to_merge
from selma_toolkit.lora.merge import MERGE_METHODS, merge_experts, merge_files
from selma_toolkit.lora.metadata import file_metadata, guess_architecture, lora_metadata, metadata_value
from selma_toolkit.lora.safetensors_file import read_safetensors

__all__ = [
    "COMPONENTS",
    "MERGE_METHODS",
    "WRITE_FORMATS",
    "LoraFileInfo",
    "LoraModule",
    "LoraWeights",
    "add_to_merge",
    "canonical_module_name",
    "file_metadata",
    "guess_architecture",
    "inspect_lora",
    "load_lora",
    "lora_from_state_dict",
    "lora_metadata",
    "lora_to_state_dict",
    "merge_experts",
    "merge_files",
    "metadata_value",
    "read_safetensors",
    "save_lora",
]

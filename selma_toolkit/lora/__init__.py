"""LoRA files: every layout read into one internal form, written in the layouts diffusers and
ComfyUI load, and merged exactly. Needs only torch and safetensors (it runs inside ComfyUI)."""

from selma_toolkit.lora.core import COMPONENTS, LoraModule, LoraWeights, canonical_module_name

__all__ = ["COMPONENTS", "LoraModule", "LoraWeights", "canonical_module_name"]

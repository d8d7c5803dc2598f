"""Thin layers that attach SELMA experts to other libraries; every formula stays in selma_toolkit.lora."""

# ``selma_toolkit.adapters.diffusers.load_experts``: merged experts as one diffusers adapter;
# ``selma_toolkit.adapters.moe.load_moe`` / ``unload_moe``: a MoE-LoRA (experts kept apart, a learned gate).

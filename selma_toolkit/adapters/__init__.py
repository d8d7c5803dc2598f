"""Thin layers that attach SELMA experts to other libraries; every formula stays in selma_toolkit.lora."""

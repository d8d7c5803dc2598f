"""Stage 1: skill prompts from an LLM (any OpenAI-compatible endpoint) or an offline grammar,
de-duplicated with exact ROUGE-L, written resumably to prompts.jsonl."""

from selma_toolkit.lazy import lazy_exports

# Imported on first use (selma_toolkit/lazy.py): recipe.py imports prompts/settings.py.
__all__ = ["PromptStats", "generate_prompts"]
__getattr__, __dir__ = lazy_exports(__name__, {"generate": ("PromptStats", "generate_prompts")}, globals())

"""Stage 1: skill prompts from an LLM (any OpenAI-compatible endpoint) or an offline grammar,
de-duplicated with exact ROUGE-L, written resumably to prompts.jsonl."""

from selma_toolkit.prompts.generate import PromptStats, generate_prompts

__all__ = ["PromptStats", "generate_prompts"]

"""User-facing errors. The CLI prints their message and exits non-zero without a traceback;
any other exception is a bug and keeps its traceback.

A message names the file, field or key, what was found, what was expected, and the next step.
"""


class SelmaError(Exception):
    """Base class for every error caused by the user's input or environment."""


class RecipeError(SelmaError):
    """A recipe file is missing, malformed or holds an invalid value."""


class LoraFormatError(SelmaError):
    """A LoRA file cannot be read, written or merged as asked."""


class DatasetError(SelmaError):
    """A prompt file or image dataset is missing or malformed."""


class TrainingError(SelmaError):
    """Training cannot go on: a checkpoint cannot be written or read (disk full, damaged folder)."""


class ModelError(SelmaError):
    """A base model cannot be found or loaded."""


class EndpointError(SelmaError):
    """An LLM endpoint is misconfigured, unreachable or keeps answering garbage."""


class HubError(SelmaError):
    """A Hugging Face Hub operation failed or was refused."""

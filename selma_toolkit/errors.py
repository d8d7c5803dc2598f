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


class OutputError(SelmaError):
    """An output file or folder cannot be written where it was asked for (a file in the way, no permission)."""


class FolderLockedError(SelmaError):
    """Another process holds the lock of a run folder (two `selma run` on one folder at once)."""


class DiskFullError(OutputError, OSError):
    """No space left (or quota exceeded) while writing an output; also an OSError (with ``errno``
    and ``strerror``), so code that handles failed writes (training checkpoints) keeps handling it."""

    def __str__(self) -> str:
        # OSError's own __str__ would print "[Errno 28] ..." once errno and strerror are set.
        return str(self.args[0]) if self.args else ""

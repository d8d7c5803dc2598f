"""User-facing errors. The CLI prints their message as one line and exits with the error's
``exit_code`` without a traceback (``--verbose`` logs it); any other exception is a bug and keeps
its traceback.

Exit codes: 2 for input errors (:class:`InputError`: a bad recipe, file, argument value, repo id
or output path: the command cannot work until the user changes what they gave, as with click's
own usage errors), 1 for runtime errors (the input was fine but the environment failed: an
unreachable endpoint, a full disk, a held lock, a failed training step).

A message names the file, field or key, what was found, what was expected, and the next step.
"""


class SelmaError(Exception):
    """Base class for every error caused by the user's input or environment; as such a runtime error."""

    exit_code: int = 1


class InputError(SelmaError):
    """What the user gave (an argument value, a recipe, a file, a name) is wrong; exit code 2."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe file is missing, malformed or holds an invalid value."""


class LoraFormatError(InputError):
    """A LoRA file cannot be read, written or merged as asked."""


class DatasetError(InputError):
    """A prompt file or image dataset is missing or malformed."""


class TrainingError(SelmaError):
    """Training cannot go on: a checkpoint cannot be written or read (disk full, damaged folder)."""


class ModelError(InputError):
    """A base model cannot be found or loaded. An input error: nearly every one is a reference that
    names no usable model (a failed model download is reported the same way, so it exits 2 too)."""


class EndpointError(SelmaError):
    """An LLM endpoint is misconfigured, unreachable or keeps answering garbage. A runtime error:
    the recipe names an endpoint, and what it does (or the key the environment holds) is outside it."""


class HubError(SelmaError):
    """A Hugging Face Hub operation failed or was refused (unreachable, HTTP error, no token, a
    download that fails its check): a runtime error; what the user wrote wrong is a HubInputError."""


class HubInputError(HubError, InputError):
    """A repo id, a file name in a repo, a catalog name or a catalog file that is not valid."""

    exit_code = 2


class ModelDownloadError(SelmaError):
    """A model's files could not be fetched from the Hub although the reference may be right (no
    network, a server error, offline mode without a cached copy): a runtime failure, unlike a
    reference that names no model (``ModelError``)."""


class OutputError(InputError):
    """An output file or folder cannot be written where it was asked for (a file in the way, no permission)."""


class FolderLockedError(SelmaError):
    """Another process holds the lock of a run folder (two `selma run` on one folder at once)."""


class DiskFullError(SelmaError, OSError):
    """No space left (or quota exceeded) while writing an output; also an OSError (with ``errno``
    and ``strerror``), so code that handles failed writes (training checkpoints) keeps handling it."""

    def __str__(self) -> str:
        # OSError's own __str__ would print "[Errno 28] ..." once errno and strerror are set.
        return str(self.args[0]) if self.args else ""

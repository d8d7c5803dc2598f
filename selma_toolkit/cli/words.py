"""Errors in the command line's words: an option is its flag (``--rank``), a remedy a flag to give or
drop ("drop --rank or use --method svd"). The library's errors carry the option's library name
(selma_toolkit/errors.py); this is the one place that spells them as flags."""

from __future__ import annotations

import shlex
from typing import Any

from selma_toolkit.errors import SelmaError, Words

# Library names whose flag is not --<name with dashes>.
_FLAGS = {"overrides": "--set", "filename": "--file", "expert_files": "--expert"}
# Options no command has as a flag: the environment variable that sets them.
_ENVIRONMENT = {"endpoint": "HF_ENDPOINT", "benchmark_url": "SELMA_BENCHMARK_URL"}


class CliWords(Words):
    """Options as ``selma`` flags."""

    def option(self, name: str) -> str:
        return _ENVIRONMENT.get(name) or _FLAGS.get(name) or "--" + name.replace("_", "-")

    def located(self, name: str, value: Any) -> str:
        return f"{self.option(name)} {_shell_word(value)}"

    def setting(self, name: str, value: Any) -> str:
        if value is True:
            return self.option(name)
        return f"{self.option(name)} {_shell_word(value) if value is not None else name.upper()}"

    def set(self, settings) -> str:
        return "use " + " ".join(self.setting(name, value) for name, value in settings)

    def unset(self, name: str) -> str:
        return f"drop {self.option(name)}"

    def change(self, name: str, noun: str) -> str:
        return f"choose another {self.option(name)}"

    def give(self, name: str, example: Any, noun: str) -> str:
        text = f"give {noun} with {self.option(name)}" if noun else f"give {self.option(name)}"
        return text + (f" (e.g. {example})" if example is not None else "")

    def check(self, name: str, noun: str) -> str:
        if name in _ENVIRONMENT:
            return f"check the {noun} in {_ENVIRONMENT[name]}"
        return f"check the {noun} given with {self.option(name)}"


CLI_WORDS = CliWords()


def cli_message(error: SelmaError) -> str:
    """``error``'s message as the command line shows it."""
    return error.render(CLI_WORDS)


def _shell_word(value: Any) -> str:
    """A value as it is typed on a command line (quoted only when the shell needs it)."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shell_word(item) for item in value)
    return shlex.quote(str(value))

"""Errors in a graph's words: an option is a node input ("the rank input"), a remedy an input to set
("set the rank input to 0 or set the method input to svd"). The library's errors carry the option's
library name (selma_toolkit/errors.py); this table is the one place that maps them to the nodes'
inputs. A remedy naming an option that no node has is left out, unless `selma lora convert` has it
(the file is then converted outside ComfyUI)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from selma_toolkit.errors import Remedy, SelmaError, Words

# Library option -> the node input that sets it (SELMA Merge Experts, SELMA Hub Expert, SELMA Save LoRA).
INPUTS = {
    "method": "method",
    "rank": "rank",
    "density": "density",
    "seed": "dare_seed",
    "normalize": "normalize_weights",
    "block_weights": "block_weights",
    "weights": "weight",
    "ref": "ref",
    "revision": "revision",
    "endpoint": "endpoint",
    "catalog": "catalog",
    "format": "format",
    "filename_prefix": "filename_prefix",
}
# What an input holds when its option is left unset, and what that value means.
UNSET_VALUES = {"rank": ("0", "the experts' largest rank")}
EMPTY_MEANS = {
    "endpoint": "empty: HF_ENDPOINT, else huggingface.co",
    "revision": "empty: the catalog's pin, else main",
    "catalog": "besides the files in SELMA_CATALOG",
}
# Options of a LoRA file's reading that only `selma lora convert` has: the file is converted outside ComfyUI.
CONVERT_OPTIONS = {"drop_bias_diffs", "component"}


class NodeWords(Words):
    """Options as the SELMA nodes' inputs."""

    def option(self, name: str) -> str:
        return f"the {INPUTS.get(name, name)} input"

    def located(self, name: str, value: Any) -> str:
        return f"{self.option(name)} ({value})"

    def setting(self, name: str, value: Any) -> str:
        if value is None:
            unset = UNSET_VALUES.get(name)
            return f"{self.option(name)} to a value of your choice" + (f" ({unset[0]}: {unset[1]})" if unset else "")
        return f"{self.option(name)} to {value}"

    def unset(self, name: str) -> str:
        if name in UNSET_VALUES:
            return f"set {self.option(name)} to {UNSET_VALUES[name][0]}"
        return f"clear {self.option(name)}"

    def change(self, name: str, noun: str) -> str:
        return f"choose another {noun} in {self.option(name)}" if noun else f"change {self.option(name)}"

    def give(self, name: str, example: Any, noun: str) -> str:
        text = f"give {noun} in {self.option(name)}" if noun else f"fill in {self.option(name)}"
        text += f" ({EMPTY_MEANS[name]})" if name in EMPTY_MEANS else ""
        return text + (f" (e.g. {example})" if example is not None else "")

    def check(self, name: str, noun: str) -> str:
        return f"check the {noun} in {self.option(name)}" + (f" ({EMPTY_MEANS[name]})" if name in EMPTY_MEANS else "")

    def offers(self, remedy: Remedy) -> bool:
        return all(name in INPUTS or name in CONVERT_OPTIONS for name in remedy.options)

    def remedy(self, remedy: Remedy) -> str:
        if remedy.action == "set" and set(remedy.options) <= CONVERT_OPTIONS:
            # No node reads these options: the file is converted first, by the command that has them.
            options = " and ".join(
                f"its {name.replace('_', '-')} option" + ("" if value is True else f" set to {value}")
                for name, value in ((remedy.option, remedy.value), *remedy.also)
            )
            return f"convert the file with `selma lora convert` and {options}"
        return super().remedy(remedy)


NODE_WORDS = NodeWords()


@contextlib.contextmanager
def node_errors(node: str | None = None) -> Iterator[None]:
    """Word a SelmaError raised in the block as the nodes' inputs (same error, same class), named after
    ``node`` (its display name) when given; ComfyUI shows ``str(error)`` on the failing node."""
    try:
        yield
    except SelmaError as error:
        error.words = NODE_WORDS
        if node is not None:
            error.within(node)
        raise

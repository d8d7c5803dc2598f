"""One declaration per node, read by both of ComfyUI's node APIs.

A :class:`NodeSpec` says what a node is (id, display name, description, inputs, outputs, the
function that runs it, an optional fingerprint for re-runs); ``v1.py`` turns it into a classic
class (``INPUT_TYPES``, ``RETURN_TYPES``, ``IS_CHANGED``...) and ``v3.py`` into a
``comfy_api`` ``io.ComfyNode`` (``define_schema``, ``execute``, ``fingerprint_inputs``). Neither
module holds a node's behaviour; this one imports nothing from ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")  # anything else is a socket type (MODEL, LORA_MODEL...)


@dataclass(frozen=True)
class Input:
    """One input. ``kind``: a widget in :data:`WIDGETS` or a socket type. ``choices``: a COMBO's
    values, or a function that lists them when ComfyUI asks (the loras folder changes)."""

    name: str
    kind: str
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    multiline: bool = False
    optional: bool = False

    def options(self) -> list[str]:
        """A COMBO's values now."""
        return list(self.choices() if callable(self.choices) else self.choices or ())


@dataclass(frozen=True)
class Output:
    """One output: its type, name and tooltip."""

    kind: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class Result:
    """What a node's function returns: the outputs' values, and what the node shows (``ui``: ComfyUI's
    output message, e.g. {"text": [...]}, which the pack's web extension writes on the node)."""

    values: tuple = ()
    ui: dict[str, list] | None = None


@dataclass(frozen=True)
class NodeSpec:
    """A node, for ComfyUI's V1 (classic) and V3 (``comfy_api``) node APIs alike.

    ``run`` is called with every input as a keyword (optional ones only when connected or set) and
    returns a :class:`Result`. ``fingerprint``, when given, is called with the widget inputs before
    a re-run: ComfyUI runs the node again only when it returns something new (V1 ``IS_CHANGED``,
    V3 ``fingerprint_inputs``)."""

    node_id: str
    display_name: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    run: Callable[..., Result]
    fingerprint: Callable[..., Any] | None = None
    output_node: bool = False
    category: str = "SELMA"

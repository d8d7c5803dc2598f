"""The nodes as ``comfy_api`` V3 nodes (``io.ComfyNode``), made from each :class:`~.spec.NodeSpec`, and
the ``comfy_entrypoint`` that ComfyUI calls for them.

The API is the pinned version ``comfy_api.v0_0_2`` (``comfy_api.latest`` is marked unstable and
changes under a pack). ``__init__.py`` imports this module only where that version exists; elsewhere
the pack exports the classic classes of ``v1.py``.
"""

from __future__ import annotations

from typing import Any

from comfy_api.v0_0_2 import ComfyExtension, io

from .nodes import NODES
from .spec import Input, NodeSpec, Result


def schema_input(spec: Input) -> Any:
    """An input as a V3 ``io`` input."""
    common = {"tooltip": spec.tooltip, "optional": spec.optional}
    numbers = {key: value for key in ("min", "max", "step") if (value := getattr(spec, key)) is not None}
    if spec.kind == "INT":
        return io.Int.Input(spec.name, default=spec.default, **numbers, **common)
    if spec.kind == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, **numbers, **common)
    if spec.kind == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if spec.kind == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.kind == "COMBO":
        return io.Combo.Input(spec.name, options=spec.options(), default=spec.default, **common)
    return io.Custom(spec.kind).Input(spec.name, **common)


def node_class(spec: NodeSpec) -> type[io.ComfyNode]:
    """The V3 node class of ``spec`` (named after its id)."""

    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[schema_input(item) for item in spec.inputs],
            outputs=[
                io.Custom(output.kind).Output(display_name=output.name, tooltip=output.tooltip)
                for output in spec.outputs
            ],
            is_output_node=spec.output_node,
        )

    def execute(cls, **inputs: Any) -> io.NodeOutput:
        result: Result = spec.run(**inputs)
        return io.NodeOutput(*result.values, ui=result.ui)

    attributes: dict[str, Any] = {
        "__doc__": spec.description,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
        "SPEC": spec,
    }
    if spec.fingerprint is not None:
        fingerprint = spec.fingerprint
        attributes["fingerprint_inputs"] = classmethod(lambda cls, **inputs: fingerprint(**inputs))
    return type(spec.node_id, (io.ComfyNode,), attributes)


class SelmaExtension(ComfyExtension):
    """The SELMA nodes, for ComfyUI's V3 loader."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node_class(spec) for spec in NODES]


async def comfy_entrypoint() -> SelmaExtension:
    """What ComfyUI's loader calls when a pack exports no NODE_CLASS_MAPPINGS."""
    return SelmaExtension()

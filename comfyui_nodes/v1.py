"""The nodes as ComfyUI's classic (V1) classes, which every ComfyUI release loads: ``INPUT_TYPES``,
``RETURN_TYPES``, ``FUNCTION``, ``IS_CHANGED`` made from each :class:`~.spec.NodeSpec`."""

from __future__ import annotations

from typing import Any

from .nodes import NODES
from .spec import Input, NodeSpec, Result


def input_type(spec: Input) -> tuple[Any, dict[str, Any]]:
    """An input as INPUT_TYPES writes it: (type or the COMBO's list of values, options)."""
    options: dict[str, Any] = {"tooltip": spec.tooltip}
    if spec.default is not None:
        options["default"] = spec.default
    options.update({key: value for key in ("min", "max", "step") if (value := getattr(spec, key)) is not None})
    if spec.multiline:
        options["multiline"] = True
    return (spec.options() if spec.kind == "COMBO" else spec.kind), options


def node_class(spec: NodeSpec) -> type:
    """The classic node class of ``spec`` (named after its id)."""

    def input_types(cls) -> dict[str, dict[str, tuple]]:
        sections: dict[str, dict[str, tuple]] = {"required": {}}
        for item in spec.inputs:
            sections.setdefault("optional" if item.optional else "required", {})[item.name] = input_type(item)
        return sections

    def run(self, **inputs: Any) -> dict[str, Any] | tuple:
        result: Result = spec.run(**inputs)
        return {"ui": result.ui, "result": result.values} if result.ui is not None else result.values

    attributes: dict[str, Any] = {
        "__doc__": spec.description,
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "RETURN_TYPES": tuple(output.kind for output in spec.outputs),
        "RETURN_NAMES": tuple(output.name for output in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(output.tooltip for output in spec.outputs),
        "OUTPUT_NODE": spec.output_node,
        "FUNCTION": "run",
        "INPUT_TYPES": classmethod(input_types),
        "run": run,
        "SPEC": spec,
    }
    if spec.fingerprint is not None:
        fingerprint = spec.fingerprint
        attributes["IS_CHANGED"] = classmethod(lambda cls, **inputs: fingerprint(**inputs))
    return type(spec.node_id, (), attributes)


def mappings(specs: list[NodeSpec]) -> tuple[dict[str, type], dict[str, str]]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS of ``specs``."""
    return {spec.node_id: node_class(spec) for spec in specs}, {spec.node_id: spec.display_name for spec in specs}


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(NODES)

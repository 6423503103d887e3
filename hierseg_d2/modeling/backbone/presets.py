"""Named variants of a backbone family chosen by ``MODEL.<FAMILY>.PRESET`` and overridable field by field.

A family's config node holds ``PRESET`` plus one key per constructor argument (upper case). A key left
at its "unset" default ([] for lists, -1 / -1.0 for numbers, "" for strings) takes the preset's value;
anything else overrides it. Booleans cannot be unset, so they are not part of presets.
"""
from typing import Any, Dict, Mapping

from detectron2.config import CfgNode

__all__ = ["UNSET", "is_unset", "resolve_preset"]

UNSET = ([], -1, -1.0, "")


def is_unset(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return value == -1 or value == ""


def resolve_preset(node: CfgNode, presets: Mapping[str, Mapping[str, Any]], node_name: str) -> Dict[str, Any]:
    """Constructor kwargs: the preset ``node.PRESET`` updated by every key of ``node`` that is set."""
    name = node.PRESET
    if name not in presets:
        raise KeyError(f"{node_name}.PRESET = {name!r} is not a known preset; choose one of {sorted(presets)}")
    kwargs = dict(presets[name])
    for key, value in node.items():
        if key == "PRESET" or isinstance(value, CfgNode) or is_unset(value):
            continue
        kwargs[key.lower()] = tuple(value) if isinstance(value, list) else value
    return kwargs

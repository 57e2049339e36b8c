"""Small fx helpers shared by the passes (attribute access, unique names, public layer names)."""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import fx, nn

__all__ = ["get_attr_value", "add_param", "drop_attr_if_unused", "sanitize", "unique_attr",
           "public_name"]


def get_attr_value(gm: fx.GraphModule, target: str):
    """The tensor (or module) a ``get_attr`` target names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def sanitize(name: str) -> str:
    """A Python identifier made from a public node name (``conv1/Conv`` → ``conv1_Conv``)."""
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else f"_{s}"


def unique_attr(gm: fx.GraphModule, base: str) -> str:
    """``base`` or ``base_1``, ``base_2``, ... — a name not yet used on the root module."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def add_param(gm: fx.GraphModule, base: str, value: torch.Tensor, trainable: bool = True) -> str:
    """Register ``value`` on the root as a Parameter (or buffer) under a fresh name; return it."""
    name = unique_attr(gm, sanitize(base))
    if trainable:
        gm.register_parameter(name, nn.Parameter(value.detach().clone()))
    else:
        gm.register_buffer(name, value.detach().clone())
    return name


def drop_attr_if_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase a ``get_attr`` node without users and delete its attribute when no other
    ``get_attr`` reads the same target."""
    if node.op != "get_attr" or node.users:
        return
    target = node.target
    gm.graph.erase_node(node)
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_path, _, attr = target.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
    except AttributeError:
        pass


def public_name(node: fx.Node) -> str:
    """The config.json key of a node: its ONNX name for imported models, the module path for
    functionalized ``call_module`` layers, else the fx name."""
    name: Optional[str] = node.meta.get("onnx_name") or node.meta.get("public_name")
    return name if name else node.name

"""``aten.scaled_dot_product_attention`` → its two MatMuls and the softmax between them.

``torch.export`` keeps ``F.scaled_dot_product_attention`` as one node, which hides the attention
MatMuls (Q·Kᵀ and A·V) from discovery: they could be neither searched nor lowered to integer
kernels. ``decompose_sdpa`` rewrites each such node into the math the operator is defined by::

    A = softmax(Q·Kᵀ · scale + mask, -1);  out = A·V

with ``scale`` = the given one or 1/sqrt(E) (E: the head dim, static), a boolean mask as
``-inf`` where False, a float mask added, ``is_causal`` as a lower-triangular boolean mask. A
node with ``dropout_p`` ≠ 0 or ``enable_gqa`` stays one node (not searched), counted in the
result. The rewrite is exact up to float rounding (the fused kernel reorders the sums). The two
MatMuls are named ``<module path>.scores`` and ``<module path>.context`` (the module calling
SDPA; the node's name when export recorded none): the names config.json and reports show.
"""
from __future__ import annotations

import math

import torch
from torch import fx

__all__ = ["decompose_sdpa"]

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
             "enable_gqa": False}


def _args(node: fx.Node) -> dict:
    a = dict(_DEFAULTS)
    a.update(zip(_ARGS, node.args))
    a.update(node.kwargs)
    return a


def _head_dim(q: fx.Node):
    val = q.meta.get("val")
    dim = None if val is None else val.shape[-1]
    return int(dim) if isinstance(dim, int) or (dim is not None and str(dim).isdigit()) else None


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return path or node.name


def _emit(graph: fx.Graph, a: dict, owner: str):
    """The decomposed attention for one node's arguments (inserted at the current point)."""
    q, k, v = a["query"], a["key"], a["value"]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(_head_dim(q))
    kt = graph.call_function(aten.transpose.int, (k, -2, -1))
    scores = graph.call_function(aten.matmul.default, (q, kt))
    scores.meta["public_name"] = f"{owner}.scores"
    scores = graph.call_function(aten.mul.Tensor, (scores, float(scale)))
    mask = a["attn_mask"]
    if a["is_causal"]:
        ones = graph.call_function(aten.ones_like.default, (scores,), {"dtype": torch.bool})
        mask = graph.call_function(aten.tril.default, (ones,))
    if mask is not None:
        is_bool = a["is_causal"] or getattr(mask.meta.get("val"), "dtype", None) == torch.bool
        if is_bool:
            keep_out = graph.call_function(aten.logical_not.default, (mask,))
            scores = graph.call_function(aten.masked_fill.Scalar, (scores, keep_out, float("-inf")))
        else:
            scores = graph.call_function(aten.add.Tensor, (scores, mask))
    probs = graph.call_function(aten.softmax.int, (scores, -1))
    context = graph.call_function(aten.matmul.default, (probs, v))
    context.meta["public_name"] = f"{owner}.context"
    return context


def decompose_sdpa(gm: fx.GraphModule) -> dict:
    """Rewrite every decomposable SDPA node of ``gm`` in place (module docstring); returns
    ``{"decomposed": n, "kept": m}``."""
    done = kept = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        a = _args(node)
        if a["dropout_p"] or a["enable_gqa"] or (a["scale"] is None and _head_dim(a["query"]) is None):
            kept += 1
            continue
        with gm.graph.inserting_before(node):
            out = _emit(gm.graph, a, _owner(node))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return {"decomposed": done, "kept": kept}

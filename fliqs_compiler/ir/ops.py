"""Op-kind tables: which fx ``call_function`` targets are convs, linears, batch norms, ReLUs, ...

Both IR vocabularies are covered (docs/design.md): the ONNX importer's ``torch.nn.functional`` /
``torch`` callables and ``torch.export``'s aten overloads. Passes never compare targets
themselves; they ask :func:`spec_of` / :func:`kind_of` and read arguments by *name* with
:func:`get_arg` / :func:`set_arg`, so positional-vs-keyword differences disappear.

Adding an op is adding a table entry: ``OpSpec(kind, argument names in positional order,
defaults)``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["OpSpec", "spec_of", "kind_of", "get_arg", "set_arg", "QUANTIZABLE_KINDS",
           "NONNEG_KINDS", "TRANSPARENT_KINDS", "weight_axes", "is_constant"]

aten = torch.ops.aten

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                  "output_padding": 0}
_ATEN_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")


@dataclass(frozen=True)
class OpSpec:
    """One target: its kind, argument names (positional order) and default values."""

    kind: str
    args: tuple = ()
    defaults: dict = field(default_factory=dict)
    tuple_output: bool = False  # result is a tuple; the tensor is ``getitem(node, 0)``


_TABLE: dict[Any, OpSpec] = {}


def _add(kind: str, targets, args=(), defaults=None, tuple_output=False):
    spec = OpSpec(kind, tuple(args), dict(defaults or {}), tuple_output)
    for t in targets:
        _TABLE[t] = spec


# -- quantizable ---------------------------------------------------------------------------
_add("conv1d", [F.conv1d, torch.conv1d, aten.conv1d.default, aten.conv1d.padding], _CONV,
     _CONV_DEFAULTS)
_add("conv2d", [F.conv2d, torch.conv2d, aten.conv2d.default, aten.conv2d.padding], _CONV,
     _CONV_DEFAULTS)
_add("conv3d", [F.conv3d, torch.conv3d, aten.conv3d.default, aten.conv3d.padding], _CONV,
     _CONV_DEFAULTS)
_add("conv_transpose1d", [F.conv_transpose1d, torch.conv_transpose1d,
                          aten.conv_transpose1d.default], _CONVT, _CONV_DEFAULTS)
_add("conv_transpose2d", [F.conv_transpose2d, torch.conv_transpose2d,
                          aten.conv_transpose2d.input], _CONVT, _CONV_DEFAULTS)
_add("convolution", [aten.convolution.default, aten._convolution.default],
     _ATEN_CONVOLUTION, _CONV_DEFAULTS)
_add("linear", [F.linear, torch._C._nn.linear, aten.linear.default], ("input", "weight", "bias"),
     {"bias": None})
_add("matmul", [torch.matmul, operator.matmul, aten.matmul.default, aten.mm.default,
                aten.bmm.default, torch.mm, torch.bmm], ("input", "weight"))
# -- batch norm ----------------------------------------------------------------------------
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_add("batch_norm", [F.batch_norm], ("input", "running_mean", "running_var", "weight", "bias",
                                     "training", "momentum", "eps"), _BN_DEFAULTS)
_add("batch_norm", [aten.batch_norm.default, torch.batch_norm],
     ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
      "cudnn_enabled"), _BN_DEFAULTS)
_add("batch_norm", [aten._native_batch_norm_legit_no_training.default],
     ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
     _BN_DEFAULTS, tuple_output=True)
# -- activations / elementwise -------------------------------------------------------------
_add("relu", [F.relu, torch.relu, aten.relu.default, aten.relu_.default, F.relu_], ("input",))
_add("relu6", [F.relu6, aten.relu6.default], ("input",))
_add("hardtanh", [F.hardtanh, aten.hardtanh.default, aten.hardtanh_.default],
     ("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
_add("clamp", [torch.clamp, torch.clip, aten.clamp.default, aten.clip.default,
               aten.clamp_.default], ("input", "min", "max"), {"min": None, "max": None})
_add("sigmoid", [torch.sigmoid, F.sigmoid, aten.sigmoid.default], ("input",))
_add("softmax", [F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default],
     ("input", "dim"))
_add("layer_norm", [F.layer_norm, torch.layer_norm, aten.layer_norm.default],
     ("input", "normalized_shape", "weight", "bias", "eps"))
_add("gelu", [F.gelu, aten.gelu.default], ("input",), {"approximate": "none"})
_add("add", [operator.add, torch.add, aten.add.Tensor, aten.add_.Tensor], ("input", "other"))
_add("cat", [torch.cat, torch.concat, aten.cat.default, aten.concat.default], ("tensors", "dim"),
     {"dim": 0})
# ops that keep the sign of their (first) input: non-negativity flows through them
_add("shape_op", [torch.flatten, torch.reshape, aten.view.default, aten.reshape.default,
                  aten.flatten.using_ints, aten.slice.Tensor, aten.permute.default,
                  aten.transpose.int, aten.contiguous.default, aten.squeeze.dim,
                  aten.unsqueeze.default, aten.clone.default, aten.select.int,
                  operator.getitem, torch.permute, torch.transpose, torch.squeeze,
                  torch.unsqueeze, aten.t.default, aten.dropout.default, F.dropout],
     ("input",))
_add("pool", [F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
              F.adaptive_avg_pool2d, F.adaptive_max_pool2d, aten.max_pool2d.default,
              aten.max_pool2d_with_indices.default, aten.avg_pool2d.default,
              aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default,
              aten.mean.dim, torch.mean, aten.max_pool1d.default, aten.avg_pool1d.default,
              aten.upsample_nearest2d.vec, F.interpolate],
     ("input",))

QUANTIZABLE_KINDS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                     "linear", "matmul")
NONNEG_KINDS = ("relu", "relu6", "sigmoid", "softmax")  # output is >= 0 whatever the input
TRANSPARENT_KINDS = ("shape_op", "pool")  # output >= 0 when the input is


def spec_of(node: fx.Node) -> Optional[OpSpec]:
    """The table entry of a ``call_function`` node (None for other nodes / unknown targets)."""
    if node.op != "call_function":
        return None
    try:
        return _TABLE.get(node.target)
    except TypeError:  # unhashable target
        return None


def get_arg(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a known op (keyword, positional, or the table default)."""
    spec = spec_of(node)
    if spec is None:
        raise KeyError(f"{node.name}: unknown op {node.target}")
    if name in node.kwargs:
        return node.kwargs[name]
    if name in spec.args:
        i = spec.args.index(name)
        if i < len(node.args):
            return node.args[i]
    return spec.defaults.get(name, default)


def set_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of a known op (positional when it is positional, padding the
    positional list with table defaults where needed)."""
    spec = spec_of(node)
    if name in node.kwargs:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs
        return
    i = spec.args.index(name)
    args = list(node.args)
    if i < len(args):
        args[i] = value
    else:
        for j in range(len(args), i):
            missing = spec.args[j]
            if missing in node.kwargs:  # cannot go positional past a keyword: use a keyword
                kwargs = dict(node.kwargs)
                kwargs[name] = value
                node.kwargs = kwargs
                return
            args.append(spec.defaults.get(missing))
        args.append(value)
    node.args = tuple(args)


def kind_of(node: fx.Node) -> Optional[str]:
    """Kind of a node: a table kind, with ``aten.convolution`` resolved to conv / conv_transpose
    of the right rank (needs ``node.meta['shape']`` of the weight for the rank)."""
    spec = spec_of(node)
    if spec is None:
        return None
    if spec.kind == "convolution":
        w = get_arg(node, "weight")
        rank = len(w.meta.get("shape", ())) - 2 if isinstance(w, fx.Node) else 2
        base = "conv_transpose" if get_arg(node, "transposed") else "conv"
        return f"{base}{max(rank, 1)}d"
    return spec.kind


def weight_axes(kind: str, weight_rank: int) -> tuple:
    """(output-channel axis, reduction axis) of a layer's weight tensor."""
    if kind.startswith("conv_transpose"):
        return 1, 0
    if kind.startswith("conv") or kind == "linear":
        return 0, 1
    if kind == "matmul":
        return weight_rank - 1, weight_rank - 2
    raise ValueError(kind)


def is_constant(node: Any) -> bool:
    """True if ``node`` depends only on parameters/buffers (get_attr) and literals, not on a
    graph input (a weight quantizer or a transpose of a parameter is still constant)."""
    if not isinstance(node, fx.Node):
        return True
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return False
        stack.extend(n.all_input_nodes)
    return True

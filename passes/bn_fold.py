"""BatchNorm folding into the preceding conv / conv-transpose / linear.

Two forms (``PrepareOptions.bn``):

- ``"fold"`` (default, what the search uses): the eval form. BN is frozen at its running
  statistics and folded into the layer: ``W' = W·γ/σ`` along the output-channel axis,
  ``b' = (b − μ)·γ/σ + β`` with ``σ = sqrt(running_var + eps)``. Exact to float rounding. The
  search trains the folded weights with BN gone — the same graph an ONNX import of an exported
  model has (exporters fold BN), and short one-shot training with small batches gets noisy batch
  statistics, so freezing BN is the robust choice.
- ``"qat"``: Jacob et al. 2018 (§3.2). The layer convolves with the weight scaled by
  ``γ/σ_running`` (so the weight quantizer sees the folded weight), the output is divided back by
  that factor, the bias added, and a BatchNorm runs on the result: in training mode with batch
  statistics (and updates the running ones) — exactly the unfused conv→BN training output — and
  in eval mode with running statistics, which equals the eval fold. ``materialize`` turns it into
  the eval fold (:func:`finalize_qat_bn`).

Layers that cannot be folded (a weight that is not a parameter, an output used elsewhere, a
grouped conv-transpose, a BN reading extra outputs) are left unchanged.

Matching is table-driven (``ir.kind_of`` / ``ir.get_arg``) rather than with torch.fx's
``SubgraphMatcher``: that matcher compares call targets and argument layouts exactly, so every
(layer target × BN target × positional / keyword form) of the two vocabularies would need its
own pattern, and the get_attr / single-user checks would remain anyway.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fliqs_compiler.ir import ops as ir
from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes._util import add_param, drop_attr_if_unused, get_attr_value, sanitize, unique_attr
from fliqs_compiler.passes.functionalize import no_functionalizable_module
from fliqs_compiler.passes.manager import check_graph, contract, numeric

__all__ = ["fold_batchnorm", "fold_batchnorm_qat", "finalize_qat_bn", "FoldedBatchNorm",
           "FoldWeight", "no_foldable_batch_norm", "no_qat_bn_modules"]

_FOLDABLE = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _bshape(n: int, axis: int, rank: int) -> list:
    shape = [1] * rank
    shape[axis] = n
    return shape


def _is_attr(node, optional: bool = False) -> bool:
    """``node`` is a ``get_attr`` (or, when ``optional``, absent)."""
    if node is None:
        return optional
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _foldable_layer(bn: fx.Node) -> Optional[fx.Node]:
    """The BN's input when it is a layer the fold can rewrite: a conv / conv-transpose (not
    grouped) / linear read only by the BN, with ``get_attr`` weight and (optional) bias."""
    layer = ir.get_arg(bn, "input")
    if not isinstance(layer, fx.Node) or ir.kind_of(layer) not in _FOLDABLE:
        return None
    if len(layer.users) != 1 or not _is_attr(ir.get_arg(layer, "weight")) \
            or not _is_attr(ir.get_arg(layer, "bias"), optional=True):
        return None
    if ir.kind_of(layer).startswith("conv_transpose") and \
            ir.get_arg(layer, "groups") not in (1, None):
        return None
    return layer


def _bn_result(bn: fx.Node) -> Optional[fx.Node]:
    """The node carrying the BN's tensor: the BN itself, or the only ``getitem(bn, 0)`` of a
    tuple-valued BN (None when other outputs are read)."""
    if not ir.spec_of(bn).tuple_output:
        return bn
    users = list(bn.users)
    if len(users) == 1 and users[0].op == "call_function" and \
            users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _match(graph: Graph):
    """Yield (bn node, layer node, result node to replace) for every foldable pair."""
    for bn in list(graph.gm.graph.nodes):
        if ir.kind_of(bn) != "batch_norm" or ir.get_arg(bn, "running_mean") is None:
            continue
        if not all(_is_attr(ir.get_arg(bn, k), optional=True) for k in _BN_TENSORS):
            continue
        layer, result = _foldable_layer(bn), _bn_result(bn)
        if layer is not None and result is not None:
            yield bn, layer, result


# ---- contract conditions --------------------------------------------------------------------
def no_foldable_batch_norm(graph: Graph):
    """No batch norm is left that reads a conv / linear with constant weights it could fold."""
    for bn, layer, _ in _match(graph):
        return f"batch norm {bn.name} after {layer.name} is still foldable"
    return None


def no_qat_bn_modules(graph: Graph):
    """No FoldWeight / FoldedBatchNorm module (the QAT form) is called in the graph."""
    for node in graph.gm.graph.nodes:
        if node.op == "call_module" and isinstance(graph.gm.get_submodule(node.target),
                                                   (FoldWeight, FoldedBatchNorm)):
            return f"node {node.name} calls the QAT-fold module {node.target!r}"
    return None


def _bn_tensors(gm, bn):
    def val(k):
        node = ir.get_arg(bn, k)
        return None if node is None else get_attr_value(gm, node.target)
    mean, var = val("running_mean"), val("running_var")
    gamma = val("weight")
    beta = val("bias")
    gamma = torch.ones_like(mean) if gamma is None else gamma
    beta = torch.zeros_like(mean) if beta is None else beta
    return mean, var, gamma, beta, float(ir.get_arg(bn, "eps"))


def _drop_counter(gm, bn) -> None:
    """Remove the folded BN's ``num_batches_tracked`` buffer and its ``add_(…, 1)`` update
    (torch.export keeps them as separate nodes; nothing reads them once BN is gone)."""
    rm = ir.get_arg(bn, "running_mean")
    prefix = rm.target.rpartition(".")[0] if isinstance(rm, fx.Node) else ""
    if not prefix:
        return
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and n.target == f"{prefix}.num_batches_tracked":
            for u in list(n.users):
                if u.op == "call_function" and u.target is torch.ops.aten.add_.Tensor \
                        and not u.users:
                    gm.graph.erase_node(u)
            drop_attr_if_unused(gm, n)


def _erase_bn(gm, bn, result, replacement):
    """Replace the BN's result by ``replacement``; erase the BN and its orphaned parameters."""
    result.replace_all_uses_with(replacement)
    _drop_counter(gm, bn)
    inputs = [ir.get_arg(bn, k) for k in _BN_TENSORS]
    if result is not bn:
        gm.graph.erase_node(result)
    gm.graph.erase_node(bn)
    for n in inputs:
        if isinstance(n, fx.Node):
            drop_attr_if_unused(gm, n)


def _fold_eval(gm: fx.GraphModule, bn: fx.Node, layer: fx.Node, result: fx.Node) -> None:
    """Fold one eval-form pair: new folded weight/bias parameters, the BN erased."""
    mean, var, gamma, beta, eps = _bn_tensors(gm, bn)
    w_node = ir.get_arg(layer, "weight")
    b_node = ir.get_arg(layer, "bias")
    w = get_attr_value(gm, w_node.target).detach()
    b = torch.zeros_like(mean) if b_node is None else get_attr_value(gm, b_node.target)
    out_axis, _ = ir.weight_axes(ir.kind_of(layer), w.dim())
    with torch.no_grad():
        s = gamma.double() / torch.sqrt(var.double() + eps)
        new_w = (w.double() * s.reshape(_bshape(len(s), out_axis, w.dim()))).to(w.dtype)
        new_b = ((b.double() - mean.double()) * s + beta.double()).to(w.dtype)
    with gm.graph.inserting_before(layer):
        nw = gm.graph.get_attr(add_param(gm, f"{layer.name}_folded_weight", new_w))
        nb = gm.graph.get_attr(add_param(gm, f"{layer.name}_folded_bias", new_b))
    ir.set_arg(layer, "weight", nw)
    ir.set_arg(layer, "bias", nb)
    for old in (w_node, b_node):
        if isinstance(old, fx.Node):
            drop_attr_if_unused(gm, old)
    _erase_bn(gm, bn, result, layer)


@numeric
@contract(requires=[no_functionalizable_module], ensures=[no_foldable_batch_norm])
def fold_batchnorm(graph: Graph) -> Graph:
    """Eval-form BN folding. Requires: ``no_functionalizable_module`` (BNs are ``F.*`` / aten
    calls). Ensures: ``no_foldable_batch_norm``.

    Every foldable layer→BN pair becomes one layer with new parameters
    ``<layer>_folded_weight`` / ``_folded_bias`` (repeated until none is left, so layer→BN→BN
    folds both); eval outputs are unchanged (to float rounding); ``graph.meta['bn_folded']``
    lists the folded layer fx names.
    """
    folded = graph.meta.setdefault("bn_folded", [])
    pairs = list(_match(graph))
    while pairs:
        for bn, layer, result in pairs:
            _fold_eval(graph.gm, bn, layer, result)
            folded.append(layer.name)
        pairs = list(_match(graph))
    check_graph(graph)
    return graph


class FoldedBatchNorm(nn.Module):
    """The BN half of the QAT fold: ``forward(y)`` takes the layer output computed with the
    folded weight and no bias, undoes the fold factor, adds the layer bias and batch-normalises
    (batch statistics in training mode, running statistics in eval mode)."""

    def __init__(self, gamma, beta, running_mean, running_var, eps, momentum, axis, rank,
                 layer_bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = nn.Parameter(gamma.detach().clone())
        self.bias = nn.Parameter(beta.detach().clone())
        self.register_buffer("running_mean", running_mean.detach().clone())
        self.register_buffer("running_var", running_var.detach().clone())
        self.layer_bias = (nn.Parameter(layer_bias.detach().clone())
                           if layer_bias is not None else None)
        self.eps, self.momentum, self.axis, self.rank = float(eps), float(momentum), axis, rank

    def factor(self) -> torch.Tensor:
        """γ / sqrt(running_var + eps): what the weight is multiplied by."""
        return self.weight / torch.sqrt(self.running_var + self.eps)

    def forward(self, y):
        shape = _bshape(-1, 1, y.dim())
        y = y / self.factor().reshape(shape)
        if self.layer_bias is not None:
            y = y + self.layer_bias.reshape(shape)
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=self.momentum, eps=self.eps)


class FoldWeight(nn.Module):
    """The weight half of the QAT fold: ``forward(w) = w · γ/σ_running`` along the output axis."""

    def __init__(self, bn: FoldedBatchNorm, out_axis: int):
        super().__init__()
        self.bn = bn
        self.out_axis = out_axis

    def forward(self, w):
        f = self.bn.factor()
        return w * f.reshape(_bshape(-1, self.out_axis, w.dim()))


@numeric
@contract(requires=[no_functionalizable_module], ensures=[no_foldable_batch_norm])
def fold_batchnorm_qat(graph: Graph) -> Graph:
    """QAT-form BN folding (Jacob et al. 2018). Requires: ``no_functionalizable_module``.
    Ensures: ``no_foldable_batch_norm``.

    Each foldable pair becomes
    ``get_attr W → call_module <layer>_bnw (FoldWeight) → layer (bias None) → call_module
    <layer>_bn (FoldedBatchNorm)``; eval outputs are unchanged (to float rounding) and
    training-mode outputs equal the unfused layer→BN training outputs.
    """
    gm = graph.gm
    folded = graph.meta.setdefault("bn_folded_qat", [])
    for bn, layer, result in list(_match(graph)):
        mean, var, gamma, beta, eps = _bn_tensors(gm, bn)
        w_node = ir.get_arg(layer, "weight")
        b_node = ir.get_arg(layer, "bias")
        w = get_attr_value(gm, w_node.target)
        b = None if b_node is None else get_attr_value(gm, b_node.target)
        out_axis, _ = ir.weight_axes(ir.kind_of(layer), w.dim())
        momentum = ir.get_arg(bn, "momentum")
        mod = FoldedBatchNorm(gamma, beta, mean, var, eps, 0.1 if momentum is None else momentum,
                              1, w.dim(), b)
        bn_path = unique_attr(gm, sanitize(f"{layer.name}_bn"))
        gm.add_submodule(bn_path, mod)
        bnw_path = unique_attr(gm, sanitize(f"{layer.name}_bnw"))
        gm.add_submodule(bnw_path, FoldWeight(mod, out_axis))
        with gm.graph.inserting_before(layer):
            fw = gm.graph.call_module(bnw_path, (w_node,))
        ir.set_arg(layer, "weight", fw)
        ir.set_arg(layer, "bias", None)
        with gm.graph.inserting_after(layer):
            new_bn = gm.graph.call_module(bn_path, (layer,))
        _erase_bn(gm, bn, result, new_bn)
        if isinstance(b_node, fx.Node):
            drop_attr_if_unused(gm, b_node)
        folded.append(layer.name)
    check_graph(graph)
    return graph


@contract(ensures=[no_qat_bn_modules])
def finalize_qat_bn(graph: Graph) -> Graph:
    """Turn QAT-form folds into the eval fold (constants), for export and lowering.
    Ensures: ``no_qat_bn_modules``.

    Reads nodes built by :func:`fold_batchnorm_qat` (possibly with a quantizer between
    ``_bnw`` and the layer); afterwards the layer reads a folded weight parameter and bias and
    eval outputs are unchanged.
    """
    gm = graph.gm
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FoldWeight):
            continue
        mod: FoldWeight = gm.get_submodule(node.target)
        src = node.args[0]
        with torch.no_grad():
            w = mod(get_attr_value(gm, src.target))
        with gm.graph.inserting_before(node):
            nw = gm.graph.get_attr(add_param(gm, f"{node.target}_folded_weight", w))
        node.replace_all_uses_with(nw)
        gm.graph.erase_node(node)
        drop_attr_if_unused(gm, src)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target),
                                                      FoldedBatchNorm):
            continue
        mod: FoldedBatchNorm = gm.get_submodule(node.target)
        layer = node.args[0]
        with torch.no_grad():
            s = mod.factor()
            b = mod.layer_bias if mod.layer_bias is not None else torch.zeros_like(s)
            new_b = (b - mod.running_mean) * s + mod.bias
        with gm.graph.inserting_before(layer):
            nb = gm.graph.get_attr(add_param(gm, f"{node.target}_folded_bias", new_b))
        ir.set_arg(layer, "bias", nb)
        node.replace_all_uses_with(layer)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    check_graph(graph)
    return graph

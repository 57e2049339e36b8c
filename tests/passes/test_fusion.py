"""annotate_fusion: activation / residual-add fusion and non-negativity (→ unsigned activation
quantizers); its contract (requires no_foldable_batch_norm, ensures nonneg_annotated and
fusion_on_layers)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fliqs_compiler import passes as P
from fliqs_compiler.passes.fusion import fusion_on_layers, nonneg_annotated
from fliqs_compiler.passes.manager import PassContractError


def test_fusion_nonneg_and_unsigned_activation_quantizers(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    names = list(p.layers)
    c1 = p.fx_node(p.layers[names[0]].node)
    assert c1.meta["fusion"]["act"] == "relu"
    c2 = p.fx_node(p.layers[names[1]].node)
    assert "residual_add" in c2.meta["fusion"]
    aq = [p.gm.get_submodule(p.space.quantizers[(n, "activation")]) for n in names]
    assert [q.unsigned for q in aq] == [False, True, True, True]  # raw input is signed
    assert aq[0].block_axis == 1 and aq[3].block_axis == -1


def test_ensures_hold_on_a_folded_graph(cnn):
    _, g = cnn
    g = copy.deepcopy(g)
    assert "has no bool meta['nonneg']" in nonneg_annotated(g)  # not vacuous
    out = P.run_passes(g, [P.fold_batchnorm, P.annotate_fusion])
    assert nonneg_annotated(out) is None and fusion_on_layers(out) is None
    fused = {n.name: n.meta["fusion"] for n in out.gm.graph.nodes if "fusion" in n.meta}
    assert fused["conv2d"] == {"act": "relu", "act_node": "relu"}
    assert set(fused["conv2d_1"]) == {"residual_add"}


def test_clamp_lower_bound_and_concat_nonneg(trace_graph):
    class Clamps(nn.Module):
        def forward(self, x):
            a = torch.clamp(x, min=0.0)  # lower bound 0: non-negative
            b = torch.clamp(x, min=-1.0)  # may be negative
            c = torch.clamp(torch.relu(x), min=-1.0)  # input non-negative
            return torch.cat([a, c], 1), torch.cat([a, b], 1)

    out = P.run_passes(trace_graph(Clamps(), (1, 2)), [P.annotate_fusion])
    nonneg = {n.name: n.meta["nonneg"] for n in out.gm.graph.nodes}
    assert (nonneg["clamp"], nonneg["clamp_1"], nonneg["clamp_2"]) == (True, False, True)
    assert (nonneg["cat"], nonneg["cat_1"]) == (True, False)
    assert nonneg["x"] is False


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn  # BN not folded yet: conv → BN → ReLU would not fuse
    with pytest.raises(PassContractError, match="pass annotate_fusion: requires "
                       "no_foldable_batch_norm does not hold: batch norm .* is still foldable"):
        P.run_passes(copy.deepcopy(g), [P.annotate_fusion])

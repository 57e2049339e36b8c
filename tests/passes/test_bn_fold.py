"""BN folding: the eval fold (conv, linear, conv-transpose, both vocabularies), the QAT fold
(Jacob et al. 2018) and its finalisation; the contract (requires no_functionalizable_module,
ensures no_foldable_batch_norm; finalize_qat_bn ensures no_qat_bn_modules)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fliqs_compiler import passes as P
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.passes.bn_fold import no_foldable_batch_norm, no_qat_bn_modules
from fliqs_compiler.passes.manager import PassContractError


def _no_bn(graph: Graph) -> bool:
    return not any("batch_norm" in str(n.target) for n in graph.gm.graph.nodes)


def test_bn_fold_eval_exact(cnn, cnn_shape):
    model, g = cnn
    x = torch.randn(cnn_shape)
    folded = P.run_passes(copy.deepcopy(g), [P.fold_batchnorm], check_numerics=True)
    assert _no_bn(folded) and len(folded.meta["bn_folded"]) == 2
    assert not any("num_batches_tracked" in str(n.target) for n in folded.gm.graph.nodes)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


class LinBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.ct, self.bn2 = nn.ConvTranspose2d(2, 3, 2, stride=2), nn.BatchNorm2d(3)
        for bn in (self.bn, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(-1.5, 1.5)

    def forward(self, x):
        y = self.bn(self.fc(x.flatten(1)[:, :6]))
        z = self.bn2(self.ct(x[:, :2]))
        return y.sum() + z


def test_bn_fold_linear_and_conv_transpose_exact(export_graph):
    model = LinBN().eval()
    g = export_graph(model, (4, 3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    folded = P.fold_batchnorm(g)
    assert len(folded.meta["bn_folded"]) == 2 and _no_bn(folded)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)


class FBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.register_buffer("rm", torch.rand(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.g = nn.Parameter(torch.rand(4) + 0.5)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(F.conv2d(x, self.w, padding=1), self.rm, self.rv, self.g, self.b,
                            eps=1e-3)


def test_bn_fold_functional_vocabulary(trace_graph):
    m = FBN()
    g = trace_graph(m, (1, 3, 6, 6))
    x = torch.randn(1, 3, 6, 6)
    folded = P.fold_batchnorm(g)
    assert folded.meta["bn_folded"] and _no_bn(folded)
    assert torch.allclose(folded(x), m(x), atol=1e-5)


class ConvBNBN(nn.Module):
    """conv → BN → BN: the second BN is foldable only once the first one is folded."""

    def __init__(self):
        super().__init__()
        self.c, self.bn1, self.bn2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.bn2(self.bn1(self.c(x)))


def test_bn_fold_repeats_until_nothing_is_foldable(export_graph):
    torch.manual_seed(0)
    model = ConvBNBN().eval()
    g = export_graph(model, (1, 2, 5, 5))
    assert "is still foldable" in no_foldable_batch_norm(g)
    folded = P.run_passes(g, [P.fold_batchnorm], check_numerics=True)
    assert _no_bn(folded) and len(folded.meta["bn_folded"]) == 2
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_bn_fold_qat_train_and_eval_numerics(small_cnn_class, export_graph, cnn_shape):
    torch.manual_seed(1)
    model = small_cnn_class()
    g = export_graph(model, train=True)  # training-mode export: BN with batch statistics
    P.manager.enable_train_eval(g.gm)
    qat = P.run_passes(g, [P.fold_batchnorm_qat], check_numerics=False)
    assert len(qat.meta["bn_folded_qat"]) == 2 and _no_bn(qat)
    assert not any("num_batches_tracked" in str(n.target) for n in qat.gm.graph.nodes)
    x = torch.randn(cnn_shape)
    ref = small_cnn_class()
    ref.load_state_dict(model.state_dict())
    ref.train()
    qat.gm.train()
    y_ref, y = ref(x), qat(x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-4)  # batch statistics, like unfused BN
    bn_mod = qat.gm.get_submodule(f"{qat.meta['bn_folded_qat'][0]}_bn")
    assert torch.allclose(bn_mod.running_mean, ref.bn1.running_mean, atol=1e-6)  # stats update
    ref.eval()
    qat.gm.eval()
    with torch.no_grad():
        assert torch.allclose(qat(x), ref(x), atol=1e-5, rtol=1e-4)  # running stats = eval fold
        final = P.finalize_qat_bn(qat)
        assert not any(isinstance(m, (P.bn_fold.FoldWeight, P.bn_fold.FoldedBatchNorm))
                       for m in final.gm.modules())
        assert torch.allclose(final(x), ref(x), atol=1e-5, rtol=1e-4)


def test_prepare_qat_then_materialize_folds_into_constants(small_cnn_class, export_graph,
                                                           cnn_shape):
    model = small_cnn_class().eval()
    g = export_graph(model)
    p = P.prepare(g, P.PrepareOptions(formats=["int8"], bn="qat"))
    x = torch.randn(cnn_shape)
    p.gm.eval()
    with torch.no_grad():
        y = p(x)
    m = P.materialize(p, p.space.formats_of(p.space.uniform_choice("int8")))
    assert not any(isinstance(mod, P.bn_fold.FoldWeight) for mod in m.gm.modules())
    with torch.no_grad():
        assert torch.allclose(m(x), y, atol=1e-4)


@pytest.mark.parametrize("fold", [P.fold_batchnorm, P.fold_batchnorm_qat])
def test_ensures_hold_on_an_exported_graph(cnn, fold):
    _, g = cnn
    g = copy.deepcopy(g)
    P.manager.enable_train_eval(g.gm)
    assert "batch norm" in no_foldable_batch_norm(g)  # not vacuous: two foldable pairs
    out = P.run_passes(g, [fold])
    assert no_foldable_batch_norm(out) is None
    if fold is P.fold_batchnorm_qat:
        assert "QAT-fold module" in no_qat_bn_modules(out)
        final = P.run_passes(out, [P.finalize_qat_bn])
        assert no_qat_bn_modules(final) is None
    else:
        assert no_qat_bn_modules(out) is None


@pytest.mark.parametrize("fold", [P.fold_batchnorm, P.fold_batchnorm_qat])
def test_requires_refused_by_the_manager(small_cnn_class, trace_graph, cnn_shape, fold):
    # a symbolic_trace graph still calls nn.BatchNorm2d modules: functionalize must run first
    g = trace_graph(small_cnn_class().eval(), cnn_shape)
    with pytest.raises(PassContractError, match=f"pass {fold.__name__}: requires "
                       "no_functionalizable_module does not hold: node c1 still calls"):
        P.run_passes(g, [fold])

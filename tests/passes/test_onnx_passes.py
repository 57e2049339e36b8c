"""The passes on ONNX imports (the importer's ``torch.nn.functional`` vocabulary): BN folding of
a train-mode export, conv-transpose and transformer MatMuls, public names = ONNX node names,
the prepare → materialize → torch.export round trip, and the pass contracts on that
vocabulary."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fliqs_compiler.frontends.onnx_import")
import onnx_models as OM  # noqa: E402  (tests/helpers/ is on sys.path: tests/conftest.py)

import fliqs_compiler as fq  # noqa: E402
from fliqs_compiler import passes as P  # noqa: E402
from fliqs_compiler.passes.manager import PassContractError  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_passes")


def _round_trip(graph, options):
    p = P.prepare(graph, options)
    x = graph.example_inputs()
    with torch.no_grad():
        p(*x)
    m = P.materialize(p, p.space.formats_of(p.space.uniform_choice("int8")))
    ep = torch.export.export(m.gm, tuple(x))
    n_fq = sum(1 for n in ep.graph.nodes if n.target == torch.ops.fliqs.fake_quant.default)
    return p, m, n_fq


def test_resnet_legacy_bn_fold_names_and_round_trip(folder):
    g = fq.load(OM.make_resnet_legacy(folder))
    assert any("batch_norm" in str(n.target) for n in g.gm.graph.nodes)  # BN kept by the export
    a = P.analyze(g, P.PrepareOptions(check_numerics=True))  # fold is exact vs the import
    assert not any("batch_norm" in str(n.target) for n in a.gm.graph.nodes)
    assert len(a.meta["bn_folded"]) >= 5
    names = list(a.layers)
    assert names[0] == "/stem/stem.0/Conv" and names[-1] == "/fc/Gemm"  # ONNX node names
    assert a.layers[names[0]].keep_float and a.layers[names[-1]].keep_float
    p, m, n_fq = _round_trip(g, P.PrepareOptions(formats=["int8", "fp8_e4m3"]))
    assert n_fq == len(m.space.quantizers) == 2 * len(p.searched_layers())


def test_conv_transpose_and_transformer(folder):
    g = fq.load(OM.make_conv_transpose(folder))
    a = P.analyze(g, P.PrepareOptions(keep_float_first=False, keep_float_last=False))
    ops = [layer.op for layer in a.layers.values()]
    assert ops.count("conv_transpose2d") == 2
    _, m, n_fq = _round_trip(g, P.PrepareOptions(formats=["int8"], keep_float_first=False,
                                                 keep_float_last=False))
    assert n_fq == len(m.space.quantizers) == 6

    g = fq.load(OM.make_transformer(folder))
    plain = P.analyze(g, P.PrepareOptions(quantize_act_matmul=False))
    assert {layer.op for layer in plain.layers.values()} == {"linear"}
    opts = P.PrepareOptions(formats=["int8"])  # attention MatMuls searched by default
    p, m, n_fq = _round_trip(g, opts)
    act = [layer for layer in p.layers.values() if layer.op == "matmul"]
    assert len(act) == 2 and all(layer.params == 0 for layer in act)
    assert n_fq == len(m.space.quantizers) == 2 * len(p.searched_layers())


def test_contracts_on_the_functional_vocabulary(folder):
    g = fq.load(OM.make_resnet_legacy(folder))
    with pytest.raises(PassContractError, match="pass annotate_fusion: requires "
                       "no_foldable_batch_norm does not hold: batch norm"):
        P.run_passes(g, [P.annotate_fusion])  # BN still there: fold first
    opts = P.PrepareOptions(formats=["int8"], bn="qat")
    p = P.prepare(g, opts)
    for step in P.pipeline(opts):
        for condition in step.ensures:
            assert condition(p) is None, (step.__name__, condition.__name__, condition(p))
    m = P.materialize(p, p.space.formats_of(p.space.uniform_choice("int8")))
    assert not any("batch_norm" in str(n.target) for n in m.gm.graph.nodes)

"""materialize: config round trip, export with fake-quant ops, rejected configs, calibration of
unused candidates; its contract (requires searched_layers_quantized, ensures
no_searchable_quantizer, quantizers_fixed, no_qat_bn_modules)."""
from __future__ import annotations

import pytest
import torch

from fliqs_compiler import passes as P
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.numerics.quantizers import FormatQuantizer, SearchableQuantizer
from fliqs_compiler.passes.bn_fold import no_qat_bn_modules
from fliqs_compiler.passes.manager import PassContractError, bind
from fliqs_compiler.passes.materialize import (fix_formats, no_searchable_quantizer,
                                               quantizers_fixed)


def test_materialize_round_trip_with_config_and_export(cnn, cnn_shape, tmp_path):
    from fliqs_compiler.ir.config import load_config, save_config

    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8", "fp8_e4m3"]))
    x = torch.randn(cnn_shape)
    choice = [1, 2]
    p.space.apply(p.gm, choice)
    with torch.no_grad():
        y = p(x)  # initialises the chosen candidates' scales
    formats = p.space.formats_of(choice)
    formats["conv2d_2"]["activation"] = "float"  # untied in the config: allowed
    formats["conv2d"] = {"weight": "float", "activation": "float"}
    path = save_config(tmp_path / "config.json", "net", formats, extra={"note": 1})
    cfg = load_config(path, p)
    assert cfg["model"] == "net" and cfg["note"] == 1
    m = P.materialize(p, cfg)
    assert isinstance(p.gm.get_submodule("conv2d_1_wq"), SearchableQuantizer)  # input untouched
    fixed = {k: m.gm.get_submodule(v) for k, v in m.space.quantizers.items()}
    assert set(fixed) == {("conv2d_1", "weight"), ("conv2d_1", "activation"),
                          ("conv2d_2", "weight")}
    assert all(isinstance(q, FormatQuantizer) for q in fixed.values())
    assert fixed[("conv2d_1", "weight")].fmt == "int8"
    act = fixed[("conv2d_1", "activation")]  # int8 on a ReLU output executes as uint8
    assert (act.fmt, act.searched_format, act.role) == ("uint8", "int8", "activation")
    assert fixed[("conv2d_2", "weight")].fmt == "fp8_e4m3"
    assert m.meta["formats_config"]["linear"] == {"weight": "float", "activation": "float"}
    # same numbers as the searchable graph for the same formats (conv2d_2 act float now)
    p.gm.get_submodule("conv2d_2_aq").candidates  # exists
    with torch.no_grad():
        q = P.materialize(p, p.space.formats_of(choice))
        assert torch.allclose(q(x), y, atol=1e-6)
    ep = torch.export.export(m.gm, (x,))
    fq_nodes = [n for n in ep.graph.nodes if n.op == "call_function"
                and n.target == torch.ops.fliqs.fake_quant.default]
    assert len(fq_nodes) == len(m.space.quantizers) == 3


def test_materialize_rejects_bad_configs(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int4", "int8"]))
    with pytest.raises(FliqsError, match="unknown node.*'nope'"):
        P.materialize(p, {"nope": {"weight": "int8", "activation": "int8"}})
    with pytest.raises(FliqsError, match="unknown format 'int9'"):
        P.materialize(p, {"conv2d_1": {"weight": "int9", "activation": "int8"}})
    with pytest.raises(FliqsError, match="was not searched"):
        P.materialize(p, {"conv2d_1": {"weight": "fp8_e4m3", "activation": "int8"}})
    with pytest.raises(FliqsError, match="kept in float"):
        P.materialize(p, {"conv2d": {"weight": "int8", "activation": "int8"}})


def test_materialize_calibrates_unused_candidates(cnn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int8"]))
    m = P.materialize(p, p.space.formats_of([0, 0]))
    for path in m.space.quantizers.values():
        assert m.gm.get_submodule(path).scale.abs().min() < 1.0  # not the placeholder 1.0


@pytest.mark.parametrize("bn", ["fold", "qat"])
def test_ensures_hold_on_an_exported_graph(cnn, bn):
    _, g = cnn
    p = P.prepare(g, P.PrepareOptions(formats=["int8", "int4"], bn=bn))
    assert "still a SearchableQuantizer" in no_searchable_quantizer(p)  # not vacuous
    if bn == "qat":
        assert "QAT-fold module" in no_qat_bn_modules(p)
    formats = p.space.formats_of(p.space.uniform_choice("int4"))
    formats["conv2d_1"]["activation"] = "float"
    m = P.materialize(p, formats)
    assert no_searchable_quantizer(m) is None and quantizers_fixed(m) is None
    assert no_qat_bn_modules(m) is None
    assert ("conv2d_1", "activation") not in m.space.quantizers
    assert "materialize" in m.meta["pass_times"]


def test_requires_refused_by_the_manager(cnn):
    _, g = cnn
    a = P.analyze(g, P.PrepareOptions(formats=["int8"]))  # no quantizers inserted
    with pytest.raises(PassContractError, match="pass materialize: requires "
                       "searched_layers_quantized does not hold: layer conv2d_1: no weight "
                       "quantizer recorded"):
        P.run_passes(a, [bind(fix_formats, "materialize", formats={})])
    with pytest.raises(PassContractError, match="pass materialize: requires "
                       "searched_layers_quantized"):
        P.materialize(a, {})
    p = P.prepare(g, P.PrepareOptions(formats=["int8"]))
    m = P.materialize(p, p.space.formats_of(p.space.uniform_choice("int8")))
    with pytest.raises(PassContractError, match="weight quantizer 'conv2d_1_wq' is a "
                       "FormatQuantizer, not a SearchableQuantizer"):
        P.materialize(m, {})  # already materialized

"""config.json: save/load round trip, atomic write, validation errors (one-line FliqsErrors)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from fliqs_compiler import passes as P
from fliqs_compiler.ir.config import load_config, save_config, validate_formats
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph, InputSpec


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                      nn.Flatten(), nn.Linear(16, 2)).eval()
    gm = torch.export.export(m, (torch.randn(1, 1, 6, 6),)).module()
    g = Graph(gm, [InputSpec("x", (1, 1, 6, 6))], name="seq")
    return P.prepare(g, P.PrepareOptions(formats=["int8", "fp8_e4m3"]))


def test_round_trip_atomic_and_normalised(tmp_path):
    formats = {"a": {"weight": "INT8", "activation": "fp8"}, "b": {"weight": "float"}}
    path = save_config(tmp_path / "out" / "config.json", "m", formats, extra={"seed": 3})
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left
    raw = json.loads(path.read_text())
    assert raw["model"] == "m" and raw["seed"] == 3
    assert raw["formats"] == {"a": {"weight": "int8", "activation": "fp8_e4m3"},
                              "b": {"weight": "float", "activation": "float"}}
    assert load_config(path)["formats"] == raw["formats"]


@pytest.mark.parametrize("text, match", [
    ("{", "not a readable JSON config"),
    ('{"model": "m"}', "expected"),
    ('{"model": "m", "formats": []}', "'formats' must be an object"),
    ('{"model": "m", "formats": {"n": "int8"}}', "node 'n': expected"),
    ('{"model": "m", "formats": {"n": {"weight": "int8", "bias": "int8"}}}', "node 'n': expected"),
    ('{"model": "m", "formats": {"n": {"weight": "int99"}}}', "unknown format 'int99'"),
])
def test_bad_files(tmp_path, text, match):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(FliqsError, match=match) as e:
        load_config(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FliqsError, match="no such config file"):
        load_config(tmp_path / "none.json")


def test_validated_against_graph(tmp_path, prepared):
    searched = [layer.name for layer in prepared.searched_layers()]
    assert searched == ["conv2d_1"]
    good = save_config(tmp_path / "g.json", "seq", {"conv2d_1": {"weight": "fp8_e4m3",
                                                                  "activation": "int8"}})
    cfg = load_config(good, prepared)
    m = P.materialize(prepared, cfg["formats"])
    assert {k: v.split("_")[-1] for k, v in m.space.quantizers.items()} == \
        {("conv2d_1", "weight"): "wq", ("conv2d_1", "activation"): "aq"}
    bad = save_config(tmp_path / "b.json", "seq", {"conv9": {"weight": "int8"}})
    with pytest.raises(FliqsError, match="unknown node.*'conv9'.*fliqs inspect"):
        load_config(bad, prepared)
    with pytest.raises(FliqsError, match="was not searched; choose one of int8, fp8_e4m3"):
        validate_formats({"conv2d_1": {"weight": "int4", "activation": "int8"}}, prepared)
    with pytest.raises(FliqsError, match="kept in float"):
        validate_formats({"conv2d": {"weight": "int8", "activation": "int8"}}, prepared)
    # float for a kept-float node is fine
    assert validate_formats({"linear": {"weight": "float", "activation": "float"}}, prepared)

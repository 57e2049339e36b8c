"""The search on a graph built by the real pipeline: ONNX import → passes.prepare → run_search →
passes.materialize (the interfaces the compile command chains)."""
import warnings

import pytest
import torch

import fliqs_compiler as fq
from fliqs_compiler import passes
from fliqs_compiler.data.sources import load_data
from fliqs_compiler.ir.graph import InputSpec
from fliqs_compiler.numerics.quantizers import FormatQuantizer, SearchableQuantizer
from fliqs_compiler.search import SearchOptions, run_search
from examples.toy_models import TinyCNN, train_float


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data = load_data("digits", InputSpec("x", (1, 1, 8, 8)))
    model = train_float(TinyCNN(), data.x_train, data.y_train, 150, seed=0)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (data.x_train[:1],), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17)
    graph = fq.load(str(path), input_shapes={"x": (1, 1, 8, 8)})
    opts = passes.PrepareOptions(formats=["int4", "int8"], keep_float_first=False, keep_float_last=True)
    return passes.prepare(graph, opts), data


def test_search_on_prepared_graph(prepared, tmp_path):
    graph, data = prepared
    searched = [layer.name for layer in graph.searched_layers()]
    assert len(searched) == 2 and len(graph.layers) == 3  # the last layer is kept in float
    r = run_search(graph, data, "bops=0.625x", SearchOptions(steps=24, reward_batch_size=64, gamma=1.0),
                   out_dir=tmp_path, progress=False)
    assert set(r.formats) == set(searched)  # config.json keys are the public node names
    from fliqs_compiler.cost.budget import reference_cost
    from fliqs_compiler.cost.model import config_cost
    assert r.budget_target == pytest.approx(0.625 * reference_cost(graph, "bops"))
    assert r.cost == config_cost(graph, r.formats, "bops") and r.quality["final"] > 0.8
    fixed = passes.materialize(graph, r.formats)
    mods = list(fixed.gm.modules())
    assert not any(isinstance(m, SearchableQuantizer) for m in mods)
    assert any(isinstance(m, FormatQuantizer) for m in mods)
    with torch.no_grad():
        out = fixed.gm(data.x_val[:16])
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.shape == (16, 10)

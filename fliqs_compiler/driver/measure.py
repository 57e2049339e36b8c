"""What the driver measures on a target through its backend: per-layer latency tables (what
``latency=`` budgets search against, and the report's per-layer column), the inputs of the
numerics checks, and the distance between two runs' outputs."""
from __future__ import annotations

from pathlib import Path

from fliqs_compiler.backends.targets import default_threads as threads

__all__ = ["latency_model", "chosen_latency", "numeric_inputs", "NumericInputs",
           "NUMERIC_SAMPLES", "OUT_OF_RANGE_SCALE"]

NUMERIC_SAMPLES = 4
# The numerics checks also run every input batch scaled by this factor: activations then leave
# the calibrated range and saturate at the quantizers' clip values, where rewrites that assume
# in-range values (a dropped Relu, a removed Q/DQ pair) show most.
OUT_OF_RANGE_SCALE = 3.0


def latency_model(graph, target, formats: list, progress: bool, cache_dir=None, pairs=None,
                  tuning=None, model_formats=None):
    """A LatencyTable measured on ``target`` (by its backend's ``measure_layer``) for every
    searched layer × format pair (default: each candidate format for weight and activation
    alike, as decisions are tied). ``tuning.trials`` > 0: tuned kernels (a table of its own).
    ``model_formats``: the configuration the layers run in, when known (``chosen_latency``): a
    backend with ``measure_layer_in`` then measures them as they run in that model (TVM: its
    layout), in a table of its own."""
    from fliqs_compiler.backends.latency_table import LatencyTable
    from fliqs_compiler.backends.registry import TuningOptions, backend_for
    backend, tuning = backend_for(target), tuning or TuningOptions()
    in_model = getattr(backend, "measure_layer_in", None)
    measure = (in_model(target, tuning, cache_dir, graph, model_formats)
               if in_model is not None and model_formats is not None
               else backend.measure_layer(target, tuning, cache_dir))
    kwargs = {"cache_dir": Path(cache_dir)} if cache_dir else {}
    table = LatencyTable(target.key, measure.table, threads=threads(), **kwargs)
    if pairs is None:
        pairs = sorted({(c, c) for d in graph.space.decisions for c in d.candidates}
                       | {(f, f) for f in formats})
    table.build(graph, pairs, measure.fn, progress=progress)
    return table


def chosen_latency(graph, target, formats: dict, progress: bool, tuning=None):
    """Per-layer latency of each searched layer in its chosen (weight, activation) formats only
    (one micro-graph per layer, cached on disk), measured as it runs in the model with these
    formats (``latency_model``'s ``model_formats``)."""
    pairs = {name: [(e.get("weight", "float"), e.get("activation", e.get("weight", "float")))]
             for name, e in formats.items()}
    return latency_model(graph, target, [], progress, pairs=pairs, tuning=tuning,
                         model_formats=formats)


class NumericInputs(list):
    """Input lists for the numerics checks (each shaped like the model's inputs), with a
    ``description`` of what they are for the report (``numerics.numerics_inputs``)."""

    def __init__(self, items, description: str):
        super().__init__(items)
        self.description = description


def numeric_inputs(graph, dataset, k: int = NUMERIC_SAMPLES) -> NumericInputs:
    """``k`` input lists shaped exactly like the model's inputs (held-out samples when possible,
    else seeded random inputs), then the same ``k`` scaled by ``OUT_OF_RANGE_SCALE``."""
    import numpy as np
    spec = graph.inputs[0]
    b = int(spec.shape[0])
    xs = dataset.x_val if dataset is not None else None
    out, held_out = [], 0
    for i in range(k):
        if xs is not None and len(xs) >= (i + 1) * b:
            out.append([xs[i * b:(i + 1) * b].numpy().astype(np.float32)])
            held_out += 1
        else:
            out.append([t.numpy() for t in graph.example_inputs(seed=i)])
    scaled = [[(a * np.float32(OUT_OF_RANGE_SCALE)).astype(a.dtype) if a.dtype.kind == "f" else a
               for a in x] for x in out]
    what = [f"{held_out * b} held-out samples" if held_out else "",
            f"{(k - held_out) * b} seeded random inputs" if held_out < k else ""]
    n = k * b
    desc = f"{' + '.join(w for w in what if w)} + the same {n} scaled x{OUT_OF_RANGE_SCALE:g}"
    return NumericInputs(out + scaled, desc)

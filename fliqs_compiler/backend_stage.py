"""After the search: the materialized graph through the QDQ ONNX export, onnxruntime's numerics
check and the target's own stages (TVM lowering, numerics and latency; or onnxruntime latency),
plus the measured latency tables that ``latency=`` budgets search against. The target kind picks
its functions from two registries (``_MEASURE``, ``_TARGET_STAGES``)."""
from __future__ import annotations

from pathlib import Path

from .backends.targets import default_threads as threads  # one rule for the thread count

NUMERIC_SAMPLES = 4
# The numerics checks also run every input batch scaled by this factor: activations then leave
# the calibrated range and saturate at the quantizers' clip values, where rewrites that assume
# in-range values (a dropped Relu, a removed Q/DQ pair) show most.
OUT_OF_RANGE_SCALE = 3.0


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


def _torch_outputs(graph, inputs: list) -> list:
    import torch
    with torch.no_grad():
        y = graph.gm(*[torch.from_numpy(a) for a in inputs])
    ys = y if isinstance(y, (tuple, list)) else [y]
    return [t.detach().numpy() for t in ys]


def _max_err(a: list, b: list) -> float:
    import numpy as np
    return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     for x, y in zip(a, b)))


def _tvm_measure(target, tune_trials: int, cache_dir):
    """TVM default schedules (fast, not representative), or MetaSchedule with ``tune_trials``
    trials per layer and a tuning database kept beside the latency cache (reused across runs
    and models)."""
    from .backends.tvm_measure import measure_fn
    if not tune_trials:
        return "tvm", measure_fn(target)
    from .backends.latency_table import default_cache_dir
    work_dir = (Path(cache_dir) if cache_dir else default_cache_dir()) / "metaschedule"
    return f"tvm-tuned{tune_trials}", measure_fn(target, tuned=True, trials=tune_trials,
                                                  work_dir=str(work_dir))


def _ort_measure(target, tune_trials: int, cache_dir):
    from .backends.latency_table import ort_layer_ms
    return "ort", lambda layer, fw, fa: ort_layer_ms(layer, fw, fa, threads=threads())


# target kind → (backend name, ``measure(layer, fmt_w, fmt_a) -> ms``) of its latency table
_MEASURE = {"tvm": _tvm_measure, "ort": _ort_measure}


def latency_model(graph, target, formats: list, progress: bool, cache_dir=None, pairs=None):
    """A LatencyTable measured on ``target`` for every searched layer × format pair (default:
    each candidate format for weight and activation alike, as decisions are tied). A target
    carrying ``extra["tune_trials"]`` > 0 (:func:`api._with_tuning`) gets MetaSchedule-tuned TVM
    kernels (a table of its own)."""
    from .backends.latency_table import LatencyTable
    tune_trials = int(target.extra.get("tune_trials", 0))
    backend, measure = _MEASURE[target.kind](target, tune_trials, cache_dir)
    kwargs = {"cache_dir": Path(cache_dir)} if cache_dir else {}
    table = LatencyTable(target.key, backend, threads=threads(), **kwargs)
    if pairs is None:
        pairs = sorted({(c, c) for d in graph.space.decisions for c in d.candidates}
                       | {(f, f) for f in formats})
    table.build(graph, pairs, measure, progress=progress)
    return table


def _quiet_exporter_logs() -> None:
    """torch.onnx logs one warning per missing torchvision op on every export; keep stderr for
    what matters."""
    import logging
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _run_tvm(fixed, target, stage: Path, onnx_path: Path, runnable: bool, inputs: list,
             stages, facts: dict) -> None:
    """TVM targets: lower + compile (``tvm/model.so``), numerics vs the torch graph, latency."""
    from .backends.tvm_lower import lower
    refs = [_torch_outputs(fixed, x) for x in inputs]
    with stages("lower", f"TVM Relax for {target.text}"):
        lowered = lower(fixed, target, stage)
        facts["tvm_err"] = _max_err([o for x in inputs for o in lowered.run(x)],
                                    [o for r in refs for o in r])
        facts["executed"] = dict(lowered.executed or {})
    with stages("measure", "TVM latency (time_evaluator median)"):
        facts["latency_ms"] = float(lowered.time_ms(inputs[0]))


def _run_ort(fixed, target, stage: Path, onnx_path: Path, runnable: bool, inputs: list,
             stages, facts: dict) -> None:
    """``ort``: the QDQ model is the deployable; its onnxruntime latency (when ORT loads it)."""
    from .backends.ort_backend import time_onnx
    stages.timing.setdefault("lower", 0.0)
    if runnable:
        with stages("measure", "onnxruntime latency (median)"):
            facts["latency_ms"] = float(time_onnx(str(onnx_path), inputs[0], threads=threads()))


# target kind → what runs after the QDQ export
_TARGET_STAGES = {"tvm": _run_tvm, "ort": _run_ort}


def _ort_numerics(fixed, onnx_path: Path, runnable: bool, inputs: list, facts: dict,
                  notes: list) -> None:
    """The QDQ artifact's numerics: a default onnxruntime session (what users run; raises
    CheckFailed beyond ``ort_backend.DEFAULT_TOLERANCE_LSB``) beside our exact session, or
    onnx.reference where onnxruntime cannot load the model."""
    from .backends.ort_backend import check_numerics, compare
    facts["numerics_inputs"] = getattr(inputs, "description", f"{len(inputs)} input batches")
    if not runnable:
        notes.append("onnxruntime cannot load model.qdq.onnx (ort_backend.ort_can_run is false: "
                     "e.g. FLOAT4E2M1 Q/DQ, or a 4-bit activation its full graph optimizations "
                     "reject); numerics were checked with onnx.reference, no onnxruntime latency")
        facts["ort_err"] = max(float(compare(fixed, onnx_path, x, engine="reference",
                                             threads=threads())) for x in inputs)
        return
    n = check_numerics(fixed, onnx_path, inputs, threads=threads())
    facts.update(ort_err=n["default_err"], ort_exact_err=n["exact_err"],
                 ort_default_lsb=n["default_lsb"])


def backend_stage(fixed, target, stage: Path, inputs: list, stages, notes: list) -> dict:
    """QDQ export + onnxruntime numerics (a default session, as users run the artifact), then
    the target's stages (``_TARGET_STAGES``: TVM lowering + numerics + latency, or onnxruntime
    latency). Requires a materialized graph; writes only into ``stage``. Returns ``{"ort_err",
    "ort_exact_err", "ort_default_lsb", "numerics_inputs", "tvm_err", "latency_ms",
    "executed"}``; raises CheckFailed when the default session disagrees with the graph."""
    from .backends.onnx_export import export_qdq
    from .backends.ort_backend import ort_can_run
    facts = {"ort_err": None, "ort_exact_err": None, "ort_default_lsb": None,
             "numerics_inputs": None, "tvm_err": None, "latency_ms": None, "executed": {}}
    _quiet_exporter_logs()
    with stages("export", "QDQ ONNX + default onnxruntime session check"):
        onnx_path = export_qdq(fixed, stage / "model.qdq.onnx")
        runnable = ort_can_run(onnx_path)
        _ort_numerics(fixed, onnx_path, runnable, inputs, facts, notes)
    _TARGET_STAGES[target.kind](fixed, target, stage, onnx_path, runnable, inputs, stages, facts)
    return facts

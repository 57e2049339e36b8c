"""Benchmark: does the per-layer latency table predict the artifact? Predicted (table sum) vs
measured whole-model TVM latency.

    TVM_NUM_THREADS=2 .venv/bin/python bench/latency_prediction.py [--models resnet18,cnn]
        [--configs int8,fp32,mixed] [--repeat 7] [--cache-dir DIR] [--json OUT]

The search's ``latency=`` budget sums a per-layer table (``fliqs profile``; ``driver.measure``):
each entry is one quantized layer compiled alone by ``backends.tvm_measure`` and timed. Issue 14
asks that this sum predict the artifact. Per model (ResNet-18 @224 batch 1 and the small ResNet-8
CNN, 1×1×28×28, both from ``bench/latency.py``, scales calibrated there) and config (``int8``:
every layer int8; ``fp32``; ``mixed``: int8 / int4 / fp8_e4m3 in turn, ``bench/latency.py``'s
mixed config) this script

1. builds the table for exactly the chosen (weight, activation) pairs through
   ``driver.measure.chosen_latency`` (what the report uses: each conv measured in the layout the
   lowered model runs in, ``tvm_measure.model_layout``) and sums it over the searched layers
   (``cost.model.config_cost``, as ``latency=`` and ``report.json totals.searched_latency_ms``
   do); beside it the plain ``fliqs profile`` table of the same pairs (every conv NCHW: the
   table before layouts were told apart); a fresh cache folder unless ``--cache-dir``;
2. lowers the materialized whole model for the same target (``tvm_lower.lower``, what
   ``fliqs compile`` writes as ``tvm/model.so``) and times it with ``time_evaluator`` as the
   report does (median of ``--repeat`` repeats of ≥ 50 ms; also the median of 100 single runs,
   which shrugs off the stalls of a loaded machine);
3. prints predicted, measured, their ratio, and what the table leaves out: layers kept float
   (none here: every layer is searched) and the functions of the artifact that belong to no
   layer (pooling, the model input's quantizer, layout transforms, VM allocations), from a
   per-call profile (``VirtualMachine.set_instrument``, median of 5 runs per function; it adds
   Python overhead per call: read it as shares, not as absolute times).

Goal (issue 14): predicted within 15 % of measured for both models × {int8, fp32, mixed},
2 TVM threads. Results: ``bench/results/latency_prediction.json`` and bench/results/README.md.
These machines are shared and noisy: the load average is printed and stored.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: latency.py, models.py

os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402

import latency as L  # noqa: E402  (bench/latency.py: models, calibration, mixed config, helpers)

CONFIGS = ("int8", "fp32", "mixed")
# Functions of a lowered model that compute a layer (its conv / matmul and the epilogue fused into
# it): hand VNNI kernels and fused functions named after a conv / matmul.
_LAYER_FN = re.compile(r"fliqs_vnni|conv|matmul|dense")


def config_formats(sg, config: str) -> dict:
    """``{layer: {"weight", "activation"}}`` of a config over every searched layer."""
    if config == "mixed":
        return L._mixed_formats(sg)
    fmt = {"int8": "int8", "fp32": "float"}[config]
    return {n: {"weight": fmt, "activation": fmt} for n in sg.layers}


def function_profile(low, x, runs: int = 5) -> dict:
    """Median ms per called function over ``runs`` instrumented runs (one call per function
    symbol summed per run), via ``bench/latency.py``'s ``_op_breakdown``."""
    per = {}
    for _ in range(runs):
        for row in L._op_breakdown(low, x, top=10 ** 6):
            per.setdefault(row["kernel"], []).append(row["ms"])
    return {k: statistics.median(v) for k, v in per.items()}


def _table_sum(sg, formats, table) -> tuple:
    """(sum over the searched layers, {layer: ms}) of ``table`` for ``formats``."""
    from fliqs_compiler.cost.model import config_cost, costed_layers
    per_layer = {la.name: table.layer_ms(la, formats[la.name]["weight"],
                                         formats[la.name]["activation"]) for la in costed_layers(sg)}
    return float(config_cost(sg, formats, "latency", table)), per_layer


def predict(name, sg, x, config, target, repeat, progress=False) -> dict:
    """One row: the table sum of ``config`` (as ``chosen_latency`` measures it, and as the plain
    ``fliqs profile`` table measures it: every conv NCHW) vs the measured whole model."""
    from fliqs_compiler import passes
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.backends.tvm_measure import model_layout
    from fliqs_compiler.cost.model import costed_layers
    from fliqs_compiler.driver.measure import chosen_latency, latency_model
    formats = config_formats(sg, config)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    table = chosen_latency(sg, target, formats, progress)
    table_s = time.perf_counter() - t0
    predicted, per_layer = _table_sum(sg, formats, table)
    pairs = {n: [(e["weight"], e["activation"])] for n, e in formats.items()}
    plain = latency_model(sg, target, [], progress, pairs=pairs)  # `fliqs profile`'s table
    predicted_plain, _ = _table_sum(sg, formats, plain)
    fixed = passes.materialize(sg, formats)
    t0 = time.perf_counter()
    low = lower(fixed, target)
    lower_s = time.perf_counter() - t0
    measured = low.time_ms([x.numpy()], repeat=repeat, min_repeat_ms=50)  # as the report times it
    median_1run = low.time_ms([x.numpy()], repeat=100, min_repeat_ms=0)  # median of single runs
    prof = function_profile(low, x)
    layer_fn = {k: v for k, v in prof.items() if _LAYER_FN.search(k)}
    other_fn = {k: v for k, v in prof.items() if k not in layer_fn}
    layers = costed_layers(sg)
    kept_float = [la.name for la in sg.layers.values() if la not in layers]
    load1 = os.getloadavg()[0]
    row = {"model": name, "config": config, "layout": model_layout(sg, formats, target),
           "table": table.backend, "predicted_ms": predicted, "measured_ms": measured,
           "ratio": predicted / measured, "within_15pct": abs(predicted / measured - 1) <= 0.15,
           "plain_table_predicted_ms": predicted_plain, "plain_table_ratio": predicted_plain / measured,
           "measured_median_single_run_ms": median_1run,
           "table_entries_measured": table.measured + plain.measured,
           "table_s": round(table_s, 1), "lower_s": round(lower_s, 1),
           "kernels": L._kernel_counts(low), "per_layer_ms": per_layer,
           "kept_float_layers": kept_float,
           "profile_layer_fn_ms": sum(layer_fn.values()),
           "profile_other_fn_ms": sum(other_fn.values()),
           "profile_other_fns": dict(sorted(other_fn.items(), key=lambda kv: -kv[1])[:12]),
           "load_average": [round(load0, 2), round(load1, 2)]}
    print(f"  {name:9s} {config:6s} {row['layout']} predicted {predicted:8.3f} ms (NCHW table "
          f"{predicted_plain:8.3f})  measured {measured:8.3f} ms (single-run median "
          f"{median_1run:.3f})  ratio {predicted / measured:5.2f}  table {table_s:.0f} s  "
          f"lower {lower_s:.0f} s  load {load0:.1f}->{load1:.1f}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,resnet18", help="comma list of resnet18,cnn")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of int8,fp32,mixed")
    ap.add_argument("--repeat", type=int, default=5,
                    help="time_evaluator repeats of >= 50 ms (median), as the report times models")
    ap.add_argument("--cache-dir", default=None,
                    help="latency cache folder ($FLIQS_CACHE_DIR); default: a fresh temp folder")
    ap.add_argument("--json", default=None, help="write the rows here as JSON (atomic)")
    ap.add_argument("--progress", action="store_true", help="a progress bar per table")
    args = ap.parse_args(argv)
    os.environ["FLIQS_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="fliqs-predict-")
    from fliqs_compiler.backends.targets import parse_target
    torch.set_num_threads(L.THREADS)
    target = parse_target("llvm")
    configs = [c for c in args.configs.split(",") if c]
    rows = []
    for name, model, shape in L._models([m for m in args.models.split(",") if m]):
        sg, x = L._calibrated(model, shape)
        for config in configs:
            rows.append(predict(name, sg, x, config, target, args.repeat, args.progress))
    print(f"\nthreads: {L.THREADS} (TVM_NUM_THREADS); target {target.key}; "
          f"load average now {[round(v, 2) for v in os.getloadavg()]}")
    print(f"{'model':9s} {'config':6s} {'layout':6s} {'predicted':>9s} {'measured':>9s} "
          f"{'ratio':>6s} {'<=15%':>5s} {'NCHW table':>10s} {'ratio':>6s}  "
          f"non-layer functions (instrumented profile)")
    for r in rows:
        share = r["profile_other_fn_ms"] / max(1e-9, r["profile_other_fn_ms"] + r["profile_layer_fn_ms"])
        top = ", ".join(f"{k[:40]} {v:.3f}" for k, v in list(r["profile_other_fns"].items())[:3])
        print(f"{r['model']:9s} {r['config']:6s} {r['layout']:6s} {r['predicted_ms']:9.3f} "
              f"{r['measured_ms']:9.3f} {r['ratio']:6.2f} {'yes' if r['within_15pct'] else 'NO':>5s} "
              f"{r['plain_table_predicted_ms']:10.3f} {r['plain_table_ratio']:6.2f}  "
              f"{r['profile_other_fn_ms']:.3f} ms ({share:.0%}): {top}")
    if args.json:
        L._write_json(args.json, {"environment": {**L._environment(), "target": target.key,
                                                  "loadavg_end": list(os.getloadavg())},
                                  "rows": rows})
    return rows


if __name__ == "__main__":
    main()

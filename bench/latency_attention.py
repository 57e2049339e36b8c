"""Benchmark: attention MatMuls on the hand VNNI batched kernel (``backends/tvm_attention.py``)
against the plain int8 loops of the rule-based scheduler, in one run.

    .venv/bin/python bench/latency_attention.py [--rounds 11] [--models vit,encoder-12x384]
        [--out bench/results/latency_vit_attention.json]

Models and configs are ``bench/latency.py --model vit``'s (small ViT on Fashion-MNIST, the
12-layer 384-wide 6-head encoder on 128 tokens; ``int8``: every Linear and attention MatMul
int8, calibrated), lowered twice by ``tvm_lower.lower`` (untuned, rule-scheduled):
- ``before``: ``KERNELS`` without the attention entry (the Linears on VNNI, attention MatMuls
  as plain int8 loops);
- ``after``: ``KERNELS`` as ``lower`` applies them by default, the attention kernel included
  (``tvm_lower._Translator.matmul`` names each attention MatMul to the rewrites by its second
  operand).
Both builds must give the same output bit for bit (checked). Timed in interleaved rounds
(``time_evaluator`` median per round; the median and the best of the rounds are reported: on a
loaded machine the best round is the one least disturbed), with onnxruntime fp32 and
``quantize_static`` int8 anchors from the same run. 2 threads everywhere; the load average is
recorded: the machine is shared, compare ratios within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: latency.py's models
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import latency as L  # noqa: E402


@contextlib.contextmanager
def attention_kernel(enabled: bool):
    """``lower`` with or without the attention kernel (its ``KERNELS`` entry left out)."""
    from fliqs_compiler.backends import tvm_kernels as K
    kernels = K.KERNELS
    if not enabled:
        K.KERNELS = tuple(k for k in kernels if k is not K.ATTENTION_KERNEL)
    try:
        yield
    finally:
        K.KERNELS = kernels


def _build(graph, enabled):
    from fliqs_compiler.backends.tvm_lower import lower
    with attention_kernel(enabled):
        t0 = time.perf_counter()
        low = lower(graph, "llvm")
    kernels = {}
    for e in low.executed.values():
        if e["op"] == "matmul":
            kernels[e["kernel"]] = kernels.get(e["kernel"], 0) + 1
    return low, time.perf_counter() - t0, kernels


def model_rows(name, model, calib, rounds):
    import tempfile
    x = calib[:1].numpy()
    anchors = L.ort_anchors(model, calib, tempfile.mkdtemp(prefix="fliqs-bench-att-"), name, 20)
    graph = L.transformer_graphs(model, calib)["int8"]
    builds = {v: _build(graph, v == "after") for v in ("before", "after")}
    outs = {v: b[0].run([x])[0] for v, b in builds.items()}
    assert np.array_equal(outs["before"], outs["after"]), "the attention kernel changed the output"
    times = {v: [] for v in builds}
    for _ in range(rounds):  # interleaved: load changes hit both variants alike
        for v, (low, _, _) in builds.items():
            times[v].append(low.time_ms([x], repeat=3, min_repeat_ms=100))
    base = anchors["ort fp32"]
    rows = [{"model": name, "config": "fp32" if "fp32" in e else "int8", "engine": e, "ms": ms,
             "ratio_to_ort_fp32": ms / base} for e, ms in anchors.items()]
    for v, (low, build_s, kernels) in builds.items():
        ms = statistics.median(times[v])
        rows.append({"model": name, "config": "int8", "engine": f"tvm (untuned), attention {v}",
                     "ms": ms, "min_ms": min(times[v]),
                     "rounds_ms": [round(t, 3) for t in times[v]],
                     "ratio_to_ort_fp32": ms / base, "build_s": round(build_s, 1),
                     "attention_kernels": kernels, "vpdpbusd": low.instruction_counts["vpdpbusd"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds")
    ap.add_argument("--models", default="vit,encoder-12x384", help="comma list")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "latency_vit_attention.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(L.THREADS)
    load = os.getloadavg()
    rows = []
    for name, model, calib in L.transformers():
        if name in args.models.split(","):
            rows += model_rows(name, model, calib, args.rounds)
    env = {**L.environment(), "threads": L.THREADS,
           "loadavg_start": [round(v, 2) for v in load],
           "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    speedups = {}  # of the round medians and of the best rounds (the least disturbed by load)
    for name in {r["model"] for r in rows}:
        ours = {r["engine"].rsplit(" ", 1)[1]: r for r in rows
                if r["model"] == name and "attention" in r["engine"]}
        speedups[name] = {k: round(ours["before"][k] / ours["after"][k], 3)
                          for k in ("ms", "min_ms")}
    print(f"threads {L.THREADS}; load average {env['loadavg_start']} -> {env['loadavg_end']}")
    for r in rows:
        print(f"{r['model']:15s} {r['engine']:36s} {r['ms']:9.3f} ms  "
              f"x{r['ratio_to_ort_fp32']:.2f}")
    print("before / after (median of rounds, best round):", speedups)
    L.write_json(Path(args.out), {"environment": env, "speedup_before_over_after": speedups,
                                   "rows": rows})


if __name__ == "__main__":
    main()

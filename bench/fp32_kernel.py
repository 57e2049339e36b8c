"""The fp32 FMA kernel (``backends/tvm_fp32.py``) A/B, in one process: the same model lowered with
the kernel registry as shipped and without ``FP32_KERNEL`` (the float layers then on the generic
rule schedules, NCHW around the other kernels: the previous behaviour), with onnxruntime fp32 on
the same model as the anchor.

ResNet-18 @224 (random weights, non-trivial BN statistics, as ``bench/latency.py``), batch 1:

- ``fp32``: every layer float;
- ``int8-float-ends``: int8 but the first and last layer float (``fliqs compile``'s default).

Prints medians of interleaved rounds (ms), the speedup of the kernel, onnxruntime fp32 / TVM, the
layers per kernel, and the largest output difference between the two builds; ``--json`` writes
them.

    python bench/fp32_kernel.py [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

import latency as L  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_kernels as K  # noqa: E402
from ab import finish, interleaved_ms, lower_variants, parse_args  # noqa: E402


@contextlib.contextmanager
def _registry(kernels):
    """``tvm_kernels.KERNELS`` replaced by ``kernels`` for the lowering inside."""
    shipped, K.KERNELS = K.KERNELS, kernels
    try:
        yield
    finally:
        K.KERNELS = shipped


def main(argv=None):
    args = parse_args(__doc__, argv)
    _, model, shape = next(L.models(["resnet18"]))
    sg, x = L.calibrated(model, shape)
    configs = {"fp32": {}, "int8-float-ends": L.int8_formats(sg, float_ends=True)}
    shipped = K.KERNELS
    variants = {"fp32-kernel": lambda: _registry(shipped),
                "generic": lambda: _registry(tuple(k for k in shipped if k is not K.FP32_KERNEL))}
    lows = lower_variants({cfg: passes.materialize(sg, f) for cfg, f in configs.items()}, variants)
    builds = {k: low.timing_s.get("total") for k, low in lows.items()}
    fp32_graph = passes.materialize(sg, {})
    with tempfile.TemporaryDirectory() as work:
        times, ort = interleaved_ms(lows, x, args.rounds,
                                    extra=lambda: L.ort_ms(fp32_graph, x, 30, work, "fp32"))
    ort_ms = statistics.median(ort)
    rows = []
    for cfg in configs:
        a, b = (lows[(cfg, h)].run([x.numpy()])[0] for h in variants)
        with_k, generic = (statistics.median(times[(cfg, h)]) for h in variants)
        row = {"config": cfg, "fp32_kernel_ms": with_k, "generic_ms": generic,
               "speedup": generic / with_k, "onnxruntime_fp32_ms": ort_ms,
               "onnxruntime_fp32_over_tvm": ort_ms / with_k,
               "kernels": {h: L.kernel_counts(lows[(cfg, h)]) for h in variants},
               "build_s": {h: builds[(cfg, h)] for h in variants},
               "max_abs_diff": float(np.abs(a - b).max()), "max_abs_out": float(np.abs(a).max()),
               "samples": {h: times[(cfg, h)] for h in variants}}
        rows.append(row)
        print(f"{cfg:16s} fp32 kernel {with_k:7.2f} ms  generic {generic:7.2f} ms  "
              f"({row['speedup']:.2f}x)  onnxruntime fp32 {ort_ms:.2f} ms "
              f"(ORT/TVM {row['onnxruntime_fp32_over_tvm']:.2f})  kernels {json.dumps(row['kernels']['fp32-kernel'])}  "
              f"max |diff| {row['max_abs_diff']:.2g} (|out| ≤ {row['max_abs_out']:.2g})", flush=True)
    finish(args, rows, onnxruntime_fp32_samples=ort)


if __name__ == "__main__":
    main()

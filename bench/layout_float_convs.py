"""Which layout a model with float convs among the hand kernels should run in: the lowering's rule
(``tvm_kernels``: NHWC when every conv is on a hand kernel or is a float image stem, else NCHW with
transposes around each kernel call) against NHWC forced for every model, in one process.

ResNet-18 @224 (random weights, non-trivial BN statistics, as ``bench/latency.py``), 2 threads:

- ``int8-float-ends``: int8 but the first and last layer float (``fliqs compile``'s default);
- ``mixed-no-bf16``: int8 / int4 / fp8_e4m3 on a target without avx512bf16 (fp8 layers as fp32 convs);
- ``fp32``: every layer float.

Prints median ms of interleaved rounds and the largest output difference between the two builds;
``--json`` writes them.

    python bench/layout_float_convs.py [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

import latency as L  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_kernels as K  # noqa: E402
from fliqs_compiler.backends.tvm_lower import lower  # noqa: E402

NO_BF16 = '{"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512bf16"]}'


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    _, model, shape = next(L.models(["resnet18"]))
    sg, x = L.calibrated(model, shape)
    configs = {"int8-float-ends": (L.int8_formats(sg, float_ends=True), "llvm"),
               "mixed-no-bf16": (L.mixed_formats(sg), NO_BF16), "fp32": ({}, "llvm")}
    rule = K.KERNELS
    forced = (dataclasses.replace(rule[0], rewrite=lambda mod, *a: rule[0].rewrite(K.to_nhwc(mod), *a)),) + rule[1:]
    lows = {}
    for cfg, (formats, target) in configs.items():
        for how, kernels in (("rule", rule), ("nhwc-forced", forced)):
            K.KERNELS = kernels
            try:
                lows[(cfg, how)] = lower(passes.materialize(sg, formats), target, None)
            finally:
                K.KERNELS = rule
    times = {k: [] for k in lows}
    for _ in range(args.rounds):
        for k, low in lows.items():
            times[k].append(low.time_ms([x.numpy()], repeat=10, min_repeat_ms=100))
    rows = []
    for cfg in configs:
        a, b = (lows[(cfg, h)].run([x.numpy()])[0] for h in ("rule", "nhwc-forced"))
        row = {"config": cfg, "rule_ms": statistics.median(times[(cfg, "rule")]),
               "nhwc_forced_ms": statistics.median(times[(cfg, "nhwc-forced")]),
               "max_abs_diff": float(np.abs(a - b).max()), "max_abs_out": float(np.abs(a).max()),
               "samples": {h: times[(cfg, h)] for h in ("rule", "nhwc-forced")}}
        rows.append(row)
        print(f"{cfg:16s} rule {row['rule_ms']:7.2f} ms  NHWC forced {row['nhwc_forced_ms']:7.2f} ms  "
              f"max |diff| {row['max_abs_diff']:.2g} (|out| ≤ {row['max_abs_out']:.2g})", flush=True)
    load = os.getloadavg()
    print(f"threads {os.environ['TVM_NUM_THREADS']}, load average {load[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": int(os.environ["TVM_NUM_THREADS"]), "load": load,
                                               "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

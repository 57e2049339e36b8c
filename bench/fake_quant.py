"""Benchmark: fq.fake_quant per format vs torch.fake_quantize_per_tensor_affine (int8), same run.

    .venv/bin/python bench/fake_quant.py [--numel 4194304] [--threads 2] [--repeat 30]

Prints the median time per call and the ratio to torch's int8 fake-quant measured in the same
process (these machines are noisy: only ratios from one run are comparable). Goal (issue 2):
every FP format <= 1.5x torch's int8 fake-quant.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import fliqs_compiler as fq
from fliqs_compiler.numerics import formats as F


def _median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.numel) * 3
    rows = []
    with torch.no_grad():
        base = _median_ms(lambda: torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127),
                          args.repeat)
        rows.append(("torch int8 (baseline)", base))
        scale = torch.tensor(0.05)
        for name in F.searchable_names():
            fmt = F.get(name)
            if fmt.kind == "float":
                continue
            axis = 0 if fmt.kind == "mx" else None
            ms = _median_ms(lambda: fq.fake_quant(x, fmt, scale, axis), args.repeat)
            rows.append((name, ms))
    cpu = platform.processor() or platform.machine()
    if args.json:
        print(json.dumps({"threads": args.threads, "numel": args.numel, "cpu": cpu,
                          "ms": dict(rows), "baseline_ms": base}, indent=2))
        return
    print(f"fake_quant on {args.numel:,} float32 elements, {args.threads} threads, {cpu}")
    print(f"{'format':24s} {'median ms':>10s} {'x torch int8':>13s}")
    for name, ms in rows:
        kind = F.get(name).kind if name in F.names() else ""
        flag = "  (goal <= 1.5x)" if kind == "fp" else ""
        print(f"{name:24s} {ms:10.2f} {ms / base:13.2f}{flag}")


if __name__ == "__main__":
    main()

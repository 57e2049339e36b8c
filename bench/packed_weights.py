"""Low-bit weights packed inside the VNNI kernels (``backends/tvm_packed_weights.py``) A/B, in one
process: the same model lowered with int4 / int2 weights packed 2 / 4 per byte and unpacked in the
kernel, and with them stored as int8 (the previous behaviour), with onnxruntime's int8 QDQ model
(its own ``quantize_static``, per channel) as the anchor.

ResNet-18 @224 (random weights, non-trivial BN statistics, as ``bench/latency.py``), batch 1,
activations int8 throughout:

- ``w4a8`` / ``w2a8``: every layer's weight int4 / int2 (the packed kernels' best case for size,
  their worst for the unpack overhead: every conv is compute-bound);
- ``mixed``: ``bench/latency.py``'s mix, layers in turn int8 / int4 / fp8_e4m3;
- ``int8``: every weight int8 (a control: both variants lower it identically).

Prints medians of interleaved rounds (ms), packed / int8-stored time, the artifact sizes (MB) and
the largest output difference between the two builds (0: both sum exactly in int32); ``--json``
writes them.

    python bench/packed_weights.py [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

import latency as L  # noqa: E402
from ab import finish, interleaved_ms, lower_variants, parse_args  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_kernels as K  # noqa: E402
from fliqs_compiler.backends.onnx_export import export_qdq  # noqa: E402
from fliqs_compiler.backends.ort_backend import make_session, time_onnx  # noqa: E402


@contextlib.contextmanager
def _int8_storage():
    """Every VNNI weight stored as int8, whatever its codes (the behaviour before packing)."""
    shipped, K.vnni_weight_bits = K.vnni_weight_bits, lambda const, op: 8
    try:
        yield
    finally:
        K.vnni_weight_bits = shipped


def _weights(sg, fmt):
    return {n: {"weight": fmt, "activation": "int8"} for n in sg.layers}


def main(argv=None):
    args = parse_args(__doc__, argv)
    _, model, shape = next(L.models(["resnet18"]))
    sg, x = L.calibrated(model, shape, formats=("int8", "int4", "int2", "fp8_e4m3"))
    configs = {"w4a8": _weights(sg, "int4"), "w2a8": _weights(sg, "int2"),
               "mixed": L.mixed_formats(sg), "int8": _weights(sg, "int8")}
    variants = {"packed": contextlib.nullcontext, "int8-stored": _int8_storage}
    with tempfile.TemporaryDirectory() as work:
        lows = lower_variants({c: passes.materialize(sg, f) for c, f in configs.items()}, variants,
                              out_root=work)
        sizes = {k: low.path.stat().st_size / 1e6 for k, low in lows.items()}
        fp32_onnx = export_qdq(passes.materialize(sg, {}), Path(work) / "fp32.onnx")
        ort_int8 = make_session(L.ort_int8_static(fp32_onnx, x, Path(work) / "ort_int8.onnx"), L.THREADS)
        times, ort = interleaved_ms(lows, x, args.rounds, extra=lambda: time_onnx(
            ort_int8, [x.numpy()], threads=L.THREADS, repeat=30))
    ort_ms = statistics.median(ort)
    rows = []
    for cfg in configs:
        a, b = (lows[(cfg, h)].run([x.numpy()])[0] for h in variants)
        packed, stored = (statistics.median(times[(cfg, h)]) for h in variants)
        row = {"config": cfg, "packed_ms": packed, "int8_stored_ms": stored,
               "packed_over_int8_stored": packed / stored, "onnxruntime_int8_ms": ort_ms,
               "size_mb": {h: sizes[(cfg, h)] for h in variants},
               "storage": sorted({e["weight_storage"] for e in lows[(cfg, "packed")].executed.values()
                                  if e["kernel"] == "vnni"}),
               "kernels": L.kernel_counts(lows[(cfg, "packed")]),
               "max_abs_diff": float(np.abs(a - b).max()),
               "samples": {h: times[(cfg, h)] for h in variants}}
        rows.append(row)
        print(f"{cfg:6s} packed {packed:7.2f} ms  int8-stored {stored:7.2f} ms "
              f"({row['packed_over_int8_stored']:.2f}x)  size {row['size_mb']['packed']:.1f} vs "
              f"{row['size_mb']['int8-stored']:.1f} MB  onnxruntime int8 {ort_ms:.2f} ms  "
              f"max |diff| {row['max_abs_diff']:.2g}  {row['storage']}", flush=True)
    finish(args, rows, onnxruntime_int8_samples=ort)


if __name__ == "__main__":
    main()

"""Epilogues fused into the hand conv kernels' tile write-back (``backends/tvm_epilogue.py``) A/B, in
one process: the same models compiled with the epilogue fusion (as shipped) and with the plain
fusion pipeline (each kernel opaque, its requantize / bias / ReLU / residual add a separate
function reading the int32 accumulators back: the behaviour before), with onnxruntime's int8 QDQ
model (its own ``quantize_static``, per channel) and OpenVINO int8 on the same QDQ model as anchors
(the issue's goal and stretch goal).

``--model resnet18`` (default): ResNet-18 @224 (random weights, non-trivial BN statistics, as
``bench/latency.py``), batch 1: ``int8`` (every layer), ``int8-float-ends`` (``fliqs compile``'s
default: first and last float), ``mixed`` (int8 / int4 / fp8_e4m3 in turn), ``w4a8`` (int4
weights, int8 activations). ``--model encoder``: the 12-block, 384-wide transformer encoder of
``bench/latency.py --model vit`` (random weights, [1, 128, 384] tokens), ``int8`` and ``mixed``:
the epilogues of the Linears (VNNI dense kernels) fused or not.

Prints medians of interleaved rounds (ms), fused / unfused, the anchors / fused TVM, the layers per
kernel, and the largest output difference between the builds (0 expected:
the same ops on the same values); ``--json`` writes them.

    python bench/epilogue.py [--model resnet18|encoder] [--rounds 5] [--json out.json]
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
from ab import finish, interleaved_ms, lower_variants, parse_args  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_lower as TL  # noqa: E402
from fliqs_compiler.backends.onnx_export import export_qdq  # noqa: E402
from fliqs_compiler.backends.ort_backend import make_session, time_onnx  # noqa: E402


@contextlib.contextmanager
def _plain_fusion():
    """``tvm_lower.fuse_pipeline`` as it was: LegalizeOps, AnnotateTIROpPattern, FuseOps, FuseTIR
    with every hand kernel opaque."""
    from tvm import relax, transform
    shipped = TL.fuse_pipeline
    TL.fuse_pipeline = lambda: transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(), relax.transform.FuseTIR()])
    try:
        yield
    finally:
        TL.fuse_pipeline = shipped


def _resnet18():
    """(``{config: Graph}``, the fp32 Graph, the input) of ResNet-18 @224."""
    _, model, shape = next(L._models(["resnet18"]))
    sg, x = L._calibrated(model, shape)
    configs = {"int8": L._int8_formats(sg), "int8-float-ends": L._int8_formats(sg, float_ends=True),
               "mixed": L._mixed_formats(sg),
               "w4a8": {n: {"weight": "int4", "activation": "int8"} for n in sg.layers}}
    return ({c: passes.materialize(sg, f) for c, f in configs.items()}, passes.materialize(sg, {}),
            x)


def _encoder():
    """The same for ``bench/latency.py``'s 12-block, 384-wide encoder on [1, 128, 384] tokens:
    every Linear on the VNNI dense kernel, whose write-back takes the epilogue too."""
    name, model, calib = next((n, m, c) for n, m, c in L._transformers() if n.startswith("encoder"))
    graphs = L._transformer_graphs(model, calib)
    return {c: graphs[c] for c in ("int8", "mixed")}, graphs["fp32"], calib[:1]


MODELS = {"resnet18": _resnet18, "encoder": _encoder}


def main(argv=None):
    args = parse_args(__doc__, argv, models=MODELS)
    graphs, fp32, x = MODELS[args.model]()
    variants = {"fused": contextlib.nullcontext, "unfused": _plain_fusion}
    feed = [x.numpy()]
    with tempfile.TemporaryDirectory() as work:
        lows = lower_variants(graphs, variants)
        fp32_onnx = export_qdq(fp32, Path(work) / "fp32.onnx")
        qdq = L._ort_int8_static(fp32_onnx, x, Path(work) / "ort_int8.onnx")
        ort = make_session(qdq, L.THREADS)
        openvino = L._openvino_timer(qdq, feed, 30)

        def anchors():
            return {"onnxruntime_int8": time_onnx(ort, feed, threads=L.THREADS, repeat=30),
                    **({"openvino_int8": openvino()} if openvino else {})}
        times, anchor_rounds = interleaved_ms(lows, x, args.rounds, extra=anchors)
    anchor_ms = {k: statistics.median(r[k] for r in anchor_rounds) for k in anchor_rounds[0]}
    rows = []
    for cfg in graphs:
        a, b = (lows[(cfg, h)].run(feed)[0] for h in variants)
        fused, plain = (statistics.median(times[(cfg, h)]) for h in variants)
        row = {"config": cfg, "fused_ms": fused, "unfused_ms": plain, "fused_over_unfused": fused / plain,
               "anchors_ms": anchor_ms, "anchor_over_fused": {k: v / fused for k, v in anchor_ms.items()},
               "kernels": L._kernel_counts(lows[(cfg, "fused")]),
               "max_abs_diff": float(np.abs(a - b).max()),
               "samples": {h: times[(cfg, h)] for h in variants}}
        rows.append(row)
        ratios = "  ".join(f"{k} {v:.2f} ms (/TVM {v / fused:.2f})" for k, v in anchor_ms.items())
        print(f"{cfg:16s} fused {fused:6.2f} ms  unfused {plain:6.2f} ms ({fused / plain:.2f}x)  "
              f"{ratios}  kernels {json.dumps(row['kernels'])}  max |diff| {row['max_abs_diff']:.2g}",
              flush=True)
    finish(args, rows, model=args.model, anchor_samples=anchor_rounds)


if __name__ == "__main__":
    main()

"""Depthwise convs in the kernels' NHWC layout (``backends/tvm_layout.py``: ``depthwise``,
``_depthwise_hwio``, ReLU6's ``clip`` carried through the layout) A/B, in one process, on a
MobileNetV2-shaped network (``examples.toy_models.MobileNetV2Small`` @224, random weights,
non-trivial BN statistics, batch 1), with onnxruntime's int8 QDQ model (its own
``quantize_static``, per channel) and OpenVINO int8 on it as anchors.

Variants: ``nhwc`` (as shipped: the whole graph in NHWC, every depthwise conv TVM's own conv reading
HWIO weights, rule-scheduled along the channels); ``nhwc-oihw`` (NHWC, the depthwise weights left
OIHW: the 16 channels of a vector gathered 9 bytes apart); ``nchw`` (the rule before: a depthwise
conv kept the model in NCHW, every VNNI conv transposing around itself). Configs: ``int8`` (every
layer), ``int8-float-ends`` (``fliqs compile``'s default), ``mixed`` (int8 / int4 / fp8_e4m3 in
turn), ``fp32`` (every layer float: the depthwise convs fp32, the others on the FMA kernel).

    python bench/depthwise_layout.py [--rounds 5] [--json out.json]
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import latency as L  # noqa: E402
from ab import against_int8_peers, finish, parse_args, patched  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_layout as LY  # noqa: E402


VARIANTS = {"nhwc": contextlib.nullcontext,
            "nhwc-oihw": lambda: patched(LY, "_depthwise_hwio", lambda mod: mod),
            "nchw": lambda: patched(LY, "depthwise", lambda call: False)}


def main(argv=None):
    args = parse_args(__doc__, argv)
    _, model, shape = next(L.models(["mobilenet"]))
    sg, x = L.calibrated(model, shape)
    configs = {"int8": L.int8_formats(sg), "int8-float-ends": L.int8_formats(sg, float_ends=True),
               "mixed": L.mixed_formats(sg), "fp32": {}}
    graphs = {c: passes.materialize(sg, f) for c, f in configs.items()}
    rows, anchor_rounds = against_int8_peers(graphs, passes.materialize(sg, {}), x, VARIANTS,
                                             args.rounds, L.kernel_counts)
    finish(args, rows, model="mobilenet", anchor_samples=anchor_rounds)


if __name__ == "__main__":
    main()

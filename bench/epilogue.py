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
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import latency as L  # noqa: E402
from ab import against_int8_peers, finish, parse_args  # noqa: E402
from fliqs_compiler import passes  # noqa: E402
from fliqs_compiler.backends import tvm_lower as TL  # noqa: E402


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
    _, model, shape = next(L.models(["resnet18"]))
    sg, x = L.calibrated(model, shape)
    configs = {"int8": L.int8_formats(sg), "int8-float-ends": L.int8_formats(sg, float_ends=True),
               "mixed": L.mixed_formats(sg),
               "w4a8": {n: {"weight": "int4", "activation": "int8"} for n in sg.layers}}
    return ({c: passes.materialize(sg, f) for c, f in configs.items()}, passes.materialize(sg, {}),
            x)


# the encoder: every Linear on the VNNI dense kernel, whose write-back takes the epilogue too
MODELS = {"resnet18": _resnet18, "encoder": lambda: L.ab_graphs("encoder")}


def main(argv=None):
    args = parse_args(__doc__, argv, models=MODELS)
    graphs, fp32, x = MODELS[args.model]()
    variants = {"fused": contextlib.nullcontext, "unfused": _plain_fusion}
    rows, anchor_rounds = against_int8_peers(graphs, fp32, x, variants, args.rounds, L.kernel_counts)
    finish(args, rows, model=args.model, anchor_samples=anchor_rounds)


if __name__ == "__main__":
    main()

"""Two fixes to the loops of untuned TVM builds A/B, in one process, with onnxruntime's int8 QDQ
model (its own ``quantize_static``, per channel) and OpenVINO int8 on it as anchors:

- quantizers that vectorize (``backends/tvm_compat.py``, ``vectorizable_nearbyint``): TVM 0.27
  does not mark ``tirx.nearbyint`` (Relax's ``round``: every quantizer's round half even)
  vectorizable, so its vectorizer scalarizes every loop that rounds, and LLVM rebuilds the loop
  from gathers and per-byte extracts;
- pools that read their input in place (``backends/tvm_schedules.py``, ``_window_reduction``):
  the pad is inlined into the pool instead of written out as a padded copy first.

Variants: ``shipped`` (both fixes), ``scalarized`` (TVM as released: the attribute reset),
``pad-copied`` (the pool's padded copy back). Models (``--model``, ``latency.ab_graphs``): ``mobilenet``
(``examples.toy_models.MobileNetV2Small`` @224: a standalone quantizer after the stem, another
on the input), ``resnet18`` (@224) — configs ``int8`` (every layer), ``int8-float-ends``
(``fliqs compile``'s default), ``mixed`` (int8 / int4 / fp8_e4m3 in turn) — and ``encoder`` (12
blocks, 384 wide, [1, 128, 384]; ``int8``, ``mixed``: quantizers inside every block).

    python bench/vector_loops.py [--model mobilenet] [--rounds 5] [--json out.json]
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
from fliqs_compiler.backends import tvm_compat, tvm_schedules  # noqa: E402


@contextlib.contextmanager
def _as_released():
    """TVM 0.27 as released while a variant is lowered: ``tirx.nearbyint`` not vectorizable."""
    import tvm
    shipped = tvm_compat.vectorizable_nearbyint
    tvm_compat.vectorizable_nearbyint = lambda: None
    tvm.ir.Op.get("tirx.nearbyint").reset_attr("TVectorizable")
    try:
        yield
    finally:
        tvm_compat.vectorizable_nearbyint = shipped
        shipped()


# pad-copied: pools as before, no producer inlined into any reduction
VARIANTS = {"shipped": contextlib.nullcontext, "scalarized": _as_released,
            "pad-copied": lambda: patched(tvm_schedules, "_window_reduction", lambda sch, block: False)}
MODELS = ("mobilenet", "resnet18", "encoder")


def main(argv=None):
    args = parse_args(__doc__, argv, MODELS)
    graphs, fp32, x = L.ab_graphs(args.model)
    rows, anchor_rounds = against_int8_peers(graphs, fp32, x, VARIANTS, args.rounds, L.kernel_counts)
    finish(args, rows, model=args.model, anchor_samples=anchor_rounds)


if __name__ == "__main__":
    main()

"""A/B of one lowering change, in one process: each configuration's graph lowered under each
variant (a context manager that installs it: a kernel registry, a storage rule), then timed in
interleaved rounds so the box's drift hits every variant alike. Shared by ``fp32_kernel.py`` and
``packed_weights.py``."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from fliqs_compiler.backends.tvm_lower import lower


def parse_args(doc: str, argv=None, models=None):
    """``--rounds`` (default 5) and ``--json``, the A/B benches' options; ``--model`` (default
    the first) when the bench offers ``models``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    if models:
        ap.add_argument("--model", choices=list(models), default=next(iter(models)))
    return ap.parse_args(argv)


def finish(args, rows: list, **extra) -> None:
    """Print the threads and load average; with ``--json``, write them, the rounds, ``rows`` and
    ``extra`` (an anchor's per-round samples)."""
    load = os.getloadavg()
    threads = int(os.environ["TVM_NUM_THREADS"])
    print(f"threads {threads}, load average {load[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "load": load, "rounds": args.rounds,
                                               **extra, "rows": rows}, indent=1))


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name`` set to ``value`` while a variant is lowered (a "before" rule installed by
    swapping the module attribute the lowering looks up), then restored."""
    shipped = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, shipped)


def lower_variants(graphs: dict, variants: dict, out_root=None) -> dict:
    """``{(config, variant): Lowered}``: ``graphs`` ``{config: Graph}``, ``variants``
    ``{name: () -> context manager}``; with ``out_root``, each artifact is written under
    ``out_root/<config>-<variant>/tvm/model.so``."""
    lows = {}
    for cfg, graph in graphs.items():
        for how, installed in variants.items():
            with installed():
                out = None if out_root is None else f"{out_root}/{cfg}-{how}"
                lows[(cfg, how)] = lower(graph, "llvm", out)
    return lows


def interleaved_ms(lows: dict, x, rounds: int, extra=None) -> tuple:
    """(``{key: [ms per round]}``, ``[extra() per round]``): every lowering timed once per round
    (``Lowered.time_ms``, 10 runs or 100 ms), ``extra`` (an anchor's timer) after them."""
    times = {k: [] for k in lows}
    anchor = []
    for _ in range(rounds):
        for k, low in lows.items():
            times[k].append(low.time_ms([x.numpy()], repeat=10, min_repeat_ms=100))
        if extra is not None:
            anchor.append(extra())
    return times, anchor


def paired_ratios(base: list, others: dict) -> dict:
    """``{name: median over rounds of base[i] / samples[i]}``: each round's ratio of the shipped
    variant to another variant or an anchor timed in the same round. On a box whose speed drifts
    between rounds (every engine 1.5-2x slower for a while) the paired ratio is steadier than a
    ratio of medians."""
    return {k: statistics.median(b / o for b, o in zip(base, v)) for k, v in others.items()}


def against_int8_peers(graphs: dict, fp32, x, variants: dict, rounds: int, kernel_counts) -> tuple:
    """The A/B of ``variants`` (the first: as shipped) on every graph of ``graphs``, timed in
    ``rounds`` interleaved rounds with onnxruntime's own int8 QDQ model (``quantize_static`` of
    ``fp32``'s export, per channel) and OpenVINO int8 on it (when installed) after each round.
    Prints one line per config; returns (rows, per-round anchor samples). A row: medians per
    variant (``<variant>_ms``), the first over each other, the anchors over the first, the first's
    layers per kernel (``kernel_counts(Lowered)``) and the largest output difference between the
    first and each other variant."""
    import latency as L
    from fliqs_compiler.backends.onnx_export import export_qdq
    from fliqs_compiler.backends.ort_backend import make_session, time_onnx
    feed = [x.numpy()]
    shipped, *others = variants
    with tempfile.TemporaryDirectory() as work:
        lows = lower_variants(graphs, variants)
        fp32_onnx = export_qdq(fp32, Path(work) / "fp32.onnx")
        qdq = L.ort_int8_static(fp32_onnx, x, Path(work) / "ort_int8.onnx")
        ort = make_session(qdq, L.THREADS)
        openvino = L.openvino_timer(qdq, feed, 30)

        def anchors():
            return {"onnxruntime_int8": time_onnx(ort, feed, threads=L.THREADS, repeat=30),
                    **({"openvino_int8": openvino()} if openvino else {})}
        times, anchor_rounds = interleaved_ms(lows, x, rounds, extra=anchors)
    anchor_ms = {k: statistics.median(r[k] for r in anchor_rounds) for k in anchor_rounds[0]}
    rows = []
    for cfg in graphs:
        ms = {h: statistics.median(times[(cfg, h)]) for h in variants}
        out = {h: lows[(cfg, h)].run(feed)[0] for h in variants}
        row = {"config": cfg, **{f"{h}_ms": v for h, v in ms.items()},
               **{f"{shipped}_over_{h}": ms[shipped] / ms[h] for h in others},
               "paired": paired_ratios(times[(cfg, shipped)],
                                       {**{h: times[(cfg, h)] for h in others},
                                        **{k: [r[k] for r in anchor_rounds] for k in anchor_ms}}),
               "anchors_ms": anchor_ms, f"anchor_over_{shipped}": {k: v / ms[shipped] for k, v in anchor_ms.items()},
               "kernels": kernel_counts(lows[(cfg, shipped)]),
               "max_abs_diff": {h: float(np.abs(out[shipped] - out[h]).max()) for h in others},
               "samples": {h: times[(cfg, h)] for h in variants}}
        rows.append(row)
        ab = "  ".join(f"{h} {ms[h]:6.2f} ms ({ms[shipped] / ms[h]:.2f}x)" for h in others)
        ratios = "  ".join(f"{k} {v:.2f} ms (/TVM {v / ms[shipped]:.2f})" for k, v in anchor_ms.items())
        pairs = "  ".join(f"{k} {v:.2f}" for k, v in row["paired"].items())
        print(f"{cfg:16s} {shipped} {ms[shipped]:6.2f} ms  {ab}  {ratios}  kernels "
              f"{json.dumps(row['kernels'])}  max |diff| {json.dumps(row['max_abs_diff'])}\n"
              f"{'':16s} paired per round, {shipped} over: {pairs}", flush=True)
    return rows, anchor_rounds

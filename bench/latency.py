"""Benchmark: end-to-end latency of fp32 and mixed INT8/INT4/FP8 models on TVM, onnxruntime, torch.

    .venv/bin/python bench/latency.py [--quick] [--models resnet18,cnn] [--configs fp32,mixed]
        [--tune-trials N --tune-per-task P --tune-round R] [--tune-dir DIR]
        [--layers [--layer-tune-trials T]] [--out bench/results/latency.json]
    .venv/bin/python bench/latency.py --scheduled [--models resnet18,cnn] [--configs fp32,int8,mixed]
        [--rounds 3] [--out bench/results/latency_scheduled.json]

Models: ResNet-18 at 1×3×224×224 (built here, random weights, BN folded by the passes) and the
Fashion-MNIST-size CNN (``search.toy.ResNet8``, 1×1×28×28). Configs: ``fp32`` and ``mixed`` (every
quantized layer gets int8 / int4 / fp8_e4m3 in turn, weight = activation format; calibrated
scales). Engines (2 threads everywhere; the thread count is printed with the table):
- ``torch``: eager fp32 module / the fake-quant graph;
- ``ort``: onnxruntime on the fp32 ONNX / the QDQ ONNX (``backends.onnx_export.export_qdq``);
- ``tvm``: ``tvm_lower.lower`` default build (fused, every function rule-scheduled by
  ``tvm_schedules``; hand VNNI kernels for int8/int4 conv/linear), ``tvm-novnni`` (same without
  VNNI), and ``tvm-tuned`` when ``--tune-trials N``
  > 0 (MetaSchedule: at most N trials per model and P per task, R candidates per scheduler round —
  every task gets one round, the rest goes to the tasks with the largest expected gain; database
  in ``--tune-dir``: tasks it already holds, from any earlier run or model, are not tuned again;
  tuning time and reused / tuned task counts printed).
``--layers`` adds single ResNet-18 layers (int8 VNNI / plain int8 / fp32 TVM, with
``--layer-tune-trials`` also MetaSchedule-tuned fp32 — the fair fp32 baseline; ORT fp32 and QDQ;
torch fp32).
One table of medians (ms) and ratios to torch fp32 of the same model. ``--quick``: the CNN only,
fewer repeats. These machines are shared and noisy: compare numbers from one run only.

``--model vit`` (results: ``bench/results/latency_vit.json``): transformers instead — the small
ViT (``examples.toy_models.ViT``, 1×1×28×28, calibrated on Fashion-MNIST) and a 12-layer,
384-wide, 6-head encoder (MLP 1536, 128 tokens, batch 1, random weights) for latency. Configs
``fp32``, ``int8`` (every Linear and attention MatMul int8, weights per channel) and ``mixed``
(int8 / int4 / fp8_e4m3 in turn), through our TVM lowering (untuned: default schedules, hand VNNI
kernels for int8 Linears) and our QDQ ONNX in onnxruntime; the anchors, in the same run:
onnxruntime fp32 on the float ONNX and onnxruntime int8 from its own ``quantize_static``
(per channel, QDQ, on that float ONNX). Ratios are to onnxruntime fp32. ``--profile`` adds a
per-op breakdown of the TVM runs (``VirtualMachine.set_instrument`` timing every call: TVM
0.27's VM has no ``profile``).

``--scheduled`` (``scheduled_rows``): per model and config (fp32, all-int8, mixed) TVM's default
build (``schedule=False, fuse=False``: naive loops outside the hand VNNI kernels) against the
rule-scheduled build, with lowering times, the functions per schedule rule, and onnxruntime
anchors (fp32; int8 from onnxruntime's own per-channel ``quantize_static``; our QDQ export of
each config) and OpenVINO anchors (fp32, and int8 from that same ``quantize_static`` QDQ model;
``pip install '.[bench]'``, skipped with a note without it), all timed in interleaved rounds after
everything is built.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: examples/


os.environ.setdefault("TVM_NUM_THREADS", "2")

import torch  # noqa: E402
from torch import nn  # noqa: E402

THREADS = int(os.environ["TVM_NUM_THREADS"])
MIX = ("int8", "int4", "fp8_e4m3")


# ---- models ------------------------------------------------------------------------------------
from models import ResNet18  # noqa: E402  (bench/models.py, shared with import_passes.py)


def models(names):
    from examples.toy_models import MobileNetV2Small, ResNet8
    table = {"resnet18": (lambda: ResNet18(), (1, 3, 224, 224)),
             "cnn": (lambda: ResNet8(in_ch=1, classes=10), (1, 1, 28, 28)),
             "mobilenet": (lambda: MobileNetV2Small(), (1, 3, 224, 224))}
    for n in names:
        if n not in table:
            sys.exit(f"unknown model {n!r}; choose from {', '.join(table)}")
        torch.manual_seed(0)
        ctor, shape = table[n]
        m = ctor().eval()
        for mod in m.modules():  # non-trivial BN statistics
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        yield n, m, shape


# ---- configs -----------------------------------------------------------------------------------
def calibrated(model, shape, formats=MIX):
    """(searchable graph with every one of ``formats``' scales calibrated, input)."""
    import fliqs_compiler as fq
    from fliqs_compiler import passes
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g = fq.load(model, (x,))
    opts = passes.PrepareOptions(formats=list(formats), keep_float_first=False, keep_float_last=False,
                                 scale_mode="calibrated")
    sg = passes.prepare(g, opts)
    with torch.no_grad():  # calibrate every candidate's scale once, then fix formats
        for fmt in formats:
            sg.space.apply(sg.gm, sg.space.choice_of({n: {"weight": fmt, "activation": fmt}
                                                      for n in sg.layers}))
            sg(x)
    return sg, x


def _graphs(model, shape):
    """(fp32 Graph, mixed materialized Graph, mixed formats)."""
    from fliqs_compiler import passes
    sg, x = calibrated(model, shape)
    formats = mixed_formats(sg)
    return passes.materialize(sg, {}), passes.materialize(sg, formats), formats, x


def int8_formats(sg, float_ends: bool = False):
    """Every searched layer int8 × int8; ``float_ends``: but the first and last float (what
    ``fliqs compile`` keeps float by default)."""
    names = list(sg.layers)
    ends = (names[0], names[-1]) if float_ends else ()
    return {n: {"weight": "int8", "activation": "int8"} for n in names if n not in ends}


def mixed_formats(sg):
    """Every searched layer in turn int8 / int4 / fp8_e4m3 (weight = activation format)."""
    return {name: {"weight": MIX[i % 3], "activation": MIX[i % 3]}
            for i, name in enumerate(sg.layers)}


# ---- timing ------------------------------------------------------------------------------------
def _median_ms(fn, repeat, min_s=0.2):
    for _ in range(2):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 50 * repeat:
            break
    return statistics.median(times)


def _torch_ms(graph, x, repeat):
    with torch.no_grad():
        return _median_ms(lambda: graph(x), repeat)


def ort_ms(graph, x, repeat, work, tag):
    from fliqs_compiler.backends.onnx_export import export_qdq
    from fliqs_compiler.backends.ort_backend import time_onnx
    path = export_qdq(graph, Path(work) / f"{tag}.onnx")
    return time_onnx(path, [x.numpy()], threads=THREADS, repeat=repeat)


def _say(line):
    print("  " + line, flush=True)


def _tvm(graph, x, repeat, **kw):
    from fliqs_compiler.backends.tvm_lower import lower
    t0 = time.perf_counter()
    low = lower(graph, "llvm", None, **kw)
    build_s = time.perf_counter() - t0
    ms = low.time_ms([x.numpy()], repeat=max(3, repeat // 10), min_repeat_ms=100)
    return ms, build_s, kernel_counts(low)


def kernel_counts(low) -> dict:
    """Layers per realized kernel of a ``Lowered``."""
    kernels = {}
    for e in low.executed.values():
        kernels[e["kernel"]] = kernels.get(e["kernel"], 0) + 1
    return kernels


LAYERS = [  # representative ResNet-18 @224 layers: (name, op, weight shape, input shape, attrs)
    ("layer1.0.conv1", "conv2d", (64, 64, 3, 3), (1, 64, 56, 56), {"stride": 1, "padding": 1}),
    ("layer2.0.conv1", "conv2d", (128, 64, 3, 3), (1, 64, 56, 56), {"stride": 2, "padding": 1}),
    ("layer4.1.conv2", "conv2d", (512, 512, 3, 3), (1, 512, 7, 7), {"stride": 1, "padding": 1}),
    ("fc", "linear", (1000, 512), (1, 512), {}),
]


def layer_rows(repeat: int, tune_trials: int = 0, tune_dir=None):
    """Per-layer medians: TVM int8 (u8 activations) with / without VNNI, TVM fp32 (naive and,
    with ``tune_trials``, MetaSchedule-tuned: the fair fp32 baseline), onnxruntime fp32 and int8
    QDQ micro-graphs, torch fp32."""
    from fliqs_compiler.backends.latency_table import ort_layer_ms
    from fliqs_compiler.backends.tvm_lower import Tuning, lower
    from fliqs_compiler.backends.tvm_measure import layer_graph, layer_module
    from fliqs_compiler.ir.graph import LayerInfo
    rows = []
    variants = [("tvm_int8_vnni", "int8", "uint8", True, False),
                ("tvm_int8_plain", "int8", "uint8", False, False),
                ("tvm_fp32", "float", "float", False, False)]
    if tune_trials > 0:
        variants.append(("tvm_fp32_tuned", "float", "float", False, True))
    for name, op, ws, xs, attrs in LAYERS:
        layer = LayerInfo(name, op, "n", weight_shape=ws, input_shape=xs, attrs=attrs)
        x = torch.randn(xs).abs()
        with torch.no_grad():
            layer.output_shape = tuple(layer_module(layer, "float", "float")(x).shape)
        r = {"layer": name}
        for key, fw, fa, vnni, tune in variants:
            tuning = Tuning(trials=tune_trials, per_task=tune_trials, per_round=2,
                            work_dir=tune_dir, log=_say) if tune else None
            low = lower(layer_graph(layer, fw, fa), "llvm", vnni=vnni, tuning=tuning)
            r[key] = low.time_ms([x.numpy()], repeat=max(3, repeat // 10), min_repeat_ms=50)
            r[key + "_kernel"] = next(iter(low.executed.values()))["kernel"]
        r["ort_fp32"] = ort_layer_ms(layer, "float", "float", threads=THREADS, repeat=repeat)
        r["ort_int8_qdq"] = ort_layer_ms(layer, "int8", "uint8", threads=THREADS, repeat=repeat)
        m = layer_module(layer, "float", "float")
        r["torch_fp32"] = _torch_ms(m, x, repeat)
        if tune_trials > 0:
            r["vnni_speedup_vs_tuned_fp32"] = r["tvm_fp32_tuned"] / r["tvm_int8_vnni"]
        rows.append(r)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items()), flush=True)
    return rows


# ---- transformers (--model vit) ---------------------------------------------------------------
def _encoder():
    """12 pre-norm blocks, 384 wide, 6 heads, MLP 1536, on [1, 128, 384] tokens."""
    from examples.toy_models import _Block
    return nn.Sequential(*[_Block(384, 6, 1536) for _ in range(12)], nn.LayerNorm(384))


def _fashion(n: int):
    from fliqs_compiler.data.sources import load_data
    from fliqs_compiler.ir.graph import InputSpec
    return load_data("fashion-mnist", InputSpec("x", (1, 1, 28, 28))).x_train[:n]


def transformers():
    from examples.toy_models import ViT
    torch.manual_seed(0)
    yield "vit", ViT().eval(), _fashion(64)
    torch.manual_seed(0)
    yield "encoder-12x384", _encoder().eval(), torch.randn(16, 128, 384)


def transformer_graphs(model, calib):
    """{config: materialized Graph}: fp32, int8 and mixed, every Linear / MatMul searched, scales
    calibrated on ``calib`` (the first row is the timed input)."""
    import fliqs_compiler as fq
    from fliqs_compiler import passes
    g = fq.load(model, (calib[:1],))
    sg = passes.prepare(g, passes.PrepareOptions(formats=list(MIX), keep_float_first=False,
                                                 keep_float_last=False, scale_mode="calibrated"))
    configs = {"int8": int8_formats(sg), "mixed": mixed_formats(sg)}
    graphs = {"fp32": passes.materialize(sg, {})}
    for cfg, formats in configs.items():
        choice = sg.space.choice_of(formats)
        sg.space.apply(sg.gm, choice)
        with torch.no_grad():
            sg(calib)
        graphs[cfg] = passes.materialize(sg, formats)
    return graphs


def ab_graphs(name: str):
    """(``{config: Graph}``, the fp32 Graph, the timed input) of one model for the A/B benches:
    ``resnet18`` / ``mobilenet`` @224 (configs int8, int8-float-ends, mixed) or ``encoder``
    (the 12-block, 384-wide encoder on [1, 128, 384]: int8, mixed)."""
    from fliqs_compiler import passes
    if name == "encoder":
        _, model, calib = next(t for t in transformers() if t[0].startswith("encoder"))
        graphs = transformer_graphs(model, calib)
        return {c: graphs[c] for c in ("int8", "mixed")}, graphs["fp32"], calib[:1]
    _, model, shape = next(models([name]))
    sg, x = calibrated(model, shape)
    configs = {"int8": int8_formats(sg), "int8-float-ends": int8_formats(sg, float_ends=True),
               "mixed": mixed_formats(sg)}
    return ({c: passes.materialize(sg, f) for c, f in configs.items()}, passes.materialize(sg, {}),
            x)


def ort_anchors(model, calib, work, tag, repeat):
    """onnxruntime fp32 on the float ONNX and int8 from ``quantize_static`` (per channel)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from fliqs_compiler.backends.ort_backend import time_onnx
    x = calib[:1]
    fp32 = Path(work) / f"{tag}-fp32.onnx"
    torch.onnx.export(model, (x,), str(fp32), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{"x": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.rows, None)
    int8 = Path(work) / f"{tag}-ort-int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return {"ort fp32": time_onnx(fp32, [x.numpy()], threads=THREADS, repeat=repeat),
            "ort int8 (quantize_static)": time_onnx(int8, [x.numpy()], threads=THREADS,
                                                    repeat=repeat)}


def op_breakdown(low, x, top: int = 8) -> list:
    """TVM per-call times (ms, one run after a warm-up) summed by kernel symbol, largest first,
    via ``VirtualMachine.set_instrument``."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(low.executable, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy(), tvm.cpu())]
    vm["main"](*args)
    totals, start = {}, {}

    def instrument(func, symbol, before, ret, *rest):
        if before:
            start[symbol] = time.perf_counter()
        else:
            totals[symbol] = totals.get(symbol, 0.0) + (time.perf_counter() - start[symbol]) * 1e3
        return 0
    vm.set_instrument(instrument)
    vm["main"](*args)
    total = sum(totals.values())
    return [{"kernel": k, "ms": round(v, 3), "share": round(v / total, 3)}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]


def transformer_rows(configs, repeat: int, profile: bool) -> list:
    """Median ms of every (model, config, engine) and its ratio to onnxruntime fp32."""
    from fliqs_compiler.backends.tvm_lower import lower
    rows, work = [], tempfile.mkdtemp(prefix="fliqs-bench-vit-")
    for name, model, calib in transformers():
        x = calib[:1]
        anchors = ort_anchors(model, calib, work, name, repeat)
        base = anchors["ort fp32"]

        def add(cfg, engine, ms, **extra):
            rows.append({"model": name, "config": cfg, "engine": engine, "ms": ms,
                         "ratio_to_ort_fp32": ms / base, **extra})
            print(f"  {name:15s} {cfg:6s} {engine:27s} {ms:10.3f} ms  x{ms / base:7.2f}  "
                  + (json.dumps(extra) if extra else ""), flush=True)
        for engine, ms in anchors.items():
            add("fp32" if "fp32" in engine else "int8", engine, ms)
        graphs = transformer_graphs(model, calib)
        for cfg in configs:
            g = graphs[cfg]
            if cfg != "fp32":
                add(cfg, "ort (fliqs QDQ)", ort_ms(g, x, repeat, work, f"{name}-{cfg}"))
            t0 = time.perf_counter()
            low = lower(g, "llvm")
            build_s = time.perf_counter() - t0
            ms = low.time_ms([x.numpy()], repeat=3, min_repeat_ms=100)
            kernels = {}
            for e in low.executed.values():
                kernels[e["kernel"]] = kernels.get(e["kernel"], 0) + 1
            extra = {"build_s": round(build_s, 1), "kernels": kernels}
            if profile:
                extra["top_ops"] = op_breakdown(low, x)
            add(cfg, "tvm (untuned)", ms, **extra)
    return rows


def vit_main(args) -> list:
    torch.set_num_threads(THREADS)
    import onnxruntime
    import tvm
    load = os.getloadavg()
    rows = transformer_rows([c for c in args.configs.split(",") if c], 20, args.profile)
    env = {"threads": THREADS, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "tvm": tvm.__version__, "cpu": platform.processor() or platform.machine(),
           "loadavg_start": [round(v, 2) for v in load],
           "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    print(f"\nthreads: {THREADS} (torch, onnxruntime intra-op, TVM_NUM_THREADS); load average "
          f"{env['loadavg_start']} → {env['loadavg_end']}")
    print(f"{'model':15s} {'config':6s} {'engine':27s} {'median ms':>10s} {'/ort fp32':>9s}")
    for r in rows:
        print(f"{r['model']:15s} {r['config']:6s} {r['engine']:27s} {r['ms']:10.3f} "
              f"{r['ratio_to_ort_fp32']:9.2f}")
    out = Path(args.out or Path(__file__).parent / "results" / "latency_vit.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"environment": env, "mixed_formats": list(MIX), "rows": rows},
                              indent=1))
    os.replace(tmp, out)
    return rows


# ---- rule-based schedules (tvm_schedules) vs TVM's default build ------------------------------
SCHEDULED_CONFIGS = ("fp32", "int8", "mixed")
TVM_VARIANTS = (("tvm-default", {"fuse": False, "schedule": False}),  # naive loops + hand VNNI kernels
                ("tvm-scheduled", {}))  # lower()'s default: fused + tvm_schedules rules


def _no_bf16_variant():
    """``--no-bf16-baseline``: the scheduled build for the host target with avx512bf16 removed by
    the capability override (``mattr``), i.e. without the ``tvm_bf16`` kernel: its A/B baseline."""
    from fliqs_compiler.backends.targets import parse_target
    host = dict(parse_target("llvm").tvm_target)
    return ("tvm-scheduled-no-bf16", {"target": json.dumps({**host, "mattr": ["-avx512bf16"]})})


def ort_int8_static(fp32_onnx: Path, x, out: Path) -> Path:
    """onnxruntime's own ``quantize_static`` of the fp32 ONNX: QDQ, per-channel int8 weights,
    uint8 activations, calibrated on the benchmark input and 7 noisy copies of it."""
    import logging

    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    import onnx
    name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    rng = np.random.default_rng(0)
    base = x.numpy()
    feeds = [base] + [base + 0.1 * rng.standard_normal(base.shape).astype(np.float32)
                      for _ in range(7)]

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: f} for f in feeds])

        def get_next(self):
            return next(self.items, None)

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs every node at INFO
    try:
        quantize_static(str(fp32_onnx), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
    finally:
        logging.getLogger().setLevel(level)
    return out


def openvino_timer(path: Path, feed, repeat):
    """OpenVINO (PyPI ``openvino``, the ``bench`` extra) on an ONNX file, CPU plugin, ``THREADS``
    inference threads, latency hint; f32 inference precision pinned (on CPUs with AVX512-BF16 its
    default may run an fp32 model in bf16). On the int8 QDQ model its low-precision transforms
    run the convolutions in int8. None when openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda: _median_ms(lambda: request.infer(feed), repeat)


def scheduled_rows(names, configs, repeat, rounds=3, variants=TVM_VARIANTS):
    """Per model: anchors (torch fp32, onnxruntime fp32, onnxruntime int8 ``quantize_static``,
    onnxruntime on our own QDQ export of each config) and, per config, TVM's default build
    (naive loops outside the hand VNNI kernels) vs the rule-scheduled build, with lowering time
    and the functions each schedule rule took. Everything is built first, then timed in
    ``rounds`` interleaved rounds (every engine once per round; each number is the median over
    rounds), so load changes on a shared machine hit every engine alike; ratios are per run.
    ``variants``: the TVM builds, (name, ``lower`` keywords; ``target`` defaults to 'llvm')."""
    from fliqs_compiler import passes
    from fliqs_compiler.backends.onnx_export import export_qdq
    from fliqs_compiler.backends.ort_backend import make_session, time_onnx
    from fliqs_compiler.backends.tvm_lower import lower
    work = Path(tempfile.mkdtemp(prefix="fliqs-bench-sched-"))
    out = []
    for name, model, shape in models(names):
        sg, x = calibrated(model, shape)
        graphs = {"fp32": passes.materialize(sg, {}), "int8": passes.materialize(sg, int8_formats(sg)),
                  "int8-float-ends": passes.materialize(sg, int8_formats(sg, float_ends=True)),
                  "mixed": passes.materialize(sg, mixed_formats(sg))}
        fp32_onnx = export_qdq(graphs["fp32"], work / f"{name}-fp32.onnx")
        ort_int8 = ort_int8_static(fp32_onnx, x, work / f"{name}-ort-int8.onnx")
        feed = [x.numpy()]

        def ort_timer(path):
            sess = make_session(path, THREADS)
            return lambda: time_onnx(sess, feed, threads=THREADS, repeat=repeat)

        timers = {"torch_fp32": lambda: _torch_ms(graphs["fp32"], x, repeat),
                  "ort_fp32": ort_timer(fp32_onnx), "ort_int8_static": ort_timer(ort_int8)}
        openvino = {"openvino_fp32": openvino_timer(fp32_onnx, feed, repeat),
                    "openvino_int8": openvino_timer(ort_int8, feed, repeat)}  # the same QDQ model
        timers.update({k: t for k, t in openvino.items() if t is not None})
        row = {"model": name, "configs": {}}
        for cfg in configs:
            c = row["configs"][cfg] = {}
            timers[f"{cfg}/ort_qdq"] = ort_timer(export_qdq(graphs[cfg], work / f"{name}-{cfg}.onnx"))
            for variant, kw in variants:
                kw = dict(kw)
                t0 = time.perf_counter()
                low = lower(graphs[cfg], kw.pop("target", "llvm"), None, **kw)
                c[variant] = {"lower_s": round(time.perf_counter() - t0, 1),
                              "compile_s": round(low.timing_s["compile"], 1),
                              "schedules": low.schedules,
                              "kernels": kernel_counts(low)}
                timers[f"{cfg}/{variant}"] = (lambda low=low: low.time_ms(
                    feed, repeat=max(3, repeat // 10), min_repeat_ms=100))
                _say(f"{name} {cfg:5s} {variant:13s} lowering {c[variant]['lower_s']:6.1f} s  "
                     f"{json.dumps(low.schedules)}")
        samples = {k: [] for k in timers}
        loads = [os.getloadavg()[0]]
        for r in range(rounds):
            for k, fn in timers.items():
                samples[k].append(fn())
            loads.append(os.getloadavg()[0])
            _say(f"{name} round {r + 1}/{rounds}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in samples.items()) + f" (load {loads[-1]:.2f})")
        ms = {k: statistics.median(v) for k, v in samples.items()}
        row.update(torch_fp32=ms["torch_fp32"], ort_fp32=ms["ort_fp32"],
                   ort_int8_static=ms["ort_int8_static"], load_average=loads, samples=samples,
                   best={k: min(v) for k, v in samples.items()},
                   **{k: ms.get(k) for k in openvino})
        for cfg, c in row["configs"].items():
            for variant, _ in variants:
                c[variant]["ms"] = ms[f"{cfg}/{variant}"]
            if "tvm-scheduled-no-bf16" in c:  # the tvm_bf16 kernel's A/B, same run
                c["bf16_kernel_speedup"] = c["tvm-scheduled-no-bf16"]["ms"] / c["tvm-scheduled"]["ms"]
            c["ort_qdq"] = ms[f"{cfg}/ort_qdq"]
            sched = c["tvm-scheduled"]["ms"]
            c["speedup_vs_default"] = c["tvm-default"]["ms"] / sched
            c["scheduled_vs_ort_int8_static"] = sched / row["ort_int8_static"]
            c["scheduled_vs_ort_fp32"] = sched / row["ort_fp32"]
            c["scheduled_vs_ort_qdq"] = sched / c["ort_qdq"]
            if row["openvino_int8"] is not None:
                c["scheduled_vs_openvino_int8"] = sched / row["openvino_int8"]
                c["scheduled_vs_openvino_fp32"] = sched / row["openvino_fp32"]
        out.append(row)
    print(f"\nthreads: {THREADS} (torch, onnxruntime intra-op, TVM_NUM_THREADS); median ms over "
          f"{rounds} interleaved rounds")
    print(f"{'model':9s} {'config':6s} {'TVM default':>11s} {'scheduled':>10s} {'speedup':>8s} "
          f"{'ORT QDQ':>8s} {'ORT int8':>8s} {'ORT fp32':>8s} {'/ORT int8':>9s} {'lower s':>8s} "
          f"{'best: sched / ORT int8':>22s}")
    for r in out:
        for cfg, c in r["configs"].items():
            best = r["best"]
            print(f"{r['model']:9s} {cfg:6s} {c['tvm-default']['ms']:11.2f} "
                  f"{c['tvm-scheduled']['ms']:10.2f} {c['speedup_vs_default']:7.1f}x "
                  f"{c['ort_qdq']:8.2f} {r['ort_int8_static']:8.2f} {r['ort_fp32']:8.2f} "
                  f"{c['scheduled_vs_ort_int8_static']:8.2f}x {c['tvm-scheduled']['lower_s']:8.1f} "
                  f"{best[cfg + '/tvm-scheduled']:10.2f} / {best['ort_int8_static']:.2f}")
        for cfg, c in r["configs"].items():
            if "bf16_kernel_speedup" in c:
                nb = c["tvm-scheduled-no-bf16"]
                print(f"{r['model']:9s} {cfg:6s} bf16 kernel A/B: scheduled {c['tvm-scheduled']['ms']:.2f} "
                      f"ms {json.dumps(c['tvm-scheduled']['kernels'])} vs without avx512bf16 "
                      f"{nb['ms']:.2f} ms {json.dumps(nb['kernels'])}: {c['bf16_kernel_speedup']:.2f}x "
                      f"(best {best[cfg + '/tvm-scheduled']:.2f} vs {best[cfg + '/tvm-scheduled-no-bf16']:.2f})")
        print(f"{r['model']:9s} torch fp32 {r['torch_fp32']:.2f} ms; load average over the rounds "
              + " ".join(f"{v:.2f}" for v in r["load_average"]))
        if r["openvino_int8"] is None:
            print(f"{r['model']:9s} OpenVINO: not installed (pip install '.[bench]')")
        else:
            print(f"{r['model']:9s} OpenVINO fp32 {r['openvino_fp32']:.2f} ms, int8 (same QDQ model) "
                  f"{r['openvino_int8']:.2f} ms; TVM scheduled / OpenVINO int8: " + ", ".join(
                      f"{cfg} {c['scheduled_vs_openvino_int8']:.2f}x" for cfg, c in r["configs"].items()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small CNN only, fewer repeats")
    ap.add_argument("--models", default=None, help="comma list of resnet18,cnn")
    ap.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials (0: no tuning)")
    ap.add_argument("--tune-per-task", type=int, default=8, help="MetaSchedule trials cap per task")
    ap.add_argument("--tune-round", type=int, default=2,
                    help="candidates per scheduler round (every task gets one round first)")
    ap.add_argument("--tune-configs", default="fp32,mixed", help="configs to tune (comma list)")
    ap.add_argument("--configs", default="fp32,mixed", help="configs to run (comma list): fp32, int8, "
                    "int8-float-ends (int8 but the first and last layer float, compile's default), mixed")
    ap.add_argument("--tune-dir", default=str(Path(tempfile.gettempdir()) / "fliqs-tvm-tune-bench"))
    ap.add_argument("--layers", action="store_true", help="also time single ResNet-18 layers")
    ap.add_argument("--layer-tune-trials", type=int, default=0,
                    help="MetaSchedule trials for the fp32 single layers (0: naive only)")
    ap.add_argument("--scheduled", action="store_true",
                    help="TVM default build vs rule-scheduled build, with onnxruntime fp32 / int8 "
                         "anchors (configs fp32,int8,mixed unless --configs)")
    ap.add_argument("--rounds", type=int, default=3, help="--scheduled: interleaved timing rounds")
    ap.add_argument("--no-bf16-baseline", action="store_true",
                    help="--scheduled: also the scheduled build without avx512bf16 (capability "
                         "override), variant tvm-scheduled-no-bf16: the bf16 kernel's A/B")
    ap.add_argument("--out", default=None, help="write the results as JSON here (atomic)")
    ap.add_argument("--model", choices=["vit"], default=None,
                    help="vit: the transformer benchmark (small ViT + 12x384 encoder; configs "
                         "fp32,int8,mixed; results bench/results/latency_vit.json)")
    ap.add_argument("--profile", action="store_true",
                    help="--model vit: per-kernel breakdown of the TVM runs")
    args = ap.parse_args(argv)
    if args.model == "vit":
        if args.configs == "fp32,mixed":
            args.configs = "fp32,int8,mixed"
        return vit_main(args)
    torch.set_num_threads(THREADS)
    if args.scheduled:
        return _scheduled_main(args)
    names = [n for n in (args.models if args.models is not None
                         else ("cnn" if args.quick else "resnet18,cnn")).split(",") if n]
    repeat = 10 if args.quick else 30
    rows = []
    work = tempfile.mkdtemp(prefix="fliqs-bench-")
    for name, model, shape in models(names):
        fp32, mixed, formats, x = _graphs(model, shape)
        base = _torch_ms(fp32, x, repeat)
        for cfg, g in (("fp32", fp32), ("mixed", mixed)):
            if cfg not in args.configs.split(","):
                continue
            def add(engine, ms, **extra):
                rows.append({"model": name, "config": cfg, "engine": engine, "ms": ms,
                             "ratio_to_torch_fp32": ms / base if ms else None, **extra})
                print(f"  {name:9s} {cfg:6s} {engine:11s} {ms:10.3f} ms  x{ms / base:7.2f}  "
                      + (json.dumps(extra) if extra else ""), flush=True)
            add("torch", base if cfg == "fp32" else _torch_ms(g, x, repeat))
            try:
                add("ort", ort_ms(g, x, repeat, work, f"{name}-{cfg}"))
            except Exception as e:  # noqa: BLE001 — report, keep the other engines
                print(f"  {name} {cfg} ort: failed: {type(e).__name__}: {str(e)[:120]}")
            ms, build_s, kernels = _tvm(g, x, repeat, vnni=True)
            add("tvm", ms, build_s=round(build_s, 1), kernels=kernels)
            if cfg == "mixed":
                ms, build_s, kernels = _tvm(g, x, repeat, vnni=False)
                add("tvm-novnni", ms, build_s=round(build_s, 1), kernels=kernels)
            if args.tune_trials > 0 and cfg in args.tune_configs.split(","):
                said = []
                from fliqs_compiler.backends.tvm_lower import Tuning
                tuning = Tuning(trials=args.tune_trials, per_task=args.tune_per_task,
                                per_round=args.tune_round, work_dir=Path(args.tune_dir),
                                log=lambda line: (said.append(line), _say(line)))
                ms, build_s, kernels = _tvm(g, x, repeat, vnni=True, tuning=tuning)
                add("tvm-tuned", ms, tune_s=round(build_s, 1), trials=args.tune_trials,
                    per_task=args.tune_per_task, per_round=args.tune_round, metaschedule=said[-1] if said else "",
                    kernels=kernels)
    lrows = (layer_rows(repeat, args.layer_tune_trials, Path(args.tune_dir))
             if args.layers else [])
    env = environment()
    print(f"\nthreads: {THREADS} (torch, onnxruntime intra-op, TVM_NUM_THREADS)")
    print(f"{'model':9s} {'config':6s} {'engine':11s} {'median ms':>10s} {'/torch fp32':>11s}")
    for r in rows:
        print(f"{r['model']:9s} {r['config']:6s} {r['engine']:11s} {r['ms']:10.3f} "
              f"{r['ratio_to_torch_fp32']:11.2f}")
    if args.out:
        write_json(args.out, {"environment": env, "mixed_formats": list(MIX), "rows": rows,
                               "layers": lrows})
    return rows, lrows


def _scheduled_main(args):
    names = [n for n in (args.models or ("cnn" if args.quick else "resnet18,cnn")).split(",") if n]
    configs = [c for c in (args.configs if args.configs != "fp32,mixed" else
                           ",".join(SCHEDULED_CONFIGS)).split(",") if c]
    variants = TVM_VARIANTS + ((_no_bf16_variant(),) if args.no_bf16_baseline else ())
    rows = scheduled_rows(names, configs, 10 if args.quick else 30, args.rounds, variants)
    if args.out:
        write_json(args.out, {"environment": environment(), "mixed_formats": list(MIX),
                               "rows": rows})
    return rows


def environment() -> dict:
    env = {"threads": THREADS, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    with contextlib.suppress(ImportError):  # the environment line names what is installed
        import onnxruntime
        import tvm
        env.update(onnxruntime=onnxruntime.__version__, tvm=tvm.__version__)
    return env


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON at ``path`` atomically (a temporary file, then a rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()

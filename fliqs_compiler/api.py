"""The public pipeline: ``fq.compile`` (what ``fliqs compile`` runs) and the single-stage helpers
the other commands call (``search_only``, ``lower_config``, ``profile``).

The whole compilation pipeline, in order (``_compile`` then ``_compile_point`` per budget)::

    import → data (+ float quality) → passes → latency table (latency budgets) → [baselines]
           → search → materialize → QDQ export + onnxruntime check → TVM lowering + check
           → measure → config.json + report

Output folder (architecture.md): ``config.json``, ``model.qdq.onnx``, ``tvm/model.so``,
``report.json``, ``report.md``, ``formats.png``, ``pareto.png`` (sweep), ``search.jsonl``,
``checkpoint/``. Final artifacts are built in a hidden staging folder and moved in only when the
whole run succeeded; a failed run leaves at most the search's checkpoint (for ``--resume``).
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before anything imports tvm

import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from .errors import FliqsError  # noqa: E402
from .backend_stage import backend_stage, latency_model, numeric_inputs  # noqa: E402
from .backends.targets import default_threads as threads  # noqa: E402
from .options import (DEFAULT_BUDGET, DEFAULT_FORMATS, DEFAULT_HOLDOUT, DEFAULT_STEPS,  # noqa: E402
                      check_data_arg, check_model_arg, check_steps, parse_baselines, parse_formats,
                      parse_sweep)
from . import outdir  # noqa: E402
from .outdir import resolve_out_dir  # noqa: E402
from .report import build_report, print_summary, write_report  # noqa: E402

__all__ = ["Result", "compile", "search_only", "lower_config", "profile", "parse_formats",
           "parse_sweep", "parse_baselines", "check_steps", "resolve_out_dir", "DEFAULT_FORMATS", "DEFAULT_BUDGET",
           "DEFAULT_STEPS", "DEMO_MODEL"]

DEMO_MODEL = Path(__file__).parent / "assets" / "demo.onnx"


# ---- result --------------------------------------------------------------------------------------
@dataclass
class Result:
    """What ``compile`` / ``lower_config`` produced: the output folder, the report dict (report.json)
    and the paths of the files written."""

    out_dir: Path
    report: dict
    files: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)  # [Result] per sweep point (sweep runs only)

    @property
    def config_path(self) -> Path:
        return self.out_dir / "config.json"

    @property
    def onnx_path(self) -> Path:
        return self.out_dir / "model.qdq.onnx"

    @property
    def so_path(self) -> Optional[Path]:
        p = self.out_dir / "tvm" / "model.so"
        return p if p.exists() else None

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.json"

    @property
    def formats(self) -> dict:
        return {layer["node"]: {"weight": layer["format_w"], "activation": layer["format_a"]}
                for layer in self.report["layers"]}

    @property
    def quality(self) -> float:
        return self.report["quality"]["final"]

    @property
    def bops(self) -> int:
        return self.report["totals"]["bops"]

    @property
    def latency_ms(self) -> Optional[float]:
        return self.report["totals"]["latency_ms"]

    def __repr__(self):
        q = self.report["quality"]
        return (f"Result(out_dir={str(self.out_dir)!r}, {q['metric']} {q['float']:.4f}→{q['final']:.4f}, "
                f"bops={self.bops}, latency_ms={self.latency_ms})")


# ---- progress ------------------------------------------------------------------------------------
class _Stages:
    """One line per pipeline stage on stderr (``[i/n] name``, then its seconds and the running
    total) and ``timing`` for the report. The long stages (search, latency table) draw their own
    bar with an ETA."""

    def __init__(self, names: Sequence[str], progress: bool):
        self.names = list(names)
        self.progress = progress
        self.timing: dict = {}
        self.t0 = time.perf_counter()
        self.console = None
        if progress:
            from rich.console import Console
            self.console = Console(stderr=True, highlight=False)

    @contextmanager
    def __call__(self, name: str, note: str = ""):
        i = self.names.index(name) + 1 if name in self.names else len(self.timing) + 1
        if self.console:
            self.console.print(f"[bold cyan][{i}/{len(self.names)}][/] {name}{' — ' + note if note else ''} …")
        start = time.perf_counter()
        yield
        dt = time.perf_counter() - start
        self.timing[name] = self.timing.get(name, 0.0) + dt
        if self.console:
            self.console.print(f"      [green]done[/] in {dt:.1f} s (total {time.perf_counter() - self.t0:.1f} s)")


# ---- pipeline pieces -------------------------------------------------------------------------------
def _load_graph(model, input_shapes, example_inputs=None):
    from .graph import load
    check_model_arg(model)
    return load(model, example_inputs=example_inputs, input_shapes=input_shapes)


def _prepare(graph, formats: list, prepare_options: Optional[dict]):
    from .passes import PrepareOptions, prepare
    return prepare(graph, PrepareOptions(formats=list(formats), **(prepare_options or {})))


def _load_dataset(data, graph, seed: int, holdout: float):
    """The search data: ``data`` spec (digits, fashion-mnist, .npz, image folder) or, with no data,
    seeded random inputs (no labels: the float model is the teacher)."""
    from .data import Dataset, load_data
    if len(graph.inputs) != 1:
        raise FliqsError(f"model {graph.name} has {len(graph.inputs)} inputs; the search data feeds "
                         "single-input models only")
    spec = graph.inputs[0]
    _check_runs_on_batches(graph)
    if data is not None:
        return load_data(str(data), spec, holdout=holdout, seed=seed, num_classes=_num_classes(graph))
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((512, *spec.shape[1:]), generator=g)
    n_val = int(round(holdout * len(x)))
    return Dataset(x_train=x[n_val:], y_train=None, x_val=x[:n_val], y_val=None, num_classes=None,
                   description="no --data: 512 seeded Gaussian random inputs (the float model is "
                               "the teacher; quality = agreement with it)")


def _data_and_teacher(data, graph, seed: int, holdout: float) -> tuple:
    """(dataset, float teacher, metric, float quality): the data stage of compile and lower."""
    import copy
    dataset = _load_dataset(data, graph, seed, holdout)
    teacher = copy.deepcopy(graph.gm).eval()
    metric, q_float = _evaluate(teacher, dataset, teacher)
    return dataset, teacher, metric, q_float


def _check_runs_on_batches(graph) -> None:
    """Search and evaluation feed batches of data: a graph whose folded shapes keep the pinned
    batch size cannot take them. Found here with a one-line error instead of deep in a stage."""
    import torch
    spec = graph.inputs[0]
    x = torch.zeros((3, *spec.shape[1:]), dtype=getattr(torch, spec.dtype, torch.float32))
    try:
        with torch.no_grad():
            graph.gm(x)
    except Exception as e:  # noqa: BLE001 — any failure here is this one problem
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise FliqsError(f"model {graph.name}: does not run on a batch of 3 inputs shaped "
                         f"{tuple(spec.shape[1:])} ({first}); a shape in the model fixes the batch "
                         f"size at {spec.shape[0]}: export it with a dynamic batch dimension") from None


def _num_classes(graph) -> Optional[int]:
    """The class count of a classifier (first output shaped [batch, C]), else None: labels must
    lie in [0, C)."""
    import torch
    try:
        with torch.no_grad():
            out = graph.gm(*graph.example_inputs())
    except Exception:  # noqa: BLE001 — not runnable here: let the search report it
        return None
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[1]) if torch.is_tensor(out) and out.dim() == 2 and out.shape[1] > 1 else None


# ---- quality and the report ------------------------------------------------------------------------
def _evaluate(gm, dataset, teacher=None, batch: int = 256) -> tuple:
    """(metric, value) of ``gm`` on the held-out split (``x_test``: the official test split where
    the data has one, else the validation split): accuracy with labels, else top-1 agreement with
    ``teacher`` (a float GraphModule; None → the model agrees with itself: 1.0)."""
    import torch
    x, y = dataset.x_test, dataset.y_test
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = gm(x[i:i + batch])
            out = out[0] if isinstance(out, (tuple, list)) else out
            pred = out.reshape(out.shape[0], -1).argmax(1)
            if y is not None:
                ref = y[i:i + batch]
            elif teacher is not None:
                t = teacher(x[i:i + batch])
                t = t[0] if isinstance(t, (tuple, list)) else t
                ref = t.reshape(t.shape[0], -1).argmax(1)
            else:
                ref = pred
            hits += int((pred == ref).sum())
    return ("accuracy" if y is not None else "agreement"), hits / max(1, len(x))


def _label(budget) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in budget.text)


# ---- the search (h3's fliqs_compiler.search) ------------------------------------------------------
def _search(graph, dataset, budget, *, steps: int, seed: int, out_dir: Path, resume: bool, latency,
            progress: bool, search_options: Optional[dict]):
    from .search import SearchOptions, run_search
    options = SearchOptions(steps=steps, seed=seed, **(search_options or {}))
    return run_search(graph, dataset, budget, options, out_dir=out_dir, resume=resume,
                      latency_model=latency, progress=progress)


def _run_baselines(names: list, graph, dataset, budget, *, steps: int, seed: int, latency,
                   search_options: Optional[dict], cache: dict) -> list:
    """Each baseline (``search.baselines``) on the same graph, data, steps and budget → report rows
    ``{name, bops, quality, latency_ms, ...}``. ``uniform`` does not depend on the budget and is
    run once per ``cache`` (shared across sweep points)."""
    from .cost import config_cost
    from .search import SearchOptions
    from .search.baselines import BASELINES
    opts = SearchOptions(steps=steps, seed=seed, **(search_options or {}))
    rows = []
    for name in names:
        key = (name, None if name == "uniform" else budget.text)
        if key not in cache:
            res = BASELINES[name](graph, dataset, budget, opts, latency=latency)
            cache[key] = res if isinstance(res, list) else [res]
        for r in cache[key]:
            rows.append({
                "name": r.name, "method": r.method,
                "bops": int(config_cost(graph, r.formats, "bops")), "quality": float(r.quality),
                "latency_ms": float(config_cost(graph, r.formats, "latency", latency)) if latency else None,
                "size_bytes": int(config_cost(graph, r.formats, "size")), "formats": r.formats,
                "steps": int(r.steps), "seconds": round(float(r.seconds), 2), "notes": r.notes})
    return rows


def _save_config(path: Path, model_name: str, formats: dict, extra: dict) -> Path:
    from .config import save_config
    save_config(path, model_name, formats, extra=extra)
    return path


# ---- fq.compile ---------------------------------------------------------------------------------
_COMPILE_STAGES = ["import", "data", "passes", "latency table", "search", "materialize", "export",
                   "lower", "measure", "report"]


def compile(model, *, target, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS,
            out=None, seed: int = 0, resume: bool = False, sweep: Optional[str] = None,
            input_shapes: Optional[dict] = None, progress: bool = True,
            holdout: float = DEFAULT_HOLDOUT, example_inputs=None, layer_latency: bool = True,
            prepare_options: Optional[dict] = None, search_options: Optional[dict] = None,
            baselines=None, tune_trials: int = 0) -> Result:
    """Compile ``model`` (an .onnx path or an ``nn.Module`` with ``example_inputs``) for ``target``.

    import → passes → data → latency table (latency budgets) → FLIQS search → materialize →
    QDQ ONNX + onnxruntime check → TVM lowering + check → latency → report.

    Args: ``target`` ('llvm', a JSON target dict, 'ort'); ``data`` (digits, fashion-mnist, .npz,
    image folder; None → seeded random inputs, float model as teacher); ``formats`` (names or
    "int4,int8"); ``budget`` ("bops=0.5x", "size=2MB", "latency=3ms"); ``sweep``
    ("bops=0.2x,0.3x,0.5x": one search per budget, sharing import/passes/data/latency table; the
    first value's result lands in ``out``, the others in ``out/sweep/<budget>/``, plus pareto.png);
    ``holdout``: fraction of the data kept out of training to measure quality; ``baselines``:
    names from ``search.baselines.BASELINES`` ("uniform,random,ilp,dnas") run on the same graph,
    data, steps and budget, reported next to FLIQS; ``tune_trials`` > 0: per-layer latency
    tables (latency budgets, the report) from MetaSchedule-tuned TVM kernels.

    Requires nothing of ``out`` but that it can be created/written. Guarantees: on success ``out``
    holds every file of architecture.md's output folder and report.json meets the contract; on
    failure nothing new in ``out`` except the search checkpoint (rerun with ``resume=True``).
    Bad input raises FliqsError (one line) before any long work where it can be checked up front.
    """
    import torch
    from .backends.targets import parse_target
    from .budget import parse_budget

    torch.set_num_threads(threads())
    fmts = parse_formats(formats)
    steps = check_steps(steps)
    tgt = _with_tuning(parse_target(target).require_local(), tune_trials)
    sweep_budgets = parse_sweep(sweep)
    if sweep_budgets and budget is not None:
        raise FliqsError("--budget and --sweep given together; a sweep runs one search per budget, "
                         "so give only --sweep (e.g. --sweep bops=0.2x,0.5x)")
    budgets = [parse_budget(b) for b in (sweep_budgets or [budget or DEFAULT_BUDGET])]
    baseline_names = parse_baselines(baselines)
    if not 0.0 < float(holdout) < 1.0:
        raise FliqsError(f"holdout={holdout}: use a fraction between 0 and 1, e.g. 0.2")
    check_data_arg(data)
    check_model_arg(model)
    with outdir.out_dir(out, model) as out_dir:
        return _compile(model, tgt, data, fmts, budgets, steps, out_dir, seed, resume, input_shapes,
                        progress, float(holdout), example_inputs, layer_latency, prepare_options,
                        search_options, sweep is not None, baseline_names)


def _with_tuning(target, tune_trials):
    """The target carrying ``tune_trials`` for its latency tables (TVM targets only)."""
    import dataclasses
    trials = int(tune_trials or 0)
    if trials < 0:
        raise FliqsError(f"--tune-trials {tune_trials}: give a number of trials ≥ 0")
    if trials and target.kind != "tvm":
        raise FliqsError(f"--tune-trials applies to TVM targets, not {target.text!r}")
    return dataclasses.replace(target, extra={**target.extra, "tune_trials": trials})


def _compile(model, target, data, fmts, budgets, steps, out_dir, seed, resume, input_shapes,
             progress, holdout, example_inputs, layer_latency, prepare_options, search_options,
             is_sweep, baseline_names) -> Result:
    import copy

    from .budget import resolve_budget
    names = [s for s in _COMPILE_STAGES if s != "latency table" or any(b.kind == "latency" for b in budgets)]
    if baseline_names:
        names.insert(names.index("search"), "baselines")
    stages = _Stages(names, progress)
    with stages("import", str(model) if isinstance(model, (str, Path)) else type(model).__name__):
        graph = _load_graph(model, input_shapes, example_inputs)
    with stages("data", str(data or "random inputs")):
        dataset, teacher, metric, q_float = _data_and_teacher(data, graph, seed, holdout)
    with stages("passes", f"formats {', '.join(fmts)}"):
        graph = _prepare(graph, fmts, prepare_options)
    latency = None
    if any(b.kind == "latency" for b in budgets):
        with stages("latency table", f"per layer × format on {target.text}"):
            latency = latency_model(graph, target, fmts, progress)
    values = [resolve_budget(b, graph, latency) for b in budgets]  # impossible budgets: refused now
    shared = dict(stages.timing)
    results, cache = [], {}
    for i, (b, value) in enumerate(zip(budgets, values)):
        point_out = out_dir if i == 0 else out_dir / "sweep" / _label(b)
        g = graph if len(budgets) == 1 else copy.deepcopy(graph)
        stages.timing = dict(shared)
        results.append(_compile_point(
            g, model, target, dataset, teacher, metric, q_float, fmts, b, value, steps, point_out,
            seed, resume, latency, layer_latency, stages, progress, search_options,
            baseline_names, cache))
    main = results[0]
    if is_sweep:
        main.report["sweep"] = [
            {"budget": r.report["budget"]["text"], "budget_value": r.report["budget"]["value"],
             "bops": r.report["totals"]["bops"], "size_bytes": r.report["totals"]["size_bytes"],
             "quality": r.report["quality"]["final"], "latency_ms": r.report["totals"]["latency_ms"],
             "dir": str(r.out_dir.relative_to(out_dir)) if r.out_dir != out_dir else "."}
            for r in results]
        seen, merged = set(), []
        for r in results:
            for b in r.report["baselines"]:
                key = (b["name"], b["bops"], b["quality"])
                if key not in seen:
                    seen.add(key)
                    merged.append(b)
        main.report["sweep_baselines"] = merged
        main.files.update(write_report(out_dir, main.report))
        main.sweep = results
    if progress:
        print_summary(main.report, out_dir)
    return main


def _compile_point(graph, model, target, dataset, teacher, metric, q_float, fmts, budget, value,
                   steps, out, seed, resume, latency, layer_latency, stages, progress,
                   search_options, baseline_names=(), cache=None) -> Result:
    """One budget: search → materialize → export/lower/measure → config + report, published into
    ``out`` only when everything succeeded."""
    from .passes import materialize
    notes: list = []
    baseline_rows = []
    if baseline_names:  # before the search: baselines start from the same (float) weights
        with stages("baselines", ", ".join(baseline_names)):
            baseline_rows = _run_baselines(baseline_names, graph, dataset, budget, steps=steps,
                                           seed=seed, latency=latency, search_options=search_options,
                                           cache=cache if cache is not None else {})
    with stages("search", f"{budget.text}, {steps} steps"):
        sr = _search(graph, dataset, budget, steps=steps, seed=seed, out_dir=out, resume=resume,
                     latency=latency, progress=progress, search_options=search_options)
    stage = outdir.staging(out)  # only now: a run killed during the search leaves just its checkpoint
    formats = sr.formats
    with stages("materialize"):
        fixed = materialize(graph, formats)
        _, q_final = _evaluate(fixed.gm, dataset, teacher)
    inputs = numeric_inputs(fixed, dataset)
    facts = backend_stage(fixed, target, stage, inputs, stages, notes)
    with stages("report"):
        table = latency
        if table is None and layer_latency:
            try:
                table = _chosen_latency(graph, target, formats, progress)
            except Exception as e:  # noqa: BLE001 — per-layer latency is a nice-to-have
                notes.append(f"per-layer latency not measured ({type(e).__name__}: {str(e)[:120]})")
        search_info = {"steps": steps, "seed": seed, "decisions": graph.space.num_decisions,
                       "seconds": round(stages.timing.get("search", 0.0), 2), "resumed": bool(resume),
                       "cost": float(sr.cost), "cost_kind": sr.cost_kind,
                       "search_quality": sr.quality,
                       "final_probabilities": [list(map(float, p)) for p in sr.probabilities],
                       "schedule": sr.schedule}
        _save_config(stage / "config.json", graph.name, formats,
                     {"target": target.text, "budget": budget.text, "seed": seed, "steps": steps})
        files = {"config": "config.json", "onnx": "model.qdq.onnx", "report_md": "report.md",
                 "formats_png": "formats.png", "search_log": "search.jsonl", "search_png": "search.png",
                 "checkpoint": "checkpoint/"}
        if target.kind == "tvm":
            files["tvm"] = "tvm/model.so"
        report = build_report(
            graph=graph, model_name=graph.name, target=target, formats_searched=fmts, budget=budget,
            budget_value=value, formats=formats,
            quality={"metric": metric, "float": float(q_float), "final": float(q_final),
                     "split": "held-out"},
            facts=facts, timing=stages.timing, latency=table, dataset=dataset,
            search_info=search_info, baselines=baseline_rows, notes=notes, files=files)
        write_report(stage, report)
    published = outdir.publish(stage, out)
    return Result(out, report, published)


def _chosen_latency(graph, target, formats: dict, progress: bool):
    """Per-layer latency of each searched layer in its chosen (weight, activation) formats only
    (one micro-graph per layer, cached on disk)."""
    pairs = {name: [(e.get("weight", "float"), e.get("activation", e.get("weight", "float")))]
             for name, e in formats.items()}
    return latency_model(graph, target, [], progress, pairs=pairs)


# ---- the other stages on their own ----------------------------------------------------------------
def search_only(model, *, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS, out=None,
                seed: int = 0, resume: bool = False, input_shapes: Optional[dict] = None,
                progress: bool = True, holdout: float = DEFAULT_HOLDOUT, example_inputs=None,
                target=None, prepare_options: Optional[dict] = None,
                search_options: Optional[dict] = None) -> dict:
    """import → passes → (latency table) → search; writes ``config.json`` (+ ``search.jsonl``,
    ``checkpoint/``) into ``out``. A latency budget needs ``target``. Returns
    ``{"out_dir", "config", "formats", "cost", "budget_value", "quality"}``; same failure
    guarantees as ``compile``."""
    import torch
    from .budget import parse_budget, resolve_budget
    torch.set_num_threads(threads())
    fmts = parse_formats(formats)
    steps = check_steps(steps)
    b = parse_budget(budget or DEFAULT_BUDGET)
    tgt = None
    if target is not None:
        from .backends.targets import parse_target
        tgt = parse_target(target).require_local()
    if b.kind == "latency" and tgt is None:
        raise FliqsError(f"--budget {b.text}: a latency budget is measured on a target; add --target "
                         "(e.g. --target llvm)")
    check_data_arg(data)
    check_model_arg(model)
    stages = _Stages(["import", "data", "passes", "search", "config"], progress)
    with outdir.out_dir(out, model) as out_dir:
        with stages("import"):
            graph = _load_graph(model, input_shapes, example_inputs)
        with stages("data"):
            dataset = _load_dataset(data, graph, seed, holdout)
        with stages("passes"):
            graph = _prepare(graph, fmts, prepare_options)
        latency = latency_model(graph, tgt, fmts, progress) if b.kind == "latency" else None
        value = resolve_budget(b, graph, latency)
        with stages("search", f"{b.text}, {steps} steps"):
            sr = _search(graph, dataset, b, steps=steps, seed=seed, out_dir=out_dir, resume=resume,
                         latency=latency, progress=progress, search_options=search_options)
        with stages("config"):
            path = _save_config(out_dir / "config.json", graph.name, sr.formats,
                                {"budget": b.text, "budget_value": value, "seed": seed, "steps": steps,
                                 "quality": sr.quality})
    return {"out_dir": out_dir, "config": path, "formats": sr.formats, "cost": float(sr.cost),
            "budget_value": value, "quality": sr.quality}


def _layer_names(graph) -> list:
    from .passes import analyze
    return [layer.name for layer in analyze(graph).layers.values()]


def _calibrate(graph, formats: dict, dataset, batches: int = 4, batch: int = 64) -> None:
    """Set every decision to the config's format and run a few batches so each quantizer
    initialises its scale from data (post-training calibration)."""
    import torch
    graph.space.apply(graph.gm, graph.space.choice_of(formats))
    with torch.no_grad():
        for i in range(batches):
            xb = dataset.x_train[i * batch:(i + 1) * batch]
            if len(xb):
                graph.gm(xb)


def lower_config(model, config, *, target, out=None, data=None, input_shapes: Optional[dict] = None,
                 progress: bool = True, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
                 example_inputs=None, layer_latency: bool = True) -> Result:
    """Materialize the format assignment of ``config`` (config.json), export QDQ ONNX, lower and
    compile for ``target``, check numerics, measure latency, write the report (no search).

    Layers named in the config with a non-float format are quantized (scales calibrated on
    ``data`` or on seeded random inputs: post-training, with the model's own weights); every
    other layer stays float. Unknown layer names / formats in the config → FliqsError naming them.
    Same out-folder guarantees as ``compile``."""
    import re

    import torch
    from .backends.targets import parse_target
    from .budget import parse_budget
    from .config import load_config
    torch.set_num_threads(threads())
    tgt = parse_target(target).require_local()
    check_data_arg(data)
    check_model_arg(model)
    if not Path(config).is_file():
        raise FliqsError(f"--config {config}: file not found; give a config.json written by "
                         "'fliqs compile' or 'fliqs search'")
    cfg = load_config(config)
    formats = {k: v for k, v in cfg["formats"].items() if any(f != "float" for f in v.values())}
    used = sorted({f for v in formats.values() for f in v.values()} - {"float"}) or ["int8"]
    stages = _Stages(["import", "data", "passes", "materialize", "export", "lower", "measure",
                      "report"], progress)
    with outdir.out_dir(out, model) as out_dir:
        with stages("import"):
            graph = _load_graph(model, input_shapes, example_inputs)
        with stages("data", str(data or "random inputs")):
            dataset, teacher, metric, q_float = _data_and_teacher(data, graph, seed, holdout)
        with stages("passes", f"formats {', '.join(used)}"):
            names = _layer_names(graph)
            unknown = [n for n in formats if n not in names]
            if unknown:
                raise FliqsError(f"{config}: unknown node(s) {', '.join(map(repr, unknown[:5]))} for "
                                 f"model {graph.name!r}; `fliqs inspect MODEL` lists the node names")
            others = [re.escape(n) for n in names if n not in formats]
            graph = _prepare(graph, used, {
                "keep_float_first": False, "keep_float_last": False,
                "keep_float_patterns": (f"^(?:{'|'.join(others)})$",) if others else ()})
            load_config(config, graph)  # names and formats checked against the prepared graph
            _calibrate(graph, formats, dataset)
        from .passes import materialize
        with stages("materialize"):
            fixed = materialize(graph, formats)
            _, q_final = _evaluate(fixed.gm, dataset, teacher)
        stage = outdir.staging(out_dir)
        notes = ["lower: scales calibrated post-training on the data; the weights are the model's own"]
        facts = backend_stage(fixed, tgt, stage, numeric_inputs(fixed, dataset), stages, notes)
        with stages("report"):
            from .cost import config_cost
            bops = float(config_cost(graph, formats, "bops"))
            table = None
            if layer_latency and formats:
                try:
                    table = _chosen_latency(graph, tgt, formats, progress)
                except Exception as e:  # noqa: BLE001 — per-layer latency is a nice-to-have
                    notes.append(f"per-layer latency not measured ({type(e).__name__}: {str(e)[:120]})")
            _save_config(stage / "config.json", graph.name, formats, {"target": tgt.text, "source": str(config)})
            report = build_report(
                graph=graph, model_name=graph.name, target=tgt, formats_searched=used,
                budget=parse_budget(f"bops={max(bops, 1.0)}"), budget_value=bops, formats=formats,
                quality={"metric": metric, "float": float(q_float), "final": float(q_final),
                         "split": "held-out"},
                facts=facts, timing=stages.timing, latency=table, dataset=dataset,
                search_info={"steps": 0, "config": str(config)}, baselines=[], notes=notes,
                files={"config": "config.json", "onnx": "model.qdq.onnx", "report_md": "report.md",
                       "formats_png": "formats.png",
                       **({"tvm": "tvm/model.so"} if tgt.kind == "tvm" else {})})
            report["budget"]["text"] = "given config (no search)"
            write_report(stage, report)
        published = outdir.publish(stage, out_dir)
    if progress:
        print_summary(report, out_dir, "lower")
    return Result(out_dir, report, published)


def profile(model, *, target, formats=None, input_shapes: Optional[dict] = None,
            progress: bool = True, cache_dir=None, example_inputs=None, tune_trials: int = 0):
    """Build (or refresh from the on-disk cache) the latency table of ``model`` on ``target``:
    every searched layer × candidate format (``tune_trials`` > 0: MetaSchedule-tuned TVM
    kernels, that many trials per layer). Returns ``(prepared graph, LatencyTable)``."""
    import torch
    from .backends.targets import parse_target
    torch.set_num_threads(threads())
    fmts = parse_formats(formats)
    tgt = _with_tuning(parse_target(target).require_local(), tune_trials)
    check_model_arg(model)
    graph = _prepare(_load_graph(model, input_shapes, example_inputs), fmts, None)
    return graph, latency_model(graph, tgt, fmts, progress, cache_dir=cache_dir)

"""The public verbs: ``fq.compile`` (what ``fliqs compile`` runs), ``search_only``,
``lower_config`` and ``profile`` (the other commands). Each checks its options into a
``pipeline.Request`` (cheap checks first, before any model work), then runs its pipeline — the
list of stages in ``PIPELINES`` — with ``pipeline.execute``. ``plan(command, ...)`` lists the
stages a call would run (``fliqs compile --dry-run``)::

    compile: import → data → passes → [latency table] → budget
             → per budget: [baselines] → search → materialize → export → lower → measure → report
             → [sweep summary]

Output folder (docs/design.md): ``config.json``, ``model.qdq.onnx``, the backend's artifacts
(``tvm/model.so``), ``report.json``, ``report.md``, ``formats.png``, ``pareto.png`` (sweep),
``search.jsonl``, ``search.png``, ``checkpoint/``. Final files are built in a hidden staging
folder and moved in only when the point succeeded; a failed run leaves at most the search's
checkpoint (for ``--resume``).
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before anything imports tvm

import dataclasses  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from fliqs_compiler.backends.targets import default_threads as threads  # noqa: E402
from fliqs_compiler.base.errors import FliqsError  # noqa: E402
from fliqs_compiler.driver import stages as S  # noqa: E402
from fliqs_compiler.driver.options import (DEFAULT_BUDGET, DEFAULT_FORMATS, DEFAULT_HOLDOUT,  # noqa: E402
                                           DEFAULT_STEPS, check_data_arg, check_holdout,
                                           check_jobs, check_metric, check_model_arg, check_steps,
                                           check_tuning,
                                           parse_baselines, parse_formats, parse_sweep)
from fliqs_compiler.driver import outdir  # noqa: E402
from fliqs_compiler.driver.outdir import resolve_out_dir  # noqa: E402
from fliqs_compiler.driver.pipeline import PerBudget, Request, Run, execute, format_plan  # noqa: E402
from fliqs_compiler.driver.pipeline import plan as _plan  # noqa: E402
from fliqs_compiler.search.parallel import resolve_device  # noqa: E402

__all__ = ["Result", "compile", "search_only", "lower_config", "profile", "plan", "PIPELINES",
           "parse_formats", "parse_sweep", "parse_baselines", "check_steps", "check_jobs", "resolve_out_dir",
           "DEFAULT_FORMATS", "DEFAULT_BUDGET", "DEFAULT_STEPS", "DEMO_MODEL"]

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo.onnx"


# ---- result --------------------------------------------------------------------------------------
@dataclass
class Result:
    """What ``compile`` / ``lower_config`` produced: the output folder, the report dict (report.json)
    and the paths of the files written."""

    out_dir: Path
    report: dict
    files: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)  # [Result] per sweep point (sweep runs only)
    executed: list = field(default_factory=list)  # the stage names that ran, in order

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


# ---- the pipelines, as data ----------------------------------------------------------------------
PER_POINT = [S.Baselines(), S.Search(), S.Materialize(), S.Export(), S.Lower(), S.Measure(), S.Report()]
PIPELINES = {
    "compile": [S.Import(), S.Data(), S.Passes(), S.LatencyTable(), S.Budgets(), PerBudget(PER_POINT),
                S.SweepSummary()],
    "search": [S.Import(), S.Data(teacher=False), S.Passes(), S.LatencyTable(), S.Budgets(),
               PerBudget([S.Search(), S.SaveSearchConfig()])],
    "lower": [S.Import(), S.Data(), S.ConfigPasses(),
              PerBudget([S.Materialize(), S.Export(), S.Lower(), S.Measure(), S.Report()])],
    "profile": [S.Import(), S.Passes(), S.LatencyTable(always=True)],
}


def plan(command: str, **kwargs) -> list:
    """``[(stage name, description)]``: what ``command`` (compile | search | lower | profile)
    would run for these arguments (the same checks as the call itself; nothing is run)."""
    request = _REQUESTS[command](**kwargs)
    return _plan(PIPELINES[command], _new_run(request))


def _new_run(request: Request) -> Run:
    run = Run(request)
    if request.command == "lower":
        from fliqs_compiler.ir.config import load_config
        cfg = load_config(request.config)
        run.set(config_formats={k: v for k, v in cfg["formats"].items()
                                if any(f != "float" for f in v.values())})
    return run


def _target(text):
    """``--target`` parsed and completed by its backend (``Backend.resolve``: e.g. a remote
    device asked for its own target): one-line errors before any model work."""
    from fliqs_compiler.backends.registry import backend_for
    from fliqs_compiler.backends.targets import parse_target
    target = parse_target(text)
    return backend_for(target).resolve(target)


def _search_options(search_options: Optional[dict], metric=None) -> dict:
    """The search options with ``metric`` (the argument, else ``search_options["metric"]``) and
    ``reward_metric`` checked (``options.check_metric``: a user callable is registered and
    replaced by its name, so the options stay plain data)."""
    so = dict(search_options or {})
    name = check_metric(metric if metric is not None else so.get("metric"))
    if name is not None:
        so["metric"] = name
    if so.get("reward_metric") is not None:
        so["reward_metric"] = check_metric(so["reward_metric"], "reward_metric")
    return so


def _start() -> None:
    import torch
    # data-parallel ranks on one machine share its cores
    torch.set_num_threads(max(1, threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _execute_ranks(stages, request: Request) -> Optional[Run]:
    """``execute`` on this process's device, in the torchrun job it belongs to (if any). Rank 0
    runs every stage and owns the output folder; the other ranks run the collective stages
    (``pipeline``), write nothing and get None."""
    from fliqs_compiler.search import parallel
    with parallel.start(request.device) as par:
        if par.writer:
            return execute(stages, _new_run(request))
        request = dataclasses.replace(request, writer=False, progress=False)
        run = _new_run(request)
        run.out_dir = outdir.default_path(request.out, request.model)
        execute(stages, run, own_out_dir=False)
        return None


# ---- requests: every option checked up front ------------------------------------------------------
def compile_request(model, *, target, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS,
                    out=None, seed: int = 0, resume: bool = False, sweep: Optional[str] = None,
                    input_shapes: Optional[dict] = None, progress: bool = True,
                    holdout: float = DEFAULT_HOLDOUT, example_inputs=None, layer_latency: bool = True,
                    prepare_options: Optional[dict] = None, search_options: Optional[dict] = None,
                    baselines=None, tune_trials: int = 0, metric=None, device=None,
                    jobs: int = 1) -> Request:
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.cost.budget import parse_budget
    fmts = parse_formats(formats)
    resolve_device(device)
    search_options = _search_options(search_options, metric)
    steps = check_steps(steps)
    tgt = _target(target)
    tuning = check_tuning(tgt, tune_trials)
    sweep_budgets = parse_sweep(sweep)
    if sweep_budgets and budget is not None:
        raise FliqsError("--budget and --sweep given together; a sweep runs one search per budget, "
                         "so give only --sweep (e.g. --sweep bops=0.2x,0.5x)")
    budgets = tuple(parse_budget(b) for b in (sweep_budgets or [budget or DEFAULT_BUDGET]))
    jobs = check_jobs(jobs)
    baseline_names = tuple(parse_baselines(baselines))
    holdout = check_holdout(holdout)
    check_data_arg(data)
    check_model_arg(model)
    return Request("compile", model, target=tgt, data=data, formats=tuple(fmts), budgets=budgets,
                   steps=steps, seed=seed, resume=resume, sweep=sweep is not None, out=out,
                   input_shapes=input_shapes, example_inputs=example_inputs, holdout=holdout,
                   layer_latency=layer_latency, prepare_options=dict(prepare_options or {}),
                   search_options=dict(search_options or {}), baselines=baseline_names,
                   tuning=tuning, progress=progress, device=device, jobs=jobs)


def search_request(model, *, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS, out=None,
                   seed: int = 0, resume: bool = False, input_shapes: Optional[dict] = None,
                   progress: bool = True, holdout: float = DEFAULT_HOLDOUT, example_inputs=None,
                   target=None, prepare_options: Optional[dict] = None,
                   search_options: Optional[dict] = None, metric=None, device=None) -> Request:
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.cost.budget import parse_budget
    fmts = parse_formats(formats)
    resolve_device(device)
    search_options = _search_options(search_options, metric)
    steps = check_steps(steps)
    b = parse_budget(budget or DEFAULT_BUDGET)
    tgt = _target(target) if target is not None else None
    if b.kind == "latency" and tgt is None:
        raise FliqsError(f"--budget {b.text}: a latency budget is measured on a target; add --target "
                         "(e.g. --target llvm)")
    holdout = check_holdout(holdout)
    check_data_arg(data)
    check_model_arg(model)
    return Request("search", model, target=tgt, data=data, formats=tuple(fmts), budgets=(b,),
                   steps=steps, seed=seed, resume=resume, out=out, input_shapes=input_shapes,
                   example_inputs=example_inputs, holdout=holdout, layer_latency=False,
                   prepare_options=dict(prepare_options or {}),
                   search_options=dict(search_options or {}),
                   tuning=check_tuning(tgt, 0) if tgt else None, progress=progress, device=device)


def lower_request(model, config, *, target, out=None, data=None, input_shapes: Optional[dict] = None,
                  progress: bool = True, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
                  example_inputs=None, layer_latency: bool = True) -> Request:
    from fliqs_compiler.backends.targets import parse_target
    from fliqs_compiler.ir.config import load_config
    tgt = _target(target)
    holdout = check_holdout(holdout)
    check_data_arg(data)
    check_model_arg(model)
    if not Path(config).is_file():
        raise FliqsError(f"--config {config}: file not found; give a config.json written by "
                         "'fliqs compile' or 'fliqs search'")
    cfg = load_config(config)
    used = sorted({f for v in cfg["formats"].values() for f in v.values()} - {"float"}) or ["int8"]
    return Request("lower", model, target=tgt, data=data, formats=tuple(used), seed=seed, out=out,
                   input_shapes=input_shapes, example_inputs=example_inputs, holdout=holdout,
                   layer_latency=layer_latency, tuning=check_tuning(tgt, 0), config=Path(config),
                   progress=progress)


def profile_request(model, *, target, formats=None, input_shapes: Optional[dict] = None,
                    progress: bool = True, cache_dir=None, example_inputs=None,
                    tune_trials: int = 0, prepare_options: Optional[dict] = None) -> Request:
    from fliqs_compiler.backends.targets import parse_target
    fmts = parse_formats(formats)
    tgt = _target(target)
    tuning = check_tuning(tgt, tune_trials)
    check_model_arg(model)
    return Request("profile", model, tgt, formats=tuple(fmts), input_shapes=input_shapes,
                   example_inputs=example_inputs, tuning=tuning, cache_dir=cache_dir, progress=progress,
                   prepare_options=dict(prepare_options or {}))


_REQUESTS = {"compile": compile_request, "search": search_request, "lower": lower_request,
             "profile": profile_request}


# ---- the verbs ------------------------------------------------------------------------------------
def compile(model, *, target, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS,
            out=None, seed: int = 0, resume: bool = False, sweep: Optional[str] = None,
            input_shapes: Optional[dict] = None, progress: bool = True,
            holdout: float = DEFAULT_HOLDOUT, example_inputs=None, layer_latency: bool = True,
            prepare_options: Optional[dict] = None, search_options: Optional[dict] = None,
            baselines=None, tune_trials: int = 0, metric=None, device=None,
            jobs: int = 1) -> Optional[Result]:
    """Compile ``model`` (an .onnx path or an ``nn.Module`` with ``example_inputs``) for ``target``:
    the ``PIPELINES["compile"]`` stages.

    Args: ``target`` ('llvm', a JSON target dict, 'ort'); ``data`` (digits, fashion-mnist, .npz,
    image folder; None → seeded random inputs, float model as teacher); ``formats`` (names or
    "int4,int8"); ``budget`` ("bops=0.5x", "size=2MB", "latency=3ms"); ``sweep``
    ("bops=0.2x,0.3x,0.5x": one search per budget, sharing import/passes/data/latency table; the
    first value's result lands in ``out``, the others in ``out/sweep/<budget>/``, plus pareto.png;
    ``jobs`` > 1: that many points at once, each in its own process, same results as one by one);
    ``holdout``: fraction of the data kept out of training to measure quality; ``baselines``:
    names from ``search.baselines.BASELINES`` ("uniform,random,ilp,dnas") run on the same graph,
    data, steps and budget, reported next to FLIQS; ``tune_trials`` > 0: per-layer latency
    tables (latency budgets, the report) from tuned kernels (backends that tune); ``metric``:
    the quality signal of the search and the report — a ``search.trainer.QUALITY`` name
    (accuracy, agreement, cosine, sqnr, neg_rel_mse, ...) or a callable
    ``fn(outputs, float_outputs, labels) -> float``, higher is better; None: chosen from the
    model's outputs (``search.trainer.auto_metric``; the report's ``quality.metric_reason`` says
    why); ``device``: where the search trains (auto — CUDA when available —, cpu, cuda, cuda:N;
    export, lowering and measurement stay on the host). Under ``torchrun`` every rank calls this
    and the search is data parallel (``search.parallel``): rank 0 writes and returns the Result,
    the other ranks return None.

    Requires nothing of ``out`` but that it can be created/written. Guarantees: on success ``out``
    holds every file of the output folder (docs/design.md) and report.json meets the contract; on
    failure nothing new in ``out`` except the search checkpoint (rerun with ``resume=True``).
    Bad input raises FliqsError (one line) before any long work where it can be checked up front.
    """
    _start()
    request = compile_request(model, target=target, data=data, formats=formats, budget=budget,
                              steps=steps, out=out, seed=seed, resume=resume, sweep=sweep,
                              input_shapes=input_shapes, progress=progress, holdout=holdout,
                              example_inputs=example_inputs, layer_latency=layer_latency,
                              prepare_options=prepare_options, search_options=search_options,
                              baselines=baselines, tune_trials=tune_trials, metric=metric,
                              device=device, jobs=jobs)
    run = _execute_ranks(PIPELINES["compile"], request)
    if run is None:
        return None
    results = [Result(p.out, p.values["report"], p.values.get("published", {})) for p in run.points]
    main = results[0]
    if request.sweep:
        main.sweep = results
    if progress:
        from fliqs_compiler.report import print_summary
        print_summary(main.report, run.out_dir)
    main.executed = list(run.executed)
    return main


def search_only(model, *, data=None, formats=None, budget=None, steps: int = DEFAULT_STEPS, out=None,
                seed: int = 0, resume: bool = False, input_shapes: Optional[dict] = None,
                progress: bool = True, holdout: float = DEFAULT_HOLDOUT, example_inputs=None,
                target=None, prepare_options: Optional[dict] = None,
                search_options: Optional[dict] = None, metric=None, device=None) -> Optional[dict]:
    """``PIPELINES["search"]``: import → passes → (latency table) → search; writes ``config.json``
    (+ ``search.jsonl``, ``checkpoint/``) into ``out``. A latency budget needs ``target``;
    ``metric`` as in ``compile``. Returns ``{"out_dir", "config", "formats", "cost",
    "budget_value", "quality"}`` (``quality``: metric, metric_reason, float, final); same failure
    guarantees as ``compile``; ``device`` and torchrun as in ``compile`` (ranks > 0: None)."""
    _start()
    request = search_request(model, data=data, formats=formats, budget=budget, steps=steps, out=out,
                             seed=seed, resume=resume, input_shapes=input_shapes, progress=progress,
                             holdout=holdout, example_inputs=example_inputs, target=target,
                             prepare_options=prepare_options, search_options=search_options,
                             metric=metric, device=device)
    run = _execute_ranks(PIPELINES["search"], request)
    if run is None:
        return None
    point = run.points[0]
    sr = point.values["search"]
    return {"out_dir": run.out_dir, "config": point.values["config"], "formats": sr.formats,
            "cost": float(sr.cost), "budget_value": point.value, "quality": sr.quality}


def lower_config(model, config, *, target, out=None, data=None, input_shapes: Optional[dict] = None,
                 progress: bool = True, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
                 example_inputs=None, layer_latency: bool = True) -> Result:
    """``PIPELINES["lower"]``: materialize the format assignment of ``config`` (config.json),
    export QDQ ONNX, lower and compile for ``target``, check numerics, measure latency, write the
    report (no search).

    Layers named in the config with a non-float format are quantized (scales calibrated on
    ``data`` or on seeded random inputs: post-training, with the model's own weights); every
    other layer stays float. Unknown layer names / formats in the config → FliqsError naming them.
    Same out-folder guarantees as ``compile``."""
    _start()
    request = lower_request(model, config, target=target, out=out, data=data,
                            input_shapes=input_shapes, progress=progress, seed=seed,
                            holdout=holdout, example_inputs=example_inputs,
                            layer_latency=layer_latency)
    run = execute(PIPELINES["lower"], _new_run(request))
    point = run.points[0]
    result = Result(run.out_dir, point.values["report"], point.values.get("published", {}))
    result.executed = list(run.executed)
    if progress:
        from fliqs_compiler.report import print_summary
        print_summary(result.report, run.out_dir, "lower")
    return result


def profile(model, *, target, formats=None, input_shapes: Optional[dict] = None,
            progress: bool = True, cache_dir=None, example_inputs=None, tune_trials: int = 0,
            prepare_options: Optional[dict] = None):
    """``PIPELINES["profile"]``: build (or refresh from the on-disk cache) the latency table of
    ``model`` on ``target``: every costed searched layer × candidate format (``tune_trials`` > 0:
    tuned kernels, that many trials per layer; ``prepare_options`` as for ``compile``: input-only
    layers from ``quantize_inputs`` are searched but not timed, they cost nothing). Returns
    ``(prepared graph, LatencyTable)``."""
    _start()
    request = profile_request(model, target=target, formats=formats, input_shapes=input_shapes,
                              progress=progress, cache_dir=cache_dir, example_inputs=example_inputs,
                              tune_trials=tune_trials, prepare_options=prepare_options)
    run = Run(request, out_dir=None)
    execute(PIPELINES["profile"], run, own_out_dir=False)
    return run.graph, run.latency


def describe(command: str, **kwargs) -> str:
    """The plan of ``command`` for these arguments, as the text ``--dry-run`` prints."""
    return format_plan(command, plan(command, **kwargs))

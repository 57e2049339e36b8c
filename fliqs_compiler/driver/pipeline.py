"""The pipeline as data: each command is a list of stages, run in order by one runner.

A stage (``Stage``) is a small object with a ``name``, a one-line ``describe(run)`` of what it
will do for the given arguments, and ``run(run)``, which reads and writes the one run context
(``Run``): the checked request plus whatever earlier stages produced. ``PerBudget`` holds the
stages that run once per budget (a sweep runs them for each value). A stage with
``collective = True`` runs on every data-parallel rank (``search.parallel``); the others only on
rank 0, the one writer.

The runner (``execute``) owns, once for every command: the output folder (created and probed up
front; on failure put back as it was, except the search checkpoint ``--resume`` needs), the
staging folder of each budget point (final files appear only when the point succeeded), the
numbered progress lines, and the timing the report gets. ``plan(stages, run)`` lists what
``execute`` will run — ``fliqs compile --dry-run`` prints it, and ``Run.executed`` records what
really ran, so a test can hold the two to each other.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from fliqs_compiler.driver import outdir

__all__ = ["Stage", "Request", "Point", "Run", "PerBudget", "plan", "execute", "format_plan"]


@dataclass(frozen=True)
class Request:
    """What the user asked for, every option already checked (``options``)."""

    command: str  # 'compile' | 'search' | 'lower' | 'profile'
    model: Any  # an .onnx path or an nn.Module
    target: Any = None  # backends.targets.Target, or None (search without a latency budget)
    data: Any = None
    formats: tuple = ()
    budgets: tuple = ()  # cost.budget.Budget per point (a sweep has several)
    steps: int = 0
    seed: int = 0
    resume: bool = False
    sweep: bool = False
    out: Any = None
    input_shapes: Optional[dict] = None
    example_inputs: Any = None
    holdout: float = 0.2
    layer_latency: bool = True
    prepare_options: dict = field(default_factory=dict)
    search_options: dict = field(default_factory=dict)
    baselines: tuple = ()
    tuning: Any = None  # backends.registry.TuningOptions
    config: Optional[Path] = None  # lower: the config.json to materialize
    cache_dir: Any = None  # latency tables' cache folder (profile)
    progress: bool = True
    jobs: int = 1  # sweep points run at once (spawned processes; ``_points_in_processes``)
    device: Optional[str] = None  # search device: auto (None) | cpu | cuda | cuda:N
    # False on data-parallel ranks other than 0: they run only the ``collective`` stages (the
    # ones every rank takes part in: import … search) and write nothing
    writer: bool = True

    @property
    def model_text(self) -> str:
        return str(self.model) if isinstance(self.model, (str, Path)) else type(self.model).__name__

    @property
    def latency_budget(self) -> bool:
        return any(b.kind == "latency" for b in self.budgets)


@dataclass
class Point:
    """One budget's share of the run: its folder, its staging folder and what its stages made."""

    budget: Any
    out: Path
    value: float = 0.0
    graph: Any = None  # the searchable graph (a copy per sweep point)
    stage_dir: Optional[Path] = None
    timing: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # what its stages produced, by name
    result: Any = None


@dataclass
class Run:
    """The run context every stage reads and writes."""

    request: Request
    out_dir: Optional[Path] = None
    values: dict = field(default_factory=dict)  # what the shared stages produced, by name
    timing: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    point: Optional[Point] = None  # the budget point being run
    executed: list = field(default_factory=list)  # stage names, in the order they ran
    result: Any = None

    def __getattr__(self, name):  # run.graph, run.dataset, ...: what a stage stored in values
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def set(self, **values) -> None:
        self.values.update(values)

    def staging(self) -> Path:
        """The current point's staging folder, created on first use (after the search: a run
        killed during the search leaves just its checkpoint)."""
        if self.point.stage_dir is None:
            self.point.stage_dir = outdir.staging(self.point.out)
        return self.point.stage_dir


class Stage(Protocol):
    name: str

    def describe(self, run: Run) -> str: ...

    def run(self, run: Run) -> None: ...


@dataclass
class PerBudget:
    """The stages that run once per budget of ``request.budgets``; each point's files land in
    ``out`` (the first) or ``out/sweep/<budget>/`` and are published when the point succeeded."""

    stages: Sequence
    name: str = "per budget"

    def points(self, run: Run) -> list:
        out = run.out_dir or Path("<out>")
        budgets = run.request.budgets or (None,)  # lower: one point, its config's own cost
        return [Point(b, out if i == 0 else out / "sweep" / _label(b)) for i, b in enumerate(budgets)]


def _label(budget) -> str:
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in budget.text)


def _applies(stage, run: Run) -> bool:
    if not run.request.writer and not getattr(stage, "collective", False):
        return False  # a data-parallel rank > 0: files and artifacts are rank 0's
    return getattr(stage, "applies", lambda run: True)(run)


def plan(stages: Sequence, run: Run) -> list:
    """``[(stage name, description)]`` in the order ``execute`` runs them (per-budget stages
    once per budget)."""
    rows = []
    for stage in stages:
        if isinstance(stage, PerBudget):
            for point in stage.points(run):
                run.point = point
                rows += [(s.name, s.describe(run)) for s in stage.stages if _applies(s, run)]
            run.point = None
        elif _applies(stage, run):
            rows.append((stage.name, stage.describe(run)))
    return rows


def format_plan(command: str, rows: list) -> str:
    width = max((len(n) for n, _ in rows), default=0)
    lines = [f"fliqs {command}: {len(rows)} stages"]
    lines += [f"  {i:>2}. {name:<{width}}  {note}".rstrip() for i, (name, note) in enumerate(rows, 1)]
    return "\n".join(lines)


class _Progress:
    """One line per stage on stderr (``[i/n] name — note``, then its seconds and the total)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.i, self.t0 = total, 0, time.perf_counter()
        self.console = None
        if enabled:
            from rich.console import Console
            self.console = Console(stderr=True, highlight=False)

    def start(self, name: str, note: str) -> None:
        self.i += 1
        if self.console:
            self.console.print(f"[bold cyan][{self.i}/{self.total}][/] {name}{' — ' + note if note else ''} …")

    def done(self, seconds: float) -> None:
        if self.console:
            self.console.print(f"      [green]done[/] in {seconds:.1f} s (total "
                               f"{time.perf_counter() - self.t0:.1f} s)")


def _run_stage(stage, run: Run, progress: _Progress, timing: dict) -> None:
    progress.start(stage.name, stage.describe(run))
    t0 = time.perf_counter()
    stage.run(run)
    dt = time.perf_counter() - t0
    timing[stage.name] = timing.get(stage.name, 0.0) + dt
    run.executed.append(stage.name)
    progress.done(dt)


def execute(stages: Sequence, run: Run, *, own_out_dir: bool = True) -> Run:
    """Run ``stages`` on ``run``: the output folder, staging, progress and timing are handled
    here. ``own_out_dir`` False: the caller already holds ``run.out_dir`` (nothing created)."""
    if own_out_dir:
        with outdir.out_dir(run.request.out, run.request.model) as out_dir:
            run.out_dir = out_dir
            return _execute(stages, run)
    return _execute(stages, run)


def _execute(stages: Sequence, run: Run) -> Run:
    progress = _Progress(len(plan(stages, copy.copy(run))), run.request.progress)
    for stage in stages:
        if isinstance(stage, PerBudget):
            run.points = stage.points(run)
            if run.request.jobs > 1 and len(run.points) > 1:
                _points_in_processes(stages, run, progress)
            else:
                for i in range(len(run.points)):
                    _run_point(stage, run, i, progress)
            run.point = None
        elif _applies(stage, run):
            _run_stage(stage, run, progress, run.timing)
    return run


def _run_point(stage: PerBudget, run: Run, i: int, progress: _Progress) -> Point:
    """The per-budget stages of point ``i``, then its files published."""
    point = run.point = run.points[i]
    point.timing = dict(run.timing)
    for s in stage.stages:
        if _applies(s, run):
            _run_stage(s, run, progress, point.timing)
    if point.stage_dir is not None:
        point.values["published"] = outdir.publish(point.stage_dir, point.out)
    return point


# What a point run in another process sends back: plain data (its report and file list), not
# the graphs and arrays its stages made.
_RETURNED = ("report", "published", "search")


def _point_in_child(job: tuple) -> dict:
    """In a fresh (spawned) process: the shared stages again (import, data, passes, … — each a
    pure function of the request; a latency table comes from the on-disk cache the parent
    filled), then the per-budget stages of point ``i`` only."""
    stages, request, out_dir, i, threads = job
    import torch
    torch.set_num_threads(threads)
    run = Run(request, out_dir=out_dir)
    quiet = _Progress(0, False)
    for stage in stages:
        if isinstance(stage, PerBudget):
            run.points = stage.points(run)
            shared = len(run.executed)
            point = _run_point(stage, run, i, quiet)
            return {"values": {k: point.values[k] for k in _RETURNED if k in point.values},
                    "timing": point.timing, "notes": point.notes, "value": point.value,
                    "executed": run.executed[shared:]}
        if _applies(stage, run):
            _run_stage(stage, run, quiet, run.timing)
    raise RuntimeError("no per-budget stage in the pipeline")


def _points_in_processes(stages: Sequence, run: Run, progress: _Progress) -> None:
    """Run the sweep's points ``run.request.jobs`` at a time, each in a spawned process (fork is
    not an option: a forked child of a process whose OpenMP pool ran deadlocks in its first
    parallel op — measured, GNU libgomp). Each child redoes the shared stages, then runs its
    point: the point's search is the same function of (graph, data, options, budget) as in a
    serial sweep (its own seeded generator), so the results are the serial ones; each point
    keeps its own checkpoint (``--resume``). Threads per process stay what they are: ``jobs`` ×
    threads should fit the machine's cores."""
    import dataclasses
    import multiprocessing

    import torch
    request = dataclasses.replace(run.request, progress=False, jobs=1)
    jobs = [(list(stages), request, run.out_dir, i, torch.get_num_threads())
            for i in range(len(run.points))]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(run.request.jobs, len(run.points))) as pool:
        for i, got in enumerate(pool.imap(_point_in_child, jobs)):
            point = run.points[i]
            point.values.update(got["values"])
            point.timing, point.notes, point.value = got["timing"], got["notes"], got["value"]
            for name in got["executed"]:  # the point's stages, as they ran over there
                progress.start(name, f"{point.budget.text} (in a sweep process)")
                progress.done(point.timing.get(name, 0.0))  # per-point names: none shared
            run.executed += got["executed"]

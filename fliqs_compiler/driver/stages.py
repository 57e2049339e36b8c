"""The stages the commands are made of (``api.PIPELINES`` lists them per command).

Each stage reads what earlier stages stored on the run (``run.graph``, ``run.dataset``, …; per
budget point ``run.point.values``) and stores what it makes. A stage never looks at a backend's
kind: it asks ``backends.registry.backend_for(target)``.
"""
from __future__ import annotations

import copy
import re

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.driver import quality
from fliqs_compiler.driver.measure import chosen_latency, latency_model, numeric_inputs
from fliqs_compiler.driver.pipeline import Run

__all__ = ["Import", "Data", "Passes", "ConfigPasses", "LatencyTable", "Budgets", "Baselines",
           "Search", "SaveSearchConfig", "Materialize", "Export", "Lower", "Measure", "Report",
           "SweepSummary"]


def _formats_text(formats) -> str:
    return f"formats {', '.join(formats)}"


# ---- shared stages -------------------------------------------------------------------------
class Import:
    """The model → ``run.graph`` (ONNX importer or torch.export)."""

    name = "import"
    collective = True

    def describe(self, run: Run) -> str:
        return run.request.model_text

    def run(self, run: Run) -> None:
        from fliqs_compiler.frontends.load import load
        r = run.request
        run.set(graph=load(r.model, example_inputs=r.example_inputs, input_shapes=r.input_shapes))


class Data:
    """The search data → ``run.dataset`` and the quality metric (``--metric``, else chosen from
    the float model's outputs) with its reason (``run.metric``, ``run.metric_reason``); with
    ``teacher``, also the float teacher and its held-out quality (``run.teacher``,
    ``run.q_float``)."""

    name = "data"
    collective = True

    def __init__(self, teacher: bool = True):
        self.teacher = teacher

    def describe(self, run: Run) -> str:
        return str(run.request.data or "random inputs")

    def run(self, run: Run) -> None:
        r = run.request
        given = (r.search_options or {}).get("metric")
        if not self.teacher:
            dataset = quality.load_dataset(r.data, run.graph, r.seed, r.holdout)
            metric, reason = quality.choose(run.graph, dataset, given)
            run.set(dataset=dataset, metric=metric, metric_reason=reason)
            return
        dataset, teacher, metric, reason, q_float = quality.data_and_teacher(
            r.data, run.graph, r.seed, r.holdout, given)
        run.set(dataset=dataset, teacher=teacher, metric=metric, metric_reason=reason, q_float=q_float)


class Passes:
    """The compiler passes (``passes.prepare``): the searchable graph → ``run.graph``."""

    name = "passes"
    collective = True

    def describe(self, run: Run) -> str:
        return _formats_text(run.request.formats)

    def run(self, run: Run) -> None:
        from fliqs_compiler.passes import PrepareOptions, prepare
        r = run.request
        run.set(graph=prepare(run.graph, PrepareOptions(formats=list(r.formats), **r.prepare_options)))


class ConfigPasses:
    """``lower``: the passes for a given config.json — its layers quantized in its formats (every
    other layer float), its names checked against the model, scales calibrated on the data."""

    name = "passes"

    def describe(self, run: Run) -> str:
        return f"{_formats_text(run.request.formats)} from {run.request.config}"

    def run(self, run: Run) -> None:
        from fliqs_compiler.ir.config import load_config
        from fliqs_compiler.passes import INPUT_OPS, PrepareOptions, analyze, prepare
        r, graph = run.request, run.graph
        formats = run.config_formats
        # a config may name LayerNorm / softmax / GELU inputs (a search with --quantize-inputs)
        inputs = tuple(INPUT_OPS)
        names = [layer.name for layer in analyze(graph, PrepareOptions(quantize_inputs=inputs))
                 .layers.values()]
        unknown = [n for n in formats if n not in names]
        if unknown:
            raise FliqsError(f"{r.config}: unknown node(s) {', '.join(map(repr, unknown[:5]))} for "
                             f"model {graph.name!r}; `fliqs inspect MODEL` lists the node names")
        others = [re.escape(n) for n in names if n not in formats]
        graph = prepare(graph, PrepareOptions(
            formats=list(r.formats), keep_float_first=False, keep_float_last=False,
            quantize_inputs=inputs,
            operand_rules=False,  # the config is explicit: its formats are the user's choice
            keep_float_patterns=(f"^(?:{'|'.join(others)})$",) if others else ()))
        # names and formats checked against the prepared graph (an input-only layer's weight
        # becomes "float": it has none)
        checked = load_config(r.config, graph)["formats"]
        formats = {name: checked[name] for name in formats}
        _calibrate(graph, formats, run.dataset)
        run.set(graph=graph, config_formats=formats)


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


class LatencyTable:
    """Per layer × candidate format latency on the target (``run.latency``): for latency budgets
    (or always, for ``profile``)."""

    name = "latency table"
    collective = True

    def __init__(self, always: bool = False):
        self.always = always

    def applies(self, run: Run) -> bool:
        return self.always or run.request.latency_budget

    def describe(self, run: Run) -> str:
        r = run.request
        tuned = f", {r.tuning.trials} tuning trials per layer" if r.tuning and r.tuning.trials else ""
        return f"per layer × format on {r.target.text}{tuned}"

    def run(self, run: Run) -> None:
        from fliqs_compiler.search import parallel
        r = run.request
        # measured once (rank 0), the same table on every data-parallel rank
        run.set(latency=parallel.current().from_writer(
            lambda: latency_model(run.graph, r.target, list(r.formats), r.progress,
                                  cache_dir=r.cache_dir, tuning=r.tuning)))


class Budgets:
    """Each budget resolved against the graph (``bops=0.1x`` → BOPs) before any search, so an
    impossible budget is refused before the long work."""

    name = "budget"
    collective = True

    def describe(self, run: Run) -> str:
        return ", ".join(b.text for b in run.request.budgets)

    def run(self, run: Run) -> None:
        from fliqs_compiler.cost.budget import resolve_budget
        latency = run.values.get("latency")
        run.set(budget_values=[resolve_budget(b, run.graph, latency) for b in run.request.budgets])


# ---- per budget point -------------------------------------------------------------------------
def _search_options(run: Run):
    """``SearchOptions`` of this run: the request's, with the metric the data stage settled on
    and, unless given, that metric's teacher loss for the weight training."""
    import dataclasses
    from fliqs_compiler.search import SearchOptions
    from fliqs_compiler.search.oneshot import recipe_train
    from fliqs_compiler.search.trainer import QUALITY
    r = run.request
    options = {**r.search_options, "metric": run.metric}
    train = options.get("train") or recipe_train()
    if train.teacher_loss is None and QUALITY[run.metric].teacher_loss is not None:
        options["train"] = dataclasses.replace(train, teacher_loss=QUALITY[run.metric].teacher_loss)
    return SearchOptions(steps=r.steps, seed=r.seed, **options)


def _point_graph(run: Run):
    """The searchable graph of this point: the run's own for one budget, a copy per sweep point
    (each search trains its own weights)."""
    p = run.point
    if p.graph is None:
        p.graph = run.graph if len(run.request.budgets) == 1 else copy.deepcopy(run.graph)
        p.value = run.budget_values[run.points.index(p)]
    return p.graph


class Baselines:
    """The baselines (``search.baselines``) on the same graph, data, steps and budget, before the
    search (they start from the same float weights). ``uniform`` is budget-free: run once."""

    name = "baselines"
    collective = True

    def applies(self, run: Run) -> bool:
        return bool(run.request.baselines)

    def describe(self, run: Run) -> str:
        return ", ".join(run.request.baselines)

    def run(self, run: Run) -> None:
        from fliqs_compiler.cost.model import config_cost
        from fliqs_compiler.search.baselines import BASELINES
        r, graph, budget = run.request, _point_graph(run), run.point.budget
        latency = run.values.get("latency")
        cache = run.values.setdefault("baseline_cache", {})
        opts = _search_options(run)
        rows = []
        for name in r.baselines:
            key = (name, None if name == "uniform" else budget.text)
            if key not in cache:
                res = BASELINES[name](graph, run.dataset, budget, opts, latency=latency)
                cache[key] = res if isinstance(res, list) else [res]
            for b in cache[key]:
                rows.append({
                    "name": b.name, "method": b.method,
                    "bops": int(config_cost(graph, b.formats, "bops")), "quality": float(b.quality),
                    "latency_ms": float(config_cost(graph, b.formats, "latency", latency)) if latency else None,
                    "size_bytes": int(config_cost(graph, b.formats, "size")), "formats": b.formats,
                    "steps": int(b.steps), "seconds": round(float(b.seconds), 2), "notes": b.notes})
        run.point.values["baselines"] = rows


class Search:
    """The FLIQS one-shot search under this point's budget → ``point.values["search"]``
    (checkpointed into the point's folder; ``--resume`` continues it)."""

    name = "search"
    collective = True

    def describe(self, run: Run) -> str:
        return f"{run.point.budget.text}, {run.request.steps} steps"

    def run(self, run: Run) -> None:
        from fliqs_compiler.search import run_search
        r = run.request
        graph = _point_graph(run)
        result = run_search(
            graph, run.dataset, run.point.budget, _search_options(run), out_dir=run.point.out,
            resume=r.resume, latency_model=run.values.get("latency"), progress=r.progress)
        result.quality["metric_reason"] = run.metric_reason  # the driver chose it (the search was told)
        run.point.values["search"] = result


class SaveSearchConfig:
    """``search``: the found formats → ``config.json`` (no artifacts)."""

    name = "config"

    def describe(self, run: Run) -> str:
        return "config.json"

    def run(self, run: Run) -> None:
        from fliqs_compiler.ir.config import save_config
        r, sr, p = run.request, run.point.values["search"], run.point
        path = p.out / "config.json"
        save_config(path, run.graph.name, sr.formats,
                    extra={"budget": p.budget.text, "budget_value": p.value, "seed": r.seed,
                           "steps": r.steps, "quality": sr.quality})
        p.values["config"] = path


class Materialize:
    """The chosen formats fixed into the graph (``passes.materialize``) and its held-out quality."""

    name = "materialize"

    def describe(self, run: Run) -> str:
        return "the chosen formats, fixed" if run.request.command != "lower" else str(run.request.config)

    def run(self, run: Run) -> None:
        from fliqs_compiler.passes import materialize
        p = run.point
        if "search" in p.values:
            formats = p.values["search"].formats
        else:  # lower: a given config
            formats = run.config_formats
            p.notes.append("lower: scales calibrated post-training on the data; the weights are the "
                           "model's own")
        graph = p.graph if p.graph is not None else run.graph
        fixed = materialize(graph, formats)
        _, q_final = quality.evaluate(fixed.gm, run.dataset, run.teacher, metric=run.metric)
        p.values.update(formats=formats, fixed=fixed, q_final=q_final,
                        inputs=numeric_inputs(fixed, run.dataset))


class Export:
    """``model.qdq.onnx``, checked in a default onnxruntime session (``backends.qdq``)."""

    name = "export"

    def describe(self, run: Run) -> str:
        return "QDQ ONNX + default onnxruntime session check"

    def run(self, run: Run) -> None:
        from fliqs_compiler.backends.ort_backend import GraphReference
        from fliqs_compiler.backends.qdq import export_checked
        p = run.point
        # the torch graph's outputs, computed once for the QDQ check and the Lower stage's check
        reference = GraphReference(p.values["fixed"], p.values["inputs"])
        path, runnable, facts = export_checked(p.values["fixed"], run.staging(), p.values["inputs"], p.notes,
                                               reference)
        p.values.update(onnx_path=path, reference=reference, facts={**facts, "tvm_err": None, "tvm_lsb": None, "latency_ms": None, "executed": {}})


class Lower:
    """The target's backend builds its artifact (``Backend.lower``); an artifact other than the
    QDQ file is checked against the graph on the same inputs (``<backend>_err``)."""

    name = "lower"

    def describe(self, run: Run) -> str:
        from fliqs_compiler.backends.registry import backend_for
        t = run.request.target
        files = ", ".join(backend_for(t).artifacts(t).values()) or "the QDQ model itself"
        return f"{backend_for(t).name} backend for {t.text}: {files}"

    def run(self, run: Run) -> None:
        from fliqs_compiler.backends.registry import backend_for
        p, target = run.point, run.request.target
        artifact = backend_for(target).lower(p.values["fixed"], target, run.staging(), p.values["onnx_path"])
        p.values["artifact"] = artifact
        facts = p.values["facts"]
        facts["executed"] = dict(artifact.executed or {})
        if artifact.run is not None and artifact.path != p.values["onnx_path"]:
            from fliqs_compiler.backends.ort_backend import check_artifact
            inputs = p.values["inputs"]
            ran = artifact.run_many(inputs)  # one call: a remote device gets one upload for all
            name = backend_for(target).name
            check = check_artifact(p.values["fixed"], f"{name} artifact {artifact.path.name}", inputs, ran,
                                   reference=p.values.get("reference"))
            facts[f"{name}_err"], facts[f"{name}_lsb"] = check["err"], check["lsb"]


class Measure:
    """The whole model's latency on the target (``Backend.measure_model``)."""

    name = "measure"

    def describe(self, run: Run) -> str:
        return f"model latency on {run.request.target.text}"

    def run(self, run: Run) -> None:
        from fliqs_compiler.backends.registry import backend_for
        p = run.point
        ms = backend_for(run.request.target).measure_model(p.values["artifact"], p.values["inputs"][0])
        p.values["facts"]["latency_ms"] = None if ms is None else float(ms)


class Report:
    """config.json, report.json/.md and the plots into the staging folder (published with the
    artifacts when the point succeeded)."""

    name = "report"

    def describe(self, run: Run) -> str:
        return "config.json, report.json, report.md, formats.png"

    def run(self, run: Run) -> None:
        from fliqs_compiler.backends.registry import backend_for
        from fliqs_compiler.ir.config import save_config
        from fliqs_compiler.report import build_report, write_report
        from fliqs_compiler.report.build import artifact_bytes
        r, p = run.request, run.point
        v, target, graph = p.values, r.target, (p.graph if p.graph is not None else run.graph)
        formats = v["formats"]
        table = run.values.get("latency")
        if table is None and r.layer_latency and formats:
            try:
                table = chosen_latency(graph, target, formats, r.progress, tuning=r.tuning)
            except Exception as e:  # noqa: BLE001 — per-layer latency is a nice-to-have
                p.notes.append(f"per-layer latency not measured ({type(e).__name__}: {str(e)[:120]})")
        stage = run.staging()
        backend = backend_for(target)
        files = {"config": "config.json", "onnx": "model.qdq.onnx", "report_md": "report.md",
                 "formats_png": "formats.png", **backend.artifacts(target)}
        if "search" in v:
            sr = v["search"]
            search_info = {"steps": r.steps, "seed": r.seed, "decisions": graph.space.num_decisions,
                           "seconds": round(p.timing.get("search", 0.0), 2), "resumed": bool(r.resume),
                           "cost": float(sr.cost), "cost_kind": sr.cost_kind, "search_quality": sr.quality,
                           "final_probabilities": [list(map(float, q)) for q in sr.probabilities],
                           "schedule": sr.schedule, **sr.execution}
            files.update(search_log="search.jsonl", search_png="search.png", checkpoint="checkpoint/")
            budget, value = p.budget, p.value
            save_config(stage / "config.json", graph.name, formats,
                        extra={"target": target.text, "budget": budget.text, "seed": r.seed, "steps": r.steps})
        else:  # lower: a given config, no search
            from fliqs_compiler.cost.budget import parse_budget
            from fliqs_compiler.cost.model import config_cost
            search_info = {"steps": 0, "config": str(r.config)}
            value = float(config_cost(graph, formats, "bops"))
            budget = parse_budget(f"bops={max(value, 1.0)}")
            save_config(stage / "config.json", graph.name, formats,
                        extra={"target": target.text, "source": str(r.config)})
        report = build_report(
            graph=graph, model_name=graph.name, target=target, formats_searched=list(r.formats),
            budget=budget, budget_value=value, formats=formats,
            quality={"metric": run.metric, "metric_reason": run.metric_reason,
                     "float": float(run.q_float), "final": float(v["q_final"]), "split": "held-out"},
            facts=v["facts"], timing=p.timing, latency=table, dataset=run.dataset,
            search_info=search_info, baselines=v.get("baselines", []),
            notes=p.notes + [f"{name} kept in float: {why}" for name, why in
                             graph.meta.get("keep_float_reasons", {}).items()], files=files)
        caps = backend.caps(target)
        report["environment"]["device"] = {
            "where": caps.device, "backend": backend.name, "target": target.tvm_target or target.text,
            "capabilities": caps.as_dict(),
            **({"tracker": f"{target.rpc.host}:{target.rpc.port}", "key": target.rpc.key}
               if target.rpc else {})}
        if "search" not in v:
            report["budget"]["text"] = "given config (no search)"
        report["artifact_bytes"] = artifact_bytes(stage, {k: f for k, f in files.items()
                                                          if k in ("onnx", "tvm")})
        write_report(stage, report)
        v["report"] = report


class SweepSummary:
    """A sweep's table (budget, cost, quality per point), the merged baselines and pareto.png in
    the main point's report."""

    name = "sweep summary"

    def applies(self, run: Run) -> bool:
        return run.request.sweep

    def describe(self, run: Run) -> str:
        return "pareto.png + the sweep table in report.json"

    def run(self, run: Run) -> None:
        from fliqs_compiler.report import write_report
        from fliqs_compiler.report.sweep import add_sweep
        main = run.points[0]
        report = add_sweep(main.values["report"], [(p.out, p.values["report"]) for p in run.points],
                           run.out_dir)
        main.values.setdefault("published", {}).update(write_report(run.out_dir, report))

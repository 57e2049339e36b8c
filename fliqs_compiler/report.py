"""Run reports: ``report.json`` (the public contract, architecture.md), ``report.md`` (for people),
``formats.png`` (per-layer format chart with MACs) and ``pareto.png`` (when a sweep ran).

``write_report(out_dir, report)`` requires a report dict holding every contract field with the
contract's types (``validate_report`` checks it and names what is missing) and guarantees that each
file is written atomically (tmp + ``os.replace``): a reader never sees a half-written file.
``render(out_dir)`` re-renders report.md and the plots from an existing report.json
(``fliqs report DIR``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import FliqsError
from . import atomic

__all__ = ["CONTRACT", "validate_report", "write_report", "render", "render_markdown", "build_report",
           "layer_rows", "environment", "print_summary",
           "plot_formats", "plot_pareto", "atomic_write_text", "atomic_write_bytes"]

# ---- the contract (architecture.md "report.json"), as data -------------------------------------
NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
CONTRACT = {
    "model": str, "target": str, "formats": [str], "budget": {"kind": str, "value": NUM},
    "layers": [{"node": str, "op": str, "macs": int, "params": int, "format_w": str,
                "format_a": str, "bops": int, "latency_ms": OPT_NUM, "executed_dtype": OPT_STR}],
    "totals": {"bops": int, "float_bops": int, "size_bytes": int, "latency_ms": OPT_NUM},
    "quality": {"metric": str, "float": NUM, "final": NUM},
    "baselines": [{"name": str, "bops": int, "quality": NUM, "latency_ms": OPT_NUM}],
    # onnxruntime_max_abs_err: a DEFAULT onnxruntime.InferenceSession(path) (what users run) vs
    # the quantized torch graph. Extra fields written by build_report: onnxruntime_exact_max_abs_err
    # (our exact session), onnxruntime_default_lsb (the default session's max |err| in output
    # LSBs, ort_backend.output_steps), numerics_inputs (what the checks ran on).
    "numerics": {"onnxruntime_max_abs_err": OPT_NUM, "tvm_max_abs_err": OPT_NUM},
    "timing_s": {"import": NUM, "passes": NUM, "search": NUM, "export": NUM, "lower": NUM},
    "environment": {"threads": int, "torch": str, "tvm": str, "onnxruntime": str, "cpu": str},
}


def _check(value, spec, where: str, problems: list) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{where}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) or not isinstance(value, types):
            names = "|".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append(f"{where}: expected {names}, got {type(value).__name__}")


def validate_report(report: dict) -> list:
    """Every contract field present with its type → ``[]``; else a list of problems
    (``"report.totals.bops: missing"``, ...). Extra fields are allowed."""
    problems: list = []
    _check(report, CONTRACT, "report", problems)
    return problems


# ---- atomic files ------------------------------------------------------------------------------
atomic_write_bytes = atomic.write_bytes
atomic_write_text = atomic.write_text


def _savefig_atomic(fig, path: Path) -> Path:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# ---- human-readable numbers --------------------------------------------------------------------
def _si(x: Optional[float], unit: str = "") -> str:
    if x is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {suffix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _bytes(x: Optional[float]) -> str:
    if x is None:
        return "—"
    for div, suffix in ((2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if x >= div:
            return f"{x / div:.3g} {suffix}"
    return f"{int(x)} B"


def _ms(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.4g} ms"


def _q(x: Optional[float], metric: str) -> str:
    if x is None:
        return "—"
    return f"{x * 100:.2f} %" if metric in ("accuracy", "agreement") else f"{x:.4g}"


def _budget_text(budget: dict) -> str:
    asked = budget.get("text") or f"{budget['kind']}={budget['value']}"
    return asked


def _achieved(report: dict) -> tuple:
    """(asked value, achieved value, formatter) in the budget's kind."""
    kind = report["budget"]["kind"]
    totals = report["totals"]
    achieved = {"bops": totals["bops"], "size": totals["size_bytes"],
                "latency": totals.get("searched_latency_ms", totals["latency_ms"])}.get(kind)
    fmt = {"bops": lambda v: _si(v, "BOPs"), "size": _bytes, "latency": _ms}.get(kind, str)
    return report["budget"]["value"], achieved, fmt


def _executed(layer: dict) -> str:
    dtype = layer.get("executed_dtype")
    if not dtype:
        return "—"
    kernel = layer.get("kernel")
    return f"{dtype} ({kernel})" if kernel and kernel not in dtype else dtype


# ---- report.md ---------------------------------------------------------------------------------
def render_markdown(report: dict) -> str:
    """The report for people: what was searched, budget vs achieved, quality, latency, per-layer
    formats with realized precision, baselines, numerics checks, timing and environment."""
    r = report
    metric = r["quality"]["metric"]
    asked, achieved, fmt = _achieved(r)
    lines = [f"# fliqs report: {r['model']}", ""]
    lines += ["## Summary", "", "| | |", "|---|---|",
              f"| target | `{r['target']}` |",
              f"| candidate formats | {', '.join(r['formats'])} |",
              f"| budget asked | `{_budget_text(r['budget'])}` = {fmt(asked)} |",
              f"| budget achieved{' (latency table, searched layers)' if r['budget']['kind'] == 'latency' else ''} | {fmt(achieved)}"
              + (f" ({achieved / asked:.2f}× the budget)" if achieved is not None and asked else "")
              + " |",
              f"| quality ({metric}) | float {_q(r['quality']['float'], metric)} → final "
              f"{_q(r['quality']['final'], metric)} |",
              f"| BOPs (searched layers) | {_si(r['totals']['bops'])} |",
              f"| BOPs (layers kept in float) | {_si(r['totals']['float_bops'])} |",
              f"| weight size (searched layers) | {_bytes(r['totals']['size_bytes'])} |",
              f"| measured latency (whole model) | {_ms(r['totals']['latency_ms'])} |"]
    search = r.get("search") or {}
    data = r.get("data") or {}
    if search or data:
        lines += ["", "## What was searched", ""]
        if data:
            lines.append(f"- data: {data.get('description', data.get('spec', '?'))}; "
                         f"{data.get('train', '?')} examples for training the shared weights, "
                         f"{data.get('holdout', '?')} held out "
                         f"({100 * data.get('holdout_fraction', 0):.0f} %) to measure quality"
                         + ("; no labels: the float model is the teacher" if data.get("labels") is False
                            else ""))
        if search:
            lines.append(f"- FLIQS one-shot search: {search.get('steps', '?')} steps, "
                         f"{search.get('decisions', '?')} decisions, seed {search.get('seed', '?')}, "
                         f"{search.get('seconds', 0):.1f} s")
            sched = search.get("schedule") or {}
            if sched:
                lines.append(f"- schedule: {sched.get('warmup_steps', '?')} warmup steps "
                             f"({sched.get('warmup_sampling', '?')}), {sched.get('search_steps', '?')} "
                             f"policy steps, final stretch {sched.get('final_stretch_steps', '?')} steps; "
                             f"the last {sched.get('final_config_trained_steps', '?')} steps trained "
                             f"exactly the returned configuration; budget projection moved "
                             f"{sched.get('projection_moves', 0)} decision(s) (`search.png`)")
            sq = search.get("search_quality") or {}
            if "final_finetuned" in sq:
                metric = sq.get("metric", "")
                lines.append(f"- without retraining (the FLIQS result): {_q(sq['final'], metric)}; "
                             f"after {sq.get('finetune_steps', '?')} fine-tuning steps under the "
                             f"found configuration (`--finetune`): "
                             f"{_q(sq['final_finetuned'], metric)} "
                             "(the exported model carries the fine-tuned weights)")
    lines += ["", "## Layers", "",
              "| layer | op | MACs | params | weight | activation | BOPs | latency | executed |",
              "|---|---|---:|---:|---|---|---:|---:|---|"]
    for layer in r["layers"]:
        lines.append(f"| `{layer['node']}` | {layer['op']} | {_si(layer['macs'])} | "
                     f"{_si(layer['params'])} | {layer['format_w']} | {layer['format_a']} | "
                     f"{_si(layer['bops'])} | {_ms(layer['latency_ms'])} | "
                     f"{_executed(layer)} |")
    if r["baselines"]:
        lines += ["", "## Baselines (same graph, data and budget)", "",
                  f"| method | BOPs | {metric} | latency |", "|---|---:|---:|---:|",
                  f"| **fliqs** | {_si(r['totals']['bops'])} | {_q(r['quality']['final'], metric)} "
                  f"| {_ms(r['totals']['latency_ms'])} |"]
        for b in r["baselines"]:
            lines.append(f"| {b['name']} | {_si(b['bops'])} | {_q(b['quality'], metric)} | "
                         f"{_ms(b['latency_ms'])} |")
    if r.get("sweep"):
        lines += ["", "## Sweep", "", f"| budget | BOPs | {metric} | latency | folder |",
                  "|---|---:|---:|---:|---|"]
        for p in r["sweep"]:
            lines.append(f"| `{p['budget']}` | {_si(p['bops'])} | {_q(p['quality'], metric)} | "
                         f"{_ms(p.get('latency_ms'))} | `{p.get('dir', '')}` |")
    n = r["numerics"]

    def num(key, spec=".3g"):
        return "—" if n.get(key) is None else format(n[key], spec)
    lines += ["", "## Numerics", "",
              f"- onnxruntime (model.qdq.onnx, default session) vs the quantized torch graph: "
              f"max |err| {num('onnxruntime_max_abs_err')} ({num('onnxruntime_default_lsb', '.2f')} "
              f"output LSB); exact session {num('onnxruntime_exact_max_abs_err')}",
              f"- TVM (tvm/model.so) vs the quantized torch graph: max |err| {num('tvm_max_abs_err')}"]
    if n.get("numerics_inputs"):
        lines.append(f"- checked on: {n['numerics_inputs']}")
    for note in r.get("notes") or []:
        lines.append(f"- note: {note}")
    t = r["timing_s"]
    lines += ["", "## Timing (s)", "", "| " + " | ".join(t) + " |",
              "|" + "---:|" * len(t), "| " + " | ".join(f"{v:.1f}" for v in t.values()) + " |"]
    e = r["environment"]
    lines += ["", "## Environment", "",
              f"{e['cpu']}; {e['threads']} threads; torch {e['torch']}, onnxruntime "
              f"{e['onnxruntime']}, tvm {e['tvm']}."]
    files = r.get("files") or {}
    if files:
        lines += ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in files.items()]
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------
def _format_colors(names: list) -> dict:
    """A stable colour per format: ordered by cost bits (cheap = warm, float = grey)."""
    from matplotlib import colormaps

    from . import formats as F

    def bits(n):
        try:
            return F.get(n).cost_bits
        except KeyError:
            return 64.0
    ordered = sorted(set(names), key=lambda n: (bits(n), n))
    cmap = colormaps["viridis"]
    quantized = [n for n in ordered if n != "float"]
    colors = {n: cmap(0.1 + 0.8 * i / max(1, len(quantized) - 1)) for i, n in enumerate(quantized)}
    colors["float"] = (0.75, 0.75, 0.75, 1.0)
    return colors


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def plot_formats(report: dict, path) -> Path:
    """``formats.png``: per layer (x, network order) the MACs (bar, log scale, coloured by weight
    format) and two rows of cells naming the weight and activation formats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = report["layers"]
    n = max(1, len(layers))
    names = [layer["format_w"] for layer in layers] + [layer["format_a"] for layer in layers]
    colors = _format_colors(names or ["float"])
    fig, (ax_m, ax_f) = plt.subplots(2, 1, figsize=(max(6.0, 0.7 * n + 2), 5.2), sharex=True,
                                     gridspec_kw={"height_ratios": [2.2, 1]})
    xs = list(range(len(layers)))
    ax_m.bar(xs, [max(1, layer["macs"]) for layer in layers],
             color=[colors[layer["format_w"]] for layer in layers], edgecolor="black", linewidth=0.5)
    ax_m.set_yscale("log")
    ax_m.set_ylabel("MACs")
    ax_m.set_title(f"{report['model']}: chosen formats per layer "
                   f"(budget {_budget_text(report['budget'])})")
    for row, key in ((1, "format_w"), (0, "format_a")):
        for x, layer in zip(xs, layers):
            ax_f.add_patch(plt.Rectangle((x - 0.45, row - 0.45), 0.9, 0.9,
                                         color=colors[layer[key]], ec="black", lw=0.5))
            ax_f.text(x, row, layer[key].replace("_", "\n"), ha="center", va="center", fontsize=7)
    ax_f.set_ylim(-0.6, 1.6)
    ax_f.set_yticks([0, 1], ["activation", "weight"])
    ax_f.set_xlim(-0.6, n - 0.4)
    ax_f.set_xticks(xs, [_short(layer["node"]) for layer in layers], rotation=45, ha="right",
                    fontsize=7)
    ax_m.legend(handles=[Patch(color=c, label=k) for k, c in colors.items() if k in names],
                loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="format")
    fig.tight_layout()
    try:
        return _savefig_atomic(fig, Path(path))
    finally:
        plt.close(fig)


def plot_pareto(report: dict, path) -> Path:
    """``pareto.png``: quality vs searched-layer BOPs of each sweep point (FLIQS, connected), the
    baselines of every point (``sweep_baselines``, else ``baselines``; markers) and the float
    model (dashed line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["quality"]["metric"]
    scale = 100.0 if metric in ("accuracy", "agreement") else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = sorted(report.get("sweep") or [], key=lambda p: p["bops"])
    every = [p["bops"] for p in pts] + [b["bops"] for b in report.get("sweep_baselines")
                                        or report.get("baselines") or []]
    div, unit = next(((d, u) for d, u in ((1e9, "GBOPs"), (1e6, "MBOPs"), (1e3, "kBOPs"))
                      if max(every, default=0) >= d), (1.0, "BOPs"))
    if pts:
        ax.plot([p["bops"] / div for p in pts], [p["quality"] * scale for p in pts], "o-",
                color="tab:blue", label="FLIQS", zorder=3)
        for p in pts:
            ax.annotate(p["budget"], (p["bops"] / div, p["quality"] * scale), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
    markers = iter("s^vDP*Xh<>")
    by_name: dict = {}
    for b in report.get("sweep_baselines") or report.get("baselines") or []:
        by_name.setdefault(b["name"], []).append(b)
    for i, (name, bs) in enumerate(by_name.items()):
        ax.scatter([b["bops"] / div for b in bs], [b["quality"] * scale for b in bs],
                   marker=next(markers, "o"), color=f"C{(i + 1) % 10}", label=name, zorder=2)
    ax.axhline(report["quality"]["float"] * scale, color="grey", ls="--", lw=1, label="float")
    ax.set_xlabel(f"{unit} (searched layers)")
    ax.set_ylabel(f"{metric}" + (" (%)" if scale == 100.0 else ""))
    ax.set_title(f"{report['model']} on {report['target']}: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _savefig_atomic(fig, Path(path))
    finally:
        plt.close(fig)


# ---- assembling report.json and the console summary (api.py calls these) ---------------------------
def environment() -> dict:
    """Threads and library versions for ``report.json`` (``environment``)."""
    import onnxruntime
    import torch
    try:
        from importlib.metadata import version
        tvm_version = version("apache-tvm")
    except Exception:  # noqa: BLE001
        tvm_version = "unavailable"
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"threads": int(torch.get_num_threads()), "torch": torch.__version__, "tvm": tvm_version,
            "onnxruntime": onnxruntime.__version__, "cpu": cpu}


def layer_rows(graph, formats: dict, latency, executed: dict) -> list:
    """One ``report.json`` layer row per quantizable layer (keep-float layers included)."""
    from . import formats as F
    from .cost import layer_bops
    rows = []
    for layer in graph.layers.values():
        entry = formats.get(layer.name) or {}
        fw = F.get(entry.get("weight", "float")).name
        fa = F.get(entry.get("activation", entry.get("weight", "float"))).name
        ms = None
        if latency is not None and not layer.keep_float:
            try:
                ms = float(latency.layer_ms(layer, fw, fa))
            except Exception:  # noqa: BLE001 — a pair the table has no entry for
                ms = None
        ex = executed.get(layer.name) or {}
        rows.append({"node": layer.name, "op": layer.op, "macs": int(layer.macs),
                     "params": int(layer.params), "format_w": fw, "format_a": fa,
                     "bops": int(layer_bops(layer, fw, fa)), "latency_ms": ms,
                     "executed_dtype": ex.get("dtype") if isinstance(ex, dict) else str(ex),
                     "kernel": ex.get("kernel") if isinstance(ex, dict) else None,
                     "keep_float": bool(layer.keep_float), "group": layer.group})
    return rows


def build_report(*, graph, model_name: str, target, formats_searched: list, budget, budget_value,
                  formats: dict, quality: dict, facts: dict, timing: dict, latency, dataset,
                  search_info: dict, baselines: list, notes: list, files: dict) -> dict:
    """The report.json dict: every contract field (architecture.md) plus context (data split,
    search facts, notes, files). ``totals.bops``/``size_bytes`` count the searched layers (what a
    budget constrains); ``float_bops``/``float_size_bytes`` the layers kept in float."""
    from .cost import config_cost, float_bops
    layers = layer_rows(graph, formats, latency, facts.get("executed") or {})
    searched_ms = None
    if latency is not None:
        try:
            searched_ms = float(config_cost(graph, formats, "latency", latency))
        except Exception:  # noqa: BLE001
            searched_ms = None
    n_train, n_val = len(dataset.x_train), len(dataset.x_val)
    timing_s = {k: round(float(timing.get(k, 0.0)), 3) for k in ("import", "passes", "search", "export", "lower")}
    timing_s.update({k: round(float(v), 3) for k, v in timing.items() if k not in timing_s})
    return {
        "model": model_name, "target": str(target.text), "formats": list(formats_searched),
        "budget": {"kind": budget.kind, "value": float(budget_value), "text": budget.text,
                   "relative": bool(budget.relative)},
        "layers": layers,
        "totals": {"bops": int(config_cost(graph, formats, "bops")), "float_bops": int(float_bops(graph)),
                   "size_bytes": int(config_cost(graph, formats, "size")),
                   "latency_ms": facts.get("latency_ms"), "searched_latency_ms": searched_ms,
                   "float_size_bytes": int(sum(4 * la.params for la in graph.layers.values()
                                               if la.keep_float))},
        "quality": quality,
        "baselines": baselines,
        "numerics": {"onnxruntime_max_abs_err": facts.get("ort_err"),
                     "onnxruntime_exact_max_abs_err": facts.get("ort_exact_err"),
                     "onnxruntime_default_lsb": facts.get("ort_default_lsb"),
                     "tvm_max_abs_err": facts.get("tvm_err"),
                     "numerics_inputs": facts.get("numerics_inputs")},
        "timing_s": timing_s,
        "environment": environment(),
        "data": {"description": dataset.description, "labels": dataset.y_val is not None,
                 "train": n_train, "holdout": n_val,
                 "holdout_fraction": round(n_val / max(1, n_train + n_val), 4),
                 "quality_examples": len(dataset.x_test),
                 "quality_split": "validation" if dataset.x_test is dataset.x_val else "test"},
        "search": search_info,
        "notes": notes,
        "files": files,
    }


def print_summary(report: dict, out: Path, command: str = "compile") -> None:
    """The final summary table on stderr: budget asked vs achieved, quality, BOPs, size, latency,
    numerics, where the artifacts are."""
    from rich.console import Console
    from rich.table import Table

    from .budget import format_cost
    r = report
    kind = r["budget"]["kind"]
    achieved = {"bops": r["totals"]["bops"], "size": r["totals"]["size_bytes"],
                "latency": r["totals"].get("searched_latency_ms")}.get(kind)
    metric = r["quality"]["metric"]

    def q(v):
        return f"{100 * v:.2f} %" if metric in ("accuracy", "agreement") else f"{v:.4g}"
    t = Table(title=f"fliqs {command}: {r['model']} → {r['target']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("budget asked", f"{r['budget']['text']} = {format_cost(kind, r['budget']['value'])}")
    t.add_row("budget achieved" + (" (latency table)" if kind == "latency" else ""),
              "—" if achieved is None else format_cost(kind, achieved))
    t.add_row(f"quality ({metric})", f"float {q(r['quality']['float'])} → final {q(r['quality']['final'])}")
    t.add_row("BOPs (searched / float layers)",
              f"{format_cost('bops', r['totals']['bops'])} / {format_cost('bops', r['totals']['float_bops'])}")
    t.add_row("weight size (searched layers)", format_cost("size", r["totals"]["size_bytes"]))
    lat = r["totals"]["latency_ms"]
    t.add_row("measured latency", "—" if lat is None else f"{lat:.4g} ms ({r['environment']['threads']} threads)")
    n = r["numerics"]
    t.add_row("max |err| ORT (default session) / TVM",
              " / ".join("—" if v is None else f"{v:.3g}"
                         for v in (n["onnxruntime_max_abs_err"], n["tvm_max_abs_err"]))
              + ("" if n.get("onnxruntime_default_lsb") is None
                 else f" (ORT {n['onnxruntime_default_lsb']:.2f} output LSB)"))
    if r.get("sweep"):
        t.add_row("sweep", ", ".join(f"{p['budget']}: {q(p['quality'])}" for p in r["sweep"]))
    t.add_row("artifacts", str(out))
    t.add_row("report", str(out / "report.md"))
    Console(stderr=True).print(t)


# ---- entry points ------------------------------------------------------------------------------
def write_report(out_dir, report: dict) -> dict:
    """Validate ``report`` and write report.json, report.md, formats.png (and pareto.png when
    ``report["sweep"]`` has points) into ``out_dir``. Returns ``{file name: Path}``.

    Raises ValueError (a programming error, not user input) when a contract field is missing."""
    problems = validate_report(report)
    if problems:
        raise ValueError("report does not meet the report.json contract: " + "; ".join(problems[:5]))
    out = Path(out_dir)
    paths = {"report.json": atomic_write_text(out / "report.json",
                                              json.dumps(report, indent=2, default=str) + "\n")}
    paths.update(render(out, report))
    return paths


def render(out_dir, report: Optional[dict] = None) -> dict:
    """(Re-)render report.md, formats.png and pareto.png from ``report`` or ``out_dir/report.json``.

    A missing or unreadable report.json, or one that breaks the contract, is a FliqsError."""
    out = Path(out_dir)
    if report is None:
        src = out / "report.json"
        if not src.is_file():
            raise FliqsError(f"{src}: no report.json here; pass the --out folder of a finished "
                             "'fliqs compile' or 'fliqs lower' run")
        try:
            report = json.loads(src.read_text())
        except (OSError, ValueError) as e:
            raise FliqsError(f"{src}: not readable JSON ({e}); rerun 'fliqs compile' to "
                             "regenerate it") from None
        problems = validate_report(report)
        if problems:
            raise FliqsError(f"{src}: not a fliqs report ({problems[0]}); rerun 'fliqs compile' "
                             "to regenerate it")
    paths = {"report.md": atomic_write_text(out / "report.md", render_markdown(report)),
             "formats.png": plot_formats(report, out / "formats.png")}
    if report.get("sweep"):
        paths["pareto.png"] = plot_pareto(report, out / "pareto.png")
    return paths

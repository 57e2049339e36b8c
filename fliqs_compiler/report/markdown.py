"""``report.md``, the report for people: one function per section, each taking the report.json
dict and returning its lines (an empty list when the section has nothing to say)."""
from __future__ import annotations

from fliqs_compiler.report.text import (MISSING, budget_achieved, budget_text, executed, ms,
                                        quality, si, size_bytes)

__all__ = ["render_markdown"]


def _summary(r: dict) -> list:
    metric = r["quality"]["metric"]
    asked, achieved, fmt = budget_achieved(r)
    how = " (latency table, searched layers)" if r["budget"]["kind"] == "latency" else ""
    ratio = f" ({achieved / asked:.2f}× the budget)" if achieved is not None and asked else ""
    return ["## Summary", "", "| | |", "|---|---|",
            f"| target | `{r['target']}` |",
            f"| candidate formats | {', '.join(r['formats'])} |",
            f"| budget asked | `{budget_text(r['budget'])}` = {fmt(asked)} |",
            f"| budget achieved{how} | {fmt(achieved)}{ratio} |",
            f"| quality ({metric}) | float {quality(r['quality']['float'], metric)} → final "
            f"{quality(r['quality']['final'], metric)} |",
            *([f"| quality metric | `{metric}`: {r['quality']['metric_reason']} |"]
              if r["quality"].get("metric_reason") else []),
            f"| BOPs (searched layers) | {si(r['totals']['bops'])} |",
            f"| BOPs (layers kept in float) | {si(r['totals']['float_bops'])} |",
            f"| weight size (searched layers) | {size_bytes(r['totals']['size_bytes'])} |",
            *[f"| artifact `{r['files'][key]}` | {size_bytes(n)} |"
              for key, n in (r.get("artifact_bytes") or {}).items() if key in r.get("files", {})],
            f"| measured latency (whole model) | {ms(r['totals']['latency_ms'])} |"]


def _data_line(data: dict) -> str:
    teacher = "; no labels: the float model is the teacher" if data.get("labels") is False else ""
    return (f"- data: {data.get('description', data.get('spec', '?'))}; "
            f"{data.get('train', '?')} examples for training the shared weights, "
            f"{data.get('holdout', '?')} held out "
            f"({100 * data.get('holdout_fraction', 0):.0f} %) to measure quality{teacher}")


def _schedule_line(sched: dict) -> str:
    return (f"- schedule: {sched.get('warmup_steps', '?')} warmup steps "
            f"({sched.get('warmup_sampling', '?')}), {sched.get('search_steps', '?')} "
            f"policy steps, final stretch {sched.get('final_stretch_steps', '?')} steps; "
            f"the last {sched.get('final_config_trained_steps', '?')} steps trained "
            f"exactly the returned configuration; budget projection moved "
            f"{sched.get('projection_moves', 0)} decision(s) (`search.png`)"
            + _prior_clause(sched.get("prior")))


def _prior_clause(prior) -> str:
    if not prior:
        return ""
    if prior.get("choice") is None:
        return f"; sensitivity prior: no budgeted ILP solution ({prior.get('message')}), uniform start"
    return (f"; the policy started from the sensitivity + ILP choice ({prior.get('evaluations')} "
            f"forward passes of {prior.get('samples')} held-out samples, charged as "
            f"{prior.get('charged_steps')} weight steps)")


def _finetune_line(sq: dict) -> str:
    metric = sq.get("metric", "")
    return (f"- without retraining (the FLIQS result): {quality(sq['final'], metric)}; "
            f"after {sq.get('finetune_steps', '?')} fine-tuning steps under the "
            f"found configuration (`--finetune`): "
            f"{quality(sq['final_finetuned'], metric)} "
            "(the exported model carries the fine-tuned weights)")


def _searched(r: dict) -> list:
    search = r.get("search") or {}
    data = r.get("data") or {}
    if not (search or data):
        return []
    lines = ["", "## What was searched", ""]
    if data:
        lines.append(_data_line(data))
    if search:
        lines.append(f"- FLIQS one-shot search: {search.get('steps', '?')} steps, "
                     f"{search.get('decisions', '?')} decisions, seed {search.get('seed', '?')}, "
                     f"{search.get('seconds', 0):.1f} s")
        if search.get("schedule"):
            lines.append(_schedule_line(search["schedule"]))
        sq = search.get("search_quality") or {}
        if "final_finetuned" in sq:
            lines.append(_finetune_line(sq))
    return lines


def _layers(r: dict) -> list:
    lines = ["", "## Layers", "",
             "| layer | op | MACs | params | weight | activation | BOPs | latency | executed |",
             "|---|---|---:|---:|---|---|---:|---:|---|"]
    for layer in r["layers"]:
        lines.append(f"| `{layer['node']}` | {layer['op']} | {si(layer['macs'])} | "
                     f"{si(layer['params'])} | {layer['format_w']} | {layer['format_a']} | "
                     f"{si(layer['bops'])} | {ms(layer['latency_ms'])} | "
                     f"{executed(layer)} |")
    return lines


def _baselines(r: dict) -> list:
    if not r["baselines"]:
        return []
    metric = r["quality"]["metric"]
    lines = ["", "## Baselines (same graph, data and budget)", "",
             f"| method | BOPs | {metric} | latency |", "|---|---:|---:|---:|",
             f"| **fliqs** | {si(r['totals']['bops'])} | {quality(r['quality']['final'], metric)} "
             f"| {ms(r['totals']['latency_ms'])} |"]
    for b in r["baselines"]:
        lines.append(f"| {b['name']} | {si(b['bops'])} | {quality(b['quality'], metric)} | "
                     f"{ms(b['latency_ms'])} |")
    return lines


def _sweep(r: dict) -> list:
    if not r.get("sweep"):
        return []
    metric = r["quality"]["metric"]
    lines = ["", "## Sweep", "", f"| budget | BOPs | {metric} | latency | folder |",
             "|---|---:|---:|---:|---|"]
    for p in r["sweep"]:
        lines.append(f"| `{p['budget']}` | {si(p['bops'])} | {quality(p['quality'], metric)} | "
                     f"{ms(p.get('latency_ms'))} | `{p.get('dir', '')}` |")
    return lines


def _numerics(r: dict) -> list:
    n = r["numerics"]

    def num(key, spec=".3g"):
        return MISSING if n.get(key) is None else format(n[key], spec)
    lines = ["", "## Numerics", "",
             f"- onnxruntime (model.qdq.onnx, default session) vs the quantized torch graph: "
             f"max |err| {num('onnxruntime_max_abs_err')} ({num('onnxruntime_default_lsb', '.2f')} "
             f"output LSB); exact session {num('onnxruntime_exact_max_abs_err')}",
             f"- TVM (tvm/model.so) vs the quantized torch graph: max |err| {num('tvm_max_abs_err')} "
             f"({num('tvm_lsb', '.2f')} output LSB)"]
    if n.get("numerics_inputs"):
        lines.append(f"- checked on: {n['numerics_inputs']}")
    return lines + [f"- note: {note}" for note in r.get("notes") or []]


def _timing(r: dict) -> list:
    t = r["timing_s"]
    return ["", "## Timing (s)", "", "| " + " | ".join(t) + " |",
            "|" + "---:|" * len(t), "| " + " | ".join(f"{v:.1f}" for v in t.values()) + " |"]


def _environment(r: dict) -> list:
    e = r["environment"]
    return ["", "## Environment", "",
            f"{e['cpu']}; {e['threads']} threads; torch {e['torch']}, onnxruntime "
            f"{e['onnxruntime']}, tvm {e['tvm']}."]


def _files(r: dict) -> list:
    files = r.get("files") or {}
    return ["", "## Files", ""] + [f"- {k}: `{v}`" for k, v in files.items()] if files else []


# report.md, top to bottom
SECTIONS = (_summary, _searched, _layers, _baselines, _sweep, _numerics, _timing, _environment,
            _files)


def render_markdown(report: dict) -> str:
    """The report for people: what was searched, budget vs achieved, quality, latency, per-layer
    formats with realized precision, baselines, numerics checks, timing and environment."""
    lines = [f"# fliqs report: {report['model']}", ""]
    for section in SECTIONS:
        lines += section(report)
    return "\n".join(lines) + "\n"

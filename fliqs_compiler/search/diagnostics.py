"""``search.png``: what a search did, read back from its ``search.jsonl``.

Four panels over the steps — reward (with the controller's baseline), quality, cost / budget and
policy entropy — with the warmup and final-stretch boundaries marked, so a user can see whether
the policy settled and how long the returned configuration was trained. Steps whose reward was
not measured (outside the search phase, between ``monitor_every`` steps) are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

from fliqs_compiler.base.atomic import write_bytes

__all__ = ["read_log", "plot_search"]


def read_log(path) -> list:
    """The records of a ``search.jsonl`` (a torn last line from an interrupted run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _smooth(values: list, width: int) -> list:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot_search(log_path, png_path) -> Path:
    """Write ``png_path`` from the step log at ``log_path``; returns the path."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    width = max(1, len(rows) // 30)
    fig, axes = plt.subplots(4, 1, figsize=(7, 8), sharex=True)
    panels = [("reward", "reward", "baseline"), ("quality", "quality (reward metric)", None),
              ("cost_ratio", "cost / budget", None), ("entropy", "policy entropy (nats)", None)]
    for ax, (key, label, extra) in zip(axes, panels):
        # the reward is measured every step only while the policy learns (``monitor_every``)
        at = [(s, r[key], r.get(extra)) for s, r in zip(steps, rows) if r.get(key) is not None]
        if not at:
            ax.set_ylabel(f"{label}\n(not logged)")
            continue
        xs, values, extras = (list(v) for v in zip(*at))
        ax.plot(xs, values, color="0.75", linewidth=0.6)
        ax.plot(xs, _smooth(values, width), color="C0", label=f"{label} (mean of {width})")
        if extra:
            ax.plot(xs, [float("nan") if v is None else v for v in extras],
                    color="C1", linewidth=1, label=extra)
        if key == "cost_ratio":
            ax.axhline(1.0, color="C3", linestyle=":", label="budget")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best")
    phases = [r.get("phase", "warmup" if r.get("warmup") else "search") for r in rows]
    for name, colour in (("search", "C2"), ("final", "C3")):
        if name in phases:
            x = steps[phases.index(name)]
            for ax in axes:
                ax.axvline(x, color=colour, linestyle="--", linewidth=1)
            axes[0].annotate({"search": "policy learns", "final": "final stretch"}[name], (x, 1.0),
                             xycoords=("data", "axes fraction"), fontsize=7, color=colour,
                             ha="left", va="top")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(Path(png_path), buf.getvalue())

"""The report's plots: ``formats.png`` (per-layer formats with MACs) and ``pareto.png``
(quality vs cost of a sweep and its baselines). Matplotlib runs headless (Agg); each file is
written atomically."""
from __future__ import annotations

import io
from pathlib import Path

from fliqs_compiler.base import atomic
from fliqs_compiler.report.text import budget_text

__all__ = ["plot_formats", "plot_pareto"]


def _savefig_atomic(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic.write_bytes(path, buf.getvalue())


def _format_colors(names: list) -> dict:
    """A stable colour per format: ordered by cost bits (cheap = warm, float = grey)."""
    from matplotlib import colormaps

    from fliqs_compiler.numerics import formats as F

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
                   f"(budget {budget_text(report['budget'])})")
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

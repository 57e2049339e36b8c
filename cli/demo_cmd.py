"""``fliqs demo``: the embedded default, end to end — the bundled digits CNN
(``fliqs_compiler/assets/demo.onnx``) compiled for ``llvm`` on sklearn digits as a short sweep
of tight BOPs budgets, every layer searched (the 1-channel stem and the classifier too: they cost
almost no BOPs but lose most at two bits, which is where a per-layer choice beats one format for
all), with uniform QAT beside every point on ``pareto.png`` and a printed table "FLIQS vs uniform
at the same BOPs"."""
from __future__ import annotations

import click

from fliqs_compiler.cli.common import OneLineCommand, debug_option, handle_errors

DEMO_STEPS = 200
DEMO_FORMATS = "int2,int3,int4,int8"
DEMO_SWEEP = "bops=0.07x,0.1x,0.15x"  # between uniform INT2 (0.0625x) and INT4 (0.25x)
DEMO_PREPARE = {"keep_float_first": False, "keep_float_last": False}


def versus_uniform(report: dict) -> list:
    """Per sweep point: (budget, FLIQS quality, FLIQS BOPs, best uniform that fits, its quality,
    its BOPs) — the uniform format is the most accurate one whose BOPs fit the point's budget."""
    from fliqs_compiler.cost.budget import meets_budget
    uniform = [b for b in report.get("sweep_baselines") or [] if b.get("method") == "uniform"]
    rows = []
    for p in report.get("sweep") or []:
        fits = [b for b in uniform if meets_budget(b["bops"], p["budget_value"])]
        best = max(fits, key=lambda b: b["quality"], default=None)
        rows.append((p["budget"], p["quality"], p["bops"], best["name"] if best else "none fits",
                     best["quality"] if best else None, best["bops"] if best else None))
    return rows


def _table(rows: list, metric: str) -> str:
    pct = (lambda q: "–" if q is None else f"{100 * q:.2f} %")
    lines = [f"{'budget':>12s}  {'FLIQS ' + metric:>16s} {'MBOPs':>7s}   {'best uniform that fits':>22s} "
             f"{metric:>9s} {'MBOPs':>7s}"]
    for budget, q, bops, name, uq, ubops in rows:
        lines.append(f"{budget:>12s}  {pct(q):>16s} {bops / 1e6:7.3f}   {name:>22s} {pct(uq):>9s} "
                     f"{'' if ubops is None else f'{ubops / 1e6:7.3f}'}")
    return "\n".join(lines)


@click.command("demo", cls=OneLineCommand)
@click.option("--out", metavar="DIR", default="fliqs-out/demo", show_default=True, help="Output folder.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@debug_option
@handle_errors
def demo(out, quiet):
    """Compile the bundled digits CNN for the host CPU (llvm) on sklearn digits: a sweep of tight
    BOPs budgets, FLIQS against uniform QAT at the same cost, end to end."""
    from fliqs_compiler.driver import api
    result = api.compile(api.DEMO_MODEL, target="llvm", data="digits", steps=DEMO_STEPS, out=out,
                         formats=DEMO_FORMATS, sweep=DEMO_SWEEP, baselines="uniform",
                         prepare_options=DEMO_PREPARE, progress=not quiet)
    q = result.report["quality"]
    click.echo(f"\nFLIQS vs uniform at the same BOPs (float {q['metric']} {100 * q['float']:.2f} %, "
               f"{DEMO_STEPS} steps each, held-out digits):")
    click.echo(_table(versus_uniform(result.report), q["metric"]))
    click.echo(f"demo: plot {result.out_dir / 'pareto.png'}; report: {result.out_dir / 'report.md'}")

"""``fliqs profile``: build or refresh the per-layer latency table of a model on a target."""
from __future__ import annotations

import json

import click

from fliqs_compiler.cli.common import (OneLineCommand, debug_option, handle_errors,
                                       input_shape_option, parse_input_shapes, parse_int,
                                       prepare_options, quantize_inputs_option)


@click.command("profile", cls=OneLineCommand)
@click.argument("model", type=click.Path(path_type=str))
@click.option("--target", metavar="TARGET", help="llvm, a JSON target dict, or ort.")
@click.option("--formats", metavar="LIST", help="Formats to measure (default int4,int8,fp8_e4m3).")
@click.option("--cache-dir", metavar="DIR", help="Latency cache (default ~/.cache/fliqs/latency).")
@click.option("--tune-trials", metavar="N", default="0", show_default=True,
              help="TVM targets: MetaSchedule trials per layer (0: default schedules, fast but "
                   "not representative). The tuning database is kept and reused.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@input_shape_option
@quantize_inputs_option
@click.option("--quiet", is_flag=True, help="No progress display.")
@debug_option
@handle_errors
def profile(model, target, formats, cache_dir, tune_trials, as_json, input_shapes, quantize_inputs,
            quiet):
    """Measure every searched layer of MODEL in every format on TARGET (cached on disk); input-only
    layers (``--quantize-inputs``) cost nothing and are not timed."""
    from fliqs_compiler.cost.model import costed_layers
    from fliqs_compiler.driver import api
    from fliqs_compiler.base.errors import FliqsError
    if not target:
        raise FliqsError("--target is required: use llvm (host CPU via TVM), ort, or a JSON target dict")
    fmts = api.parse_formats(formats)
    options = prepare_options("searched", quantize_inputs=quantize_inputs)
    graph, table = api.profile(model, target=target, formats=fmts, cache_dir=cache_dir,
                               input_shapes=parse_input_shapes(input_shapes) or None,
                               progress=not quiet,
                               tune_trials=parse_int("--tune-trials", tune_trials),
                               prepare_options=options)
    rows = [{"node": layer.name, "op": layer.op,
             **{f: table.layer_ms(layer, f, f) for f in fmts}} for layer in costed_layers(graph)]
    if as_json:
        click.echo(json.dumps({"model": graph.name, "target": target, "unit": "ms", "layers": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"latency (ms, median) of {graph.name} on {target} ({table.backend})")
    for col in ("node", "op", *fmts):
        t.add_column(col)
    for r in rows:
        t.add_row(r["node"], r["op"], *(f"{r[f]:.4g}" for f in fmts))
    Console(width=160).print(t)

"""``fliqs inspect MODEL``: the quantizable nodes of a model (name, op, MACs, params, decision
group) as a table or, with ``--json``, as a stable JSON object (``inspect_json``). ``--verify``
runs the imported graph against onnxruntime on random input and exits 1 when they disagree.
``--quantize-inputs`` lists the LayerNorm / softmax / GELU input layers ``compile`` and ``search``
would add with the same option."""
from __future__ import annotations

import json
from pathlib import Path

import click

from fliqs_compiler.base.errors import CheckFailed, FliqsError

from fliqs_compiler.cli.common import (debug_option, handle_errors, input_shape_option,
                                       parse_input_shapes, prepare_options, quantize_inputs_option)


def _load(model: str, input_shapes: dict):
    """Import MODEL (an ONNX file) into a Graph."""
    import fliqs_compiler as fq
    return fq.load(model, input_shapes=input_shapes or None)


def inspect_json(graph) -> dict:
    """The ``inspect --json`` object for an analyzed graph. This schema is a public contract, so keep
    it exactly: ``model``; ``inputs`` [{name, shape, dtype}]; ``nodes`` [{name, op, macs, params,
    group}]."""
    return {
        "model": graph.name,
        "inputs": [{"name": s.name, "shape": [int(d) for d in s.shape], "dtype": str(s.dtype)}
                   for s in graph.inputs],
        "nodes": [{"name": layer.name, "op": layer.op, "macs": int(layer.macs),
                   "params": int(layer.params), "group": layer.group}
                  for layer in graph.layers.values()],
    }


def _print_table(data: dict, graph) -> None:
    from rich.console import Console
    from rich.table import Table

    ins = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))} {i['dtype']}"
                    for i in data["inputs"])
    table = Table(title=f"{data['model']}  ({ins})")
    for col, just in (("name", "left"), ("op", "left"), ("MACs", "right"),
                      ("params", "right"), ("group", "left")):
        table.add_column(col, justify=just)
    for node in data["nodes"]:
        group = node["group"] or "[dim]float (kept)[/dim]"
        table.add_row(node["name"], node["op"], f"{node['macs']:,}", f"{node['params']:,}",
                      group)
    console = Console(width=160)
    console.print(table)
    macs = sum(n["macs"] for n in data["nodes"])
    searched = sum(n["macs"] for n in data["nodes"] if n["group"])
    console.print(f"{len(data['nodes'])} quantizable nodes, {macs:,} MACs "
                  f"({searched:,} in searched layers), "
                  f"{len(graph.space.decisions) if graph.space else 0} decisions")


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@input_shape_option
@click.option("--verify", is_flag=True,
              help="Run the imported graph against onnxruntime on random input; exit 1 if they "
                   "disagree.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stdout).")
@quantize_inputs_option
@debug_option
@handle_errors
def inspect(model: str, input_shapes, verify: bool, as_json: bool, quantize_inputs: str):
    """Table of the quantizable nodes of MODEL: name (the config.json key), op, MACs, params
    and decision group (empty: kept in float)."""
    from fliqs_compiler.passes import PrepareOptions, analyze

    options = PrepareOptions(**prepare_options("searched", quantize_inputs=quantize_inputs))
    if not Path(model).is_file():
        raise FliqsError(f"{model}: no such model file")
    graph = _load(model, parse_input_shapes(input_shapes))
    verified = None
    if verify:
        from fliqs_compiler.frontends.verify import verify_onnx_import
        ok, max_err = verify_onnx_import(graph, model)
        verified = (ok, max_err)
    analyzed = analyze(graph, options)
    data = inspect_json(analyzed)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_table(data, analyzed)
    if verified is not None:
        ok, max_err = verified
        line = f"verify: max abs error vs onnxruntime {max_err:.3g}"
        click.echo(line + ("" if ok else " — DISAGREES"), err=True)
        if not ok:
            raise CheckFailed(f"{model}: the imported graph disagrees with onnxruntime "
                              f"(max abs error {max_err:.3g}); rerun with --debug and report it")

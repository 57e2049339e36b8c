"""``fliqs formats``: the registry as a table."""
from __future__ import annotations

import json

import click

from fliqs_compiler import formats as F

from .common import debug_option, handle_errors


@click.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@debug_option
@handle_errors
def formats(as_json: bool):
    """List every number format fliqs can search and lower."""
    rows = []
    for name in F.searchable_names():
        f = F.get(name)
        rows.append({
            "name": f.name, "kind": f.kind, "bits": f.bits, "cost_bits": f.cost_bits,
            "ebits": f.ebits, "mbits": f.mbits, "bias": f.bias, "max_finite": f.max_finite,
            "min_subnormal": f.min_subnormal, "inf": f.has_inf, "nan": f.has_nan,
            "block": f.block_size, "onnx_type": f.onnx_type, "dtype": f.np_dtype_name,
            "description": f.description,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fliqs formats")
    for col in ("name", "kind", "bits", "cost_bits", "e/m", "bias", "max_finite", "min_subnormal",
                "inf/nan", "block", "onnx", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["kind"], str(r["bits"]), f"{r['cost_bits']:g}",
            f"{r['ebits']}/{r['mbits']}" if r["kind"] in ("fp", "mx") else "-",
            "-" if r["bias"] is None or r["kind"] == "int" else str(r["bias"]),
            f"{r['max_finite']:g}", f"{r['min_subnormal']:g}",
            f"{'y' if r['inf'] else 'n'}/{'y' if r['nan'] else 'n'}",
            str(r["block"] or "-"), str(r["onnx_type"] or "-"), r["description"])
    Console(width=200).print(table)

"""``fliqs formats``: the registry as a table, with the backends that run each format natively
(``Backend.caps(target).native`` on each backend's default target)."""
from __future__ import annotations

import json

import click

from fliqs_compiler.numerics import formats as F

from fliqs_compiler.cli.common import debug_option, handle_errors


@click.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@debug_option
@handle_errors
def formats(as_json: bool):
    """List every number format fliqs can search and lower."""
    native = _native_roles()
    rows = []
    for name in F.searchable_names():
        f = F.get(name)
        rows.append({
            "name": f.name, "kind": f.kind, "bits": f.bits, "cost_bits": f.cost_bits,
            "ebits": f.ebits, "mbits": f.mbits, "bias": f.bias, "max_finite": f.max_finite,
            "min_subnormal": f.min_subnormal, "inf": f.has_inf, "nan": f.has_nan,
            "block": f.block_size, "onnx_type": f.onnx_type, "dtype": f.np_dtype_name,
            "description": f.description, "native": native.get(f.name, {}),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fliqs formats")
    for col in ("name", "kind", "bits", "cost_bits", "e/m", "bias", "max_finite", "min_subnormal",
                "inf/nan", "block", "onnx", "native (w/a)", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["kind"], str(r["bits"]), f"{r['cost_bits']:g}",
            f"{r['ebits']}/{r['mbits']}" if r["kind"] in ("fp", "mx") else "-",
            "-" if r["bias"] is None or r["kind"] == "int" else str(r["bias"]),
            f"{r['max_finite']:g}", f"{r['min_subnormal']:g}",
            f"{'y' if r['inf'] else 'n'}/{'y' if r['nan'] else 'n'}",
            str(r["block"] or "-"), str(r["onnx_type"] or "-"),
            " ".join(f"{b}:{'/'.join(role[0] for role in roles)}" for b, roles in r["native"].items()) or "-",
            r["description"])
    Console(width=200).print(table)


def _native_roles() -> dict:
    """{format: {backend: [roles it runs natively]}} from each registered backend's capabilities
    on its default target (formats absent run emulated: decoded to float)."""
    from fliqs_compiler.backends import registry
    from fliqs_compiler.backends.targets import parse_target
    out: dict = {}
    for name in registry.names():
        backend = registry.get(name)
        caps = backend.caps(parse_target(backend.default_target))
        for role in ("weight", "activation"):
            for fmt in sorted(caps.native.get(role, ())):
                out.setdefault(fmt, {}).setdefault(name, []).append(role)
    return out

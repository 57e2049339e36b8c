"""``fliqs devices rpc://HOST:PORT``: the devices a TVM RPC tracker has, per key (total, free,
pending requests) and the servers behind them — ``backends.rpc.list_devices`` as a table or JSON."""
from __future__ import annotations

import json
import re

import click

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.cli.common import OneLineCommand, debug_option, handle_errors

_TRACKER_RE = re.compile(r"^(?:rpc://)?(?P<host>[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})(?:/[A-Za-z0-9_.\-]*)?$")


def parse_tracker(text: str) -> tuple:
    """``rpc://HOST:PORT`` (a ``/KEY`` tail and a missing ``rpc://`` are accepted) → (host, port)."""
    m = _TRACKER_RE.match(str(text or "").strip())
    if not m or not (0 < int(m["port"]) < 65536):
        raise FliqsError(f"tracker {text!r}: expected rpc://HOST:PORT with a port in 1..65535, "
                         "e.g. rpc://127.0.0.1:9190")
    return m["host"], int(m["port"])


@click.command("devices", cls=OneLineCommand)
@click.argument("tracker", metavar="rpc://HOST:PORT")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@debug_option
@handle_errors
def devices(tracker: str, as_json: bool):
    """List the devices of a TVM RPC tracker: keys, free/total, pending requests."""
    from fliqs_compiler.backends.rpc import list_devices
    info = list_devices(*parse_tracker(tracker))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"devices at {info['tracker']}")
    for col in ("key", "total", "free", "pending", "servers"):
        table.add_column(col)
    for key, row in sorted(info["keys"].items()):
        servers = " ".join(s["address"] for s in info["servers"] if s["key"] == key)
        table.add_row(key, str(row["total"]), str(row["free"]), str(row["pending"]), servers or "-")
    Console(width=200).print(table)
    if not info["keys"]:
        click.echo("no devices registered; start one with `python -m tvm.exec.rpc_server "
                   f"--tracker {info['tracker']} --key KEY`")

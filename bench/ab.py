"""A/B of one lowering change, in one process: each configuration's graph lowered under each
variant (a context manager that installs it: a kernel registry, a storage rule), then timed in
interleaved rounds so the box's drift hits every variant alike. Shared by ``fp32_kernel.py`` and
``packed_weights.py``."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fliqs_compiler.backends.tvm_lower import lower


def parse_args(doc: str, argv=None, models: dict | None = None):
    """``--rounds`` (default 5) and ``--json``, the A/B benches' options; ``--model`` (default
    the first) when the bench offers ``models``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    if models:
        ap.add_argument("--model", choices=list(models), default=next(iter(models)))
    return ap.parse_args(argv)


def finish(args, rows: list, **extra) -> None:
    """Print the threads and load average; with ``--json``, write them, the rounds, ``rows`` and
    ``extra`` (an anchor's per-round samples)."""
    load = os.getloadavg()
    threads = int(os.environ["TVM_NUM_THREADS"])
    print(f"threads {threads}, load average {load[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "load": load, "rounds": args.rounds,
                                               **extra, "rows": rows}, indent=1))


def lower_variants(graphs: dict, variants: dict, out_root=None) -> dict:
    """``{(config, variant): Lowered}``: ``graphs`` ``{config: Graph}``, ``variants``
    ``{name: () -> context manager}``; with ``out_root``, each artifact is written under
    ``out_root/<config>-<variant>/tvm/model.so``."""
    lows = {}
    for cfg, graph in graphs.items():
        for how, installed in variants.items():
            with installed():
                out = None if out_root is None else f"{out_root}/{cfg}-{how}"
                lows[(cfg, how)] = lower(graph, "llvm", out)
    return lows


def interleaved_ms(lows: dict, x, rounds: int, extra=None) -> tuple:
    """(``{key: [ms per round]}``, ``[extra() per round]``): every lowering timed once per round
    (``Lowered.time_ms``, 10 runs or 100 ms), ``extra`` (an anchor's timer) after them."""
    times = {k: [] for k in lows}
    anchor = []
    for _ in range(rounds):
        for k, low in lows.items():
            times[k].append(low.time_ms([x.numpy()], repeat=10, min_repeat_ms=100))
        if extra is not None:
            anchor.append(extra())
    return times, anchor

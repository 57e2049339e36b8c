"""Where TVM artifacts run and are timed — one interface, two implementations: ``Local`` (this
process) and ``Remote`` (a device behind a TVM RPC tracker, ``rpc://`` targets). The tvm backend
asks ``device_for(target)`` and never branches on where it runs.

Each implementation gives ``run(lowered, input_lists)`` (remote: one upload for every list),
``time_ms(lowered, inputs)`` and ``measure_layer(target, tuning) -> LayerMeasure`` (per-layer
latency tables: on a farm of devices, entries are measured in parallel, one per device at a time,
while the host compiles the next ones: ``_RemoteLayers.measure_many``). MetaSchedule asks the
same object for where its candidates are timed (``tuning_runner(timeout_s)``: a context giving
``LocalRunner`` here, ``RPCRunner`` on the device) and where its database lives
(``tuning_dir(base, target)``: a remote device's records apart, under its key and target, never
mixed with the host's). ``resolve(target)``
completes an ``rpc://`` target with the device's own LLVM target, asked of the device (cached per
tracker and key), so nothing compiled for a device uses the host CPU's features.
"""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from fliqs_compiler.backends.registry import LayerMeasure
from fliqs_compiler.base.errors import FliqsError

__all__ = ["Local", "Remote", "device_for", "resolve", "compile_workers", "pipelined"]


class Local:
    """This process: the compiled module in a local Relax VM."""

    where = "host"

    def run(self, lowered, input_lists) -> list:
        return [lowered.run(x) for x in input_lists]

    def time_ms(self, lowered, inputs) -> float:
        return float(lowered.time_ms(inputs))

    def measure_layer(self, target, tuning, layout: str = "NCHW") -> LayerMeasure:
        from fliqs_compiler.backends.tvm_measure import measure_fn
        return LayerMeasure(_table_name(tuning, layout), measure_fn(target, tuning, layout))

    def tuning_runner(self, timeout_s: float):
        """MetaSchedule's ``LocalRunner``: candidates timed in a worker process on this host."""
        return _local_runner(timeout_s)

    def tuning_dir(self, base, target) -> Path:
        """The tuning database folder: ``base`` itself (records are matched by target)."""
        return Path(base)

    def describe(self, target) -> dict:
        return {"where": self.where}


class Remote:
    """A device under ``target.rpc.key`` at the tracker ``target.rpc``: libraries built here for
    the device's target are uploaded, run and timed there (``backends.rpc``)."""

    where = "rpc"

    def __init__(self, address):
        self.address = address

    def _lease(self):
        from fliqs_compiler.backends.rpc import request_device
        a = self.address
        return request_device(a.host, a.port, a.key, a.priority, timeout=a.timeout, wait=a.timeout)

    def _on_a_device(self, fn, *args):
        """``fn(*args, session)`` on one leased device, handed back afterwards."""
        lease = self._lease()
        try:
            return fn(*args, lease.session)
        finally:
            lease.close()

    def run(self, lowered, input_lists) -> list:
        from fliqs_compiler.backends.rpc import run_remote
        return self._on_a_device(run_remote, lowered.path, input_lists)

    def time_ms(self, lowered, inputs) -> float:
        from fliqs_compiler.backends.rpc import time_remote
        return self._on_a_device(time_remote, lowered.path, inputs)

    def devices(self) -> int:
        from fliqs_compiler.backends.rpc import list_devices
        a = self.address
        return max(1, int(list_devices(a.host, a.port)["keys"].get(a.key, {}).get("total", 1)))

    def measure_layer(self, target, tuning, layout: str = "NCHW") -> LayerMeasure:
        return LayerMeasure(_table_name(tuning, layout), _RemoteLayers(self, target, tuning, layout))

    def tuning_runner(self, timeout_s: float):
        """MetaSchedule's ``RPCRunner`` on the devices under the key (``rpc.tuning_runner``: one
        candidate per device at a time, each session limited by the target's ``timeout``, which
        also bounds the wait for a free device; ``timeout_s``, the host-side limit, is unused)."""
        from fliqs_compiler.backends.rpc import tuning_runner
        a = self.address
        return tuning_runner(a.host, a.port, a.key, a.priority, timeout=a.timeout,
                             workers=self.devices())

    def tuning_dir(self, base, target) -> Path:
        """The device's own tuning database: ``base/rpc-KEY-<digest of target.key>`` — the device
        key and its target dict, never the tracker or the host (the loopback device of the tests
        has the host's very target dict: one shared folder would hand it the host's records)."""
        return Path(base) / f"rpc-{self.address.key}-{_digest(target.key)}"

    def describe(self, target) -> dict:
        a = self.address
        return {"where": self.where, "tracker": f"{a.host}:{a.port}", "key": a.key,
                "device_target": target.tvm_target}


def pipelined() -> bool:
    """Whether a remote table compiles while the devices time (``$FLIQS_RPC_PIPELINE``: 1, the
    default, or 0: compile every entry first, then time, as before the pipeline — for devices
    that share the host's cores, where a compile running beside a timing may slow it; on the
    loaded 2-core host of bench/rpc_overhead.py an A/B of the demo table on one loopback server
    showed no difference beyond the run-to-run noise: median entry ratios 1.41 / 0.98 with, 1.0 /
    1.3 without)."""
    env = os.environ.get("FLIQS_RPC_PIPELINE", "").strip().lower()
    if env in ("", "1", "on", "true", "yes"):
        return True
    if env in ("0", "off", "false", "no"):
        return False
    raise FliqsError(f"FLIQS_RPC_PIPELINE={env!r}: use 1 (compile while the devices time, the "
                     "default) or 0 (compile everything first)")


def compile_workers() -> int:
    """Compile worker processes for a remote latency table: ``$FLIQS_COMPILE_WORKERS`` (default 0:
    no pool, one compile thread in this process, pipelined with the devices' timing).

    Measured on the 2-core host of ``bench/rpc_overhead.py`` (demo model, 8 entries, 2 loopback
    devices): one compile thread 17.9 s; a pool of 1 / 2 spawned workers 22.4 / 28.8 s (each
    worker's ~5 s start-up, and two compiles at once are no faster than one after the other on
    two cores); two compile threads fail outright (``torch.export`` is not thread-safe) and,
    with its export serialized, are no faster than one. Hence a pool only on request, for a host
    with cores to spare and tables big enough to pay for the start-up. A pool spawns fresh
    interpreters: a script that builds tables with one needs ``if __name__ == "__main__":``."""
    env = os.environ.get("FLIQS_COMPILE_WORKERS", "").strip()
    if not env:
        return 0
    try:
        n = int(env)
    except ValueError:
        raise FliqsError(f"FLIQS_COMPILE_WORKERS={env!r}: give a number of compile processes ≥ 0 "
                         "(0: compile in this process)") from None
    return max(0, n)


def _table_name(tuning, layout: str) -> str:
    """The latency table a TVM measure files its entries under (part of every cache key): tuned
    kernels and the NHWC layout of an all-VNNI model are tables of their own."""
    name = "tvm" if tuning is None else f"tvm-tuned{tuning.trials}"
    return name if layout == "NCHW" else f"{name}-{layout.lower()}"


def _compile_entry(layer, fw, fa, target, tuning, out: str, layout: str = "NCHW") -> str:
    """Compile one (layer, formats) micro-graph (a conv in ``layout``) for ``target`` into
    ``out``; the library path. Module level: also what a compile worker process runs."""
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.backends.tvm_measure import layer_graph
    lower(layer_graph(layer, fw, fa, layout), target, Path(out), tuning=tuning)
    return str(Path(out) / "tvm" / "model.so")


def _worker_init() -> None:
    """A compile worker: the threads a compile may use are the farm's (design.md, "Threads")."""
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    import torch
    torch.set_num_threads(1)


class _RemoteLayers:
    """Per-layer latency on the device: each (layer, formats) micro-graph is compiled here for the
    device target, then timed there. ``measure_many`` spreads the entries over every device
    registered under the key (``rpc.measure_on_farm``: a lost device loses only its entry, which
    is retried on another) as a pipeline: entries are compiled (one compile thread, or
    ``compile_workers`` processes) while the devices time the ones already compiled (unless
    ``pipelined()`` is off); results are yielded as they arrive, so the table caches each one."""

    def __init__(self, device: Remote, target, tuning, layout: str = "NCHW"):
        self.device, self.target, self.tuning, self.layout = device, target, tuning, layout
        self._work = tempfile.TemporaryDirectory(prefix="fliqs-rpc-layers-")  # removed with self
        self.work = Path(self._work.name)
        self._built = itertools.count()

    def _inputs(self, layer):
        from fliqs_compiler.backends.tvm_measure import layer_inputs
        return layer_inputs(layer, layout=self.layout)

    def _build(self, layer, fw, fa):
        out = self.work / str(next(self._built))
        return (Path(_compile_entry(layer, fw, fa, self.target, self.tuning, str(out), self.layout)),
                self._inputs(layer))

    def __call__(self, layer, fw, fa) -> float:
        lib, inputs = self._build(layer, fw, fa)
        return self.device.time_ms(_Library(lib), inputs)

    def _compiled(self, entries, built: list, workers: int):
        """Yield each entry's position once its library is in ``built`` (completion order):
        in this thread one at a time (``workers`` 0), else on a pool of worker processes."""
        if workers <= 0:
            for i, e in enumerate(entries):
                built[i] = self._build(*e)
                yield i
            return
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        try:
            futures = {pool.submit(_compile_entry, layer, fw, fa, self.target, self.tuning,
                                   str(self.work / str(next(self._built))), self.layout): i
                       for i, (layer, fw, fa) in enumerate(entries)}
            todo = set(futures)
            while todo:
                done, todo = wait(todo, return_when=FIRST_COMPLETED)
                for f in done:
                    i = futures[f]
                    built[i] = (Path(f.result()), self._inputs(entries[i][0]))
                    yield i
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def measure_many(self, entries, progress: bool = True):
        from fliqs_compiler.backends.rpc import measure_on_farm, time_remote
        entries = list(entries)
        a = self.device.address
        n_devices = self.device.devices()
        workers = compile_workers()
        built: list = [None] * len(entries)  # position → (library, inputs), filled as compiled
        ready = self._compiled(entries, built, workers)
        if not pipelined():  # asked for: nothing compiles while a device times
            ready = list(ready)  # compile every entry before any is timed
            ready = None
        results = measure_on_farm(range(len(entries)), a.host, a.port, a.key, n_devices,
                                  lambda session, i: time_remote(built[i][0], built[i][1], session),
                                  progress=progress, priority=a.priority, timeout=a.timeout,
                                  wait=a.timeout, ready=ready)
        for r in results:
            yield entries[r.job], r.ms, r.device


class _Library:
    """A compiled library file, shaped like ``tvm_lower.Lowered`` for ``Remote``."""

    def __init__(self, path):
        self.path = Path(path)


def _digest(key: str) -> str:
    import hashlib
    return hashlib.sha1(key.encode()).hexdigest()[:12]


@contextmanager
def _local_runner(timeout_s: float):
    from tvm.s_tir import meta_schedule as ms
    yield ms.runner.LocalRunner(timeout_sec=timeout_s)


def device_for(target):
    return Remote(target.rpc) if target.rpc else Local()


def _cache_file(address) -> Path:
    from fliqs_compiler.backends.latency_table import default_cache_dir
    return default_cache_dir().parent / "devices" / f"{address.host}_{address.port}_{address.key}.json"


def resolve(target):
    """``target`` with its TVM target dict filled in: an ``rpc://`` target without ``target=``
    asks a device under its key (``rpc.device_target``) and caches the answer per tracker and key;
    every other target is returned as it is."""
    if not target.rpc or target.tvm_target is not None:
        return target
    from fliqs_compiler.backends.rpc import device_target
    from fliqs_compiler.base import atomic
    cache = _cache_file(target.rpc)
    if cache.is_file():
        try:
            return replace(target, tvm_target=json.loads(cache.read_text()))
        except (OSError, ValueError):
            pass  # unreadable cache: ask again
    lease = Remote(target.rpc)._lease()
    try:
        tvm_target = device_target(lease.session, f"RPC device {lease.device} (key {target.rpc.key!r})")
    finally:
        lease.close()
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(cache, json.dumps(tvm_target))
    return replace(target, tvm_target=tvm_target)

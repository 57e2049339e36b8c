"""Where TVM artifacts run and are timed — one interface, two implementations: ``Local`` (this
process) and ``Remote`` (a device behind a TVM RPC tracker, ``rpc://`` targets). The tvm backend
asks ``device_for(target)`` and never branches on where it runs.

Each implementation gives ``run(lowered, input_lists)``, ``time_ms(lowered, inputs)`` and
``measure_layer(target, tuning) -> LayerMeasure`` (per-layer latency tables: on a farm of
devices, entries are measured in parallel, one per device at a time). ``resolve(target)``
completes an ``rpc://`` target with the device's own LLVM target, asked of the device (cached per
tracker and key), so nothing compiled for a device uses the host CPU's features.
"""
from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from fliqs_compiler.backends.registry import LayerMeasure

__all__ = ["Local", "Remote", "device_for", "resolve"]


class Local:
    """This process: the compiled module in a local Relax VM."""

    where = "host"

    def run(self, lowered, input_lists) -> list:
        return [lowered.run(x) for x in input_lists]

    def time_ms(self, lowered, inputs) -> float:
        return float(lowered.time_ms(inputs))

    def measure_layer(self, target, tuning) -> LayerMeasure:
        from fliqs_compiler.backends.tvm_measure import measure_fn
        name = "tvm" if tuning is None else f"tvm-tuned{tuning.trials}"
        return LayerMeasure(name, measure_fn(target, tuning))

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

    def measure_layer(self, target, tuning) -> LayerMeasure:
        name = "tvm" if tuning is None else f"tvm-tuned{tuning.trials}"
        return LayerMeasure(name, _RemoteLayers(self, target, tuning))

    def describe(self, target) -> dict:
        a = self.address
        return {"where": self.where, "tracker": f"{a.host}:{a.port}", "key": a.key,
                "device_target": target.tvm_target}


class _RemoteLayers:
    """Per-layer latency on the device: each (layer, formats) micro-graph is compiled here for the
    device target, then timed there. ``measure_many`` spreads the entries over every device
    registered under the key (``rpc.measure_on_farm``: a lost device loses only its entry, which
    is retried on another); results are yielded as they arrive, so the table caches each one."""

    def __init__(self, device: Remote, target, tuning):
        self.device, self.target, self.tuning = device, target, tuning
        self._work = tempfile.TemporaryDirectory(prefix="fliqs-rpc-layers-")  # removed with self
        self.work = Path(self._work.name)
        self._built = itertools.count()

    def _build(self, layer, fw, fa):
        import numpy as np

        from fliqs_compiler.backends.tvm_lower import lower
        from fliqs_compiler.backends.tvm_measure import layer_graph
        out = self.work / str(next(self._built))
        lower(layer_graph(layer, fw, fa), self.target, out, tuning=self.tuning)
        x = np.random.default_rng(0).standard_normal(tuple(layer.input_shape)).astype(np.float32)
        return out / "tvm" / "model.so", x

    def __call__(self, layer, fw, fa) -> float:
        lib, x = self._build(layer, fw, fa)
        return self.device.time_ms(_Library(lib), [x])

    def measure_many(self, entries, progress: bool = True):
        from fliqs_compiler.backends.rpc import measure_on_farm, time_remote
        built = [self._build(*e) for e in entries]  # compiles stay here, one at a time
        a = self.device.address
        results = measure_on_farm(range(len(entries)), a.host, a.port, a.key, self.device.devices(),
                                  lambda session, i: time_remote(built[i][0], [built[i][1]], session),
                                  progress=progress, priority=a.priority, timeout=a.timeout,
                                  wait=a.timeout)
        for r in results:
            yield entries[r.job], r.ms, r.device


class _Library:
    """A compiled library file, shaped like ``tvm_lower.Lowered`` for ``Remote``."""

    def __init__(self, path):
        self.path = Path(path)


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

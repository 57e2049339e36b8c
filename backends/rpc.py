"""Remote devices behind a TVM RPC tracker (``rpc://HOST:PORT/KEY`` targets), on TVM's own RPC
engine (``tvm.rpc``): the tracker hands out devices registered under a key, each session runs
on one device (``python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY``).

- ``request_device`` / ``request_session``: one device session from the tracker, waiting at most
  ``wait`` seconds for a free device; the device kills the session after ``timeout`` seconds.
- ``device_target``: the LLVM target dict the *device* reports about itself (CPU, triple, threads).
- ``time_remote``: upload a compiled Relax library, time ``main`` on the device, remove the file.
- ``measure_on_farm``: a work queue over ``n_devices`` devices; a device lost mid-job costs only
  that job, which is retried on another device. Jobs may become ready while the farm runs
  (``ready``: e.g. micro-graphs still compiling on the host), so devices time finished jobs while
  the rest compile.
- ``uploads()``: how many libraries this process has uploaded, per local file (observable by
  tests and benchmarks: a compile to ``rpc://`` uploads its model once to check numerics).
- ``list_devices``: keys with their total / free devices and pending requests.
- ``tuning_runner``: MetaSchedule's ``RPCRunner`` on the devices under a key (candidates are
  timed on the device, never on this host); ``tuning_runs()`` counts the candidates each device
  timed for this process.

Every failure a user can cause (tracker down, unknown key, no free device, a device that cannot
describe itself, a job that keeps failing) is a one-line ``FliqsError``.
"""
from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from fliqs_compiler.base.errors import FliqsError, one_line

__all__ = ["Lease", "FarmResult", "request_device", "request_session", "device_target", "run_remote",
           "time_remote", "measure_on_farm", "list_devices", "uploads", "DEVICE_QUERIES",
           "DEFAULT_WAIT_S", "DEFAULT_SESSION_TIMEOUT_S", "tuning_runner", "tuning_runs"]

DEFAULT_WAIT_S = 120.0  # how long a request waits for a free device
DEFAULT_SESSION_TIMEOUT_S = 120.0  # the device ends a session older than this (0: never)
CONNECT_S = 5.0  # reaching the tracker (TVM's own connect retries for 60 s on a refused port)

_START_TRACKER = "start one with `python -m tvm.exec.rpc_tracker --host HOST --port PORT`"


# --- the tracker --------------------------------------------------------------------------------

def _connect_tracker(host: str, port: int, connect_s: float = CONNECT_S):
    """A ``TrackerSession`` to ``host:port``; FliqsError at once when nothing listens there.

    Probed with a plain TCP connect first because ``tvm.rpc.connect_tracker`` retries a refused
    connection for a minute before failing."""
    try:
        socket.create_connection((host, port), timeout=connect_s).close()
    except OSError as e:
        raise FliqsError(f"RPC tracker {host}:{port} is unreachable ({one_line(e)}); "
                         f"{_START_TRACKER}") from None
    from tvm import rpc
    try:
        tracker = rpc.connect_tracker(host, port)
    except (OSError, RuntimeError) as e:
        raise FliqsError(f"{host}:{port} is not a TVM RPC tracker ({one_line(e)}); "
                         f"{_START_TRACKER}") from None
    tracker._sock.settimeout(connect_s)  # a summary answers at once; never hang on a stuck tracker
    return tracker


def _summary(tracker, host: str, port: int) -> dict:
    try:
        return tracker.summary()
    except (OSError, RuntimeError) as e:
        raise FliqsError(f"RPC tracker {host}:{port} did not answer a summary ({one_line(e)})") from None


def _fresh_summary(host: str, port: int) -> dict:
    """The tracker's summary over a new connection (closed afterwards)."""
    tracker = _connect_tracker(host, port)
    try:
        return _summary(tracker, host, port)
    finally:
        tracker.close()


def _keys(summary: dict) -> dict:
    """``{key: {"total", "free", "pending"}}`` from a tracker summary: ``total`` counts the
    servers connected under the key, ``free`` / ``pending`` are the tracker's queue."""
    keys: dict = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", "")).partition(":")[2]  # 'server:KEY' → 'KEY'
        keys.setdefault(key, {"total": 0, "free": 0, "pending": 0})["total"] += 1
    for key, queue_info in summary.get("queue_info", {}).items():
        row = keys.setdefault(key, {"total": 0, "free": 0, "pending": 0})
        row["free"], row["pending"] = int(queue_info["free"]), int(queue_info["pending"])
    return keys


def _keys_text(keys: dict) -> str:
    known = [f"{k} ({v['free']}/{v['total']} free)" for k, v in sorted(keys.items()) if v["total"]]
    return ", ".join(known) or "no devices at all"


def list_devices(host: str, port: int) -> dict:
    """What the tracker at ``host:port`` has, like ``python -m tvm.exec.query_rpc_tracker``:
    ``{"tracker": "HOST:PORT", "keys": {key: {"total", "free", "pending"}},
    "servers": [{"key", "address"}]}``. Unreachable tracker → FliqsError."""
    summary = _fresh_summary(host, port)
    servers = [{"key": str(s.get("key", "")).partition(":")[2],
                "address": ":".join(str(a) for a in s.get("addr", ()))}
               for s in summary.get("server_info", [])]
    return {"tracker": f"{host}:{port}", "keys": _keys(summary),
            "servers": sorted(servers, key=lambda s: (s["key"], s["address"]))}


# --- sessions -----------------------------------------------------------------------------------

@dataclass
class Lease:
    """One device session: ``session`` (a ``tvm.rpc.RPCSession``), ``device`` (the server's
    HOST:PORT as the tracker named it) and ``key``. ``close()`` hands the device back."""

    session: object
    device: str
    key: str

    def close(self) -> None:
        """Drop this lease's reference. TVM has no explicit close: the connection ends (and the
        server re-registers as free) when the last reference to the session, and to remote
        modules / tensors made from it, is gone — or when the session ``timeout`` expires."""
        self.session = None


class _NoFreeDevice(Exception):
    """The tracker found no free device within the wait (turned into a FliqsError by the caller)."""


def _ask_for_device(tracker, key: str, priority: int, wait: float, host: str, port: int) -> tuple:
    """``(device_host, device_port, matchkey)`` for a free device under ``key``.

    The same REQUEST message ``TrackerSession.request`` sends (TVM's ``tvm.rpc.base`` helpers),
    read with a socket timeout so that "no free device" ends after ``wait`` seconds instead of
    blocking forever (``_NoFreeDevice``), and keeping the device address the tracker answers
    with. The abandoned request is harmless: the tracker skips requests of closed connections."""
    from tvm.rpc import base
    sock = tracker._sock
    sock.settimeout(wait)
    try:
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
        reply = base.recvjson(sock)
    except socket.timeout:
        raise _NoFreeDevice() from None
    except OSError as e:
        raise FliqsError(f"RPC tracker {host}:{port} dropped the request for {key!r} "
                         f"({one_line(e)})") from None
    if not isinstance(reply, list) or reply[0] != base.TrackerCode.SUCCESS:
        raise FliqsError(f"RPC tracker {host}:{port} refused the request for {key!r}: {reply!r}")
    return tuple(reply[1])


def _require_key(summary: dict, host: str, port: int, key: str) -> None:
    """FliqsError naming the key and what the tracker has when no server is under ``key``."""
    keys = _keys(summary)
    if not keys.get(key, {}).get("total"):
        raise FliqsError(f"RPC tracker {host}:{port} has no device under key {key!r} (it has: "
                         f"{_keys_text(keys)}); start one with `python -m tvm.exec.rpc_server "
                         f"--tracker {host}:{port} --key {key}`")


def _no_free_device(host: str, port: int, key: str, wait: float) -> FliqsError:
    row = _keys(_fresh_summary(host, port)).get(key, {"total": 0, "free": 0, "pending": 0})
    return FliqsError(f"RPC tracker {host}:{port}: no free device under key {key!r} within {wait:g} s "
                      f"({row['total']} registered, {row['free']} free, {row['pending']} requests "
                      "pending); retry later or wait longer")


def request_device(host: str, port: int, key: str, priority: int = 1,
                   timeout: float = DEFAULT_SESSION_TIMEOUT_S, wait: float = DEFAULT_WAIT_S,
                   connects: int = 3) -> Lease:
    """A ``Lease`` on one free device under ``key`` from the tracker at ``host:port``.

    ``priority``: the tracker serves higher first. ``timeout``: seconds after which the device
    ends the session (``session_timeout``; 0 = never). ``wait``: seconds to wait for a free
    device. Raises FliqsError naming the tracker when it is unreachable, naming the key and what
    the tracker has when no device is registered under ``key`` or none is free within ``wait``.
    A device that vanishes between the tracker's answer and our connect is skipped (``connects``
    tries)."""
    from tvm import rpc
    deadline = time.monotonic() + wait
    last, device = None, "?"
    for _ in range(max(1, connects)):
        tracker = _connect_tracker(host, port)
        try:
            _require_key(_summary(tracker, host, port), host, port, key)
            left = max(0.1, deadline - time.monotonic())
            dev_host, dev_port, matchkey = _ask_for_device(tracker, key, priority, left, host, port)
        except _NoFreeDevice:
            tracker.close()
            raise _no_free_device(host, port, key, wait) from None
        finally:
            tracker.close()
        device = f"{dev_host}:{dev_port}"
        try:
            return Lease(rpc.connect(dev_host, dev_port, matchkey, session_timeout=timeout), device, key)
        except Exception as e:  # noqa: BLE001 — TVMError/RuntimeError/OSError from the device side
            last = e
    raise FliqsError(f"RPC device {device} (key {key!r}) refused the session {connects} times "
                     f"({one_line(last)})")


def request_session(host: str, port: int, key: str, priority: int = 1,
                    timeout: float = DEFAULT_SESSION_TIMEOUT_S, wait: float = DEFAULT_WAIT_S):
    """A ``tvm.rpc.RPCSession`` on one free device under ``key`` (``request_device``'s session;
    the same arguments and errors)."""
    return request_device(host, port, key, priority, timeout, wait).session


# --- what the device is -------------------------------------------------------------------------

# Target field → (global functions the device runtime may register, first found wins; type;
# required). A stock ``tvm.exec.rpc_server`` runs the full TVM library, which registers all
# of them: ``target.llvm_get_system_*`` (what ``tvm.target.codegen.llvm_get_system_cpu`` calls)
# and ``runtime.NumThreads`` (the device's TVM thread pool, i.e. its TVM_NUM_THREADS).
DEVICE_QUERIES = (
    ("mcpu", ("target.llvm_get_system_cpu", "tvm.codegen.llvm.GetHostCPUName"), str, True),
    ("mtriple", ("target.llvm_get_system_triple", "tvm.codegen.llvm.GetProcessTriple"), str, False),
    ("num-cores", ("runtime.NumThreads",), int, True),
)


def _ask_device(session, names: Sequence[str]):
    """The first of the remote global functions ``names`` the device has, called; None if none."""
    for name in names:
        try:
            fn = session.get_function(name)
        except (AttributeError, RuntimeError):
            continue
        return fn()
    return None


def device_target(session, name: str = "the RPC device") -> dict:
    """The LLVM target dict the device reports about itself — ``{"kind": "llvm", "mcpu",
    "num-cores", "mtriple"}`` — asked of the device's runtime (``DEVICE_QUERIES``), never of
    this host. FliqsError when the device cannot say (a runtime built without LLVM) or reports
    a CPU this host's TVM cannot compile for: the user then passes ``target=<JSON>``."""
    target: dict = {"kind": "llvm"}
    for field_name, names, kind, required in DEVICE_QUERIES:
        value = _ask_device(session, names)
        if value in (None, "") or (kind is int and int(value) <= 0):
            if required:
                raise FliqsError(f"{name} cannot report its {field_name} (its runtime has none of "
                                 f"{', '.join(names)}); pass target=<JSON target dict> explicitly")
            continue
        target[field_name] = kind(value)
    try:
        import tvm
        tvm.target.Target(target)
    except Exception as e:  # noqa: BLE001 — TVM's own validation message
        raise FliqsError(f"{name} reports target {target} which this host's TVM rejects "
                         f"({one_line(e)}); pass target=<JSON target dict> explicitly") from None
    return target


# --- timing -------------------------------------------------------------------------------------

_UPLOADS: dict = {}  # local library path → uploads by this process (``uploads()``)
_UPLOADS_LOCK = threading.Lock()


def uploads() -> dict:
    """``{local library path: number of uploads}`` made by this process so far (a copy)."""
    with _UPLOADS_LOCK:
        return dict(_UPLOADS)


@contextmanager
def _loaded(lib_path, session):
    """(Relax VM, device) for a compiled library uploaded to the device under a unique name;
    the file is removed from the device afterwards, also on failure."""
    from tvm import relax
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise FliqsError(f"{lib_path}: no compiled library to upload; lower the model first")
    remote_name = f"fliqs-{uuid.uuid4().hex[:12]}-{lib_path.name}"  # .so kept: it picks the loader
    session.upload(str(lib_path), remote_name)
    with _UPLOADS_LOCK:
        _UPLOADS[str(lib_path)] = _UPLOADS.get(str(lib_path), 0) + 1
    try:
        dev = session.cpu()
        yield relax.VirtualMachine(session.load_module(remote_name), dev), dev
    finally:
        session.remove(remote_name)


def _remote_args(inputs: Sequence, dev) -> list:
    import tvm
    return [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]


def time_remote(lib_path, inputs: Sequence, session, number: int = 1, repeat: int = 5,
                min_repeat_ms: int = 50) -> float:
    """Median latency in ms of ``main`` of a compiled Relax library, run on the device.

    ``lib_path``: an ``export_library`` file built for the device's target (fliqs'
    ``tvm/model.so``). It is uploaded under a unique name, loaded by the device, run by a Relax
    ``VirtualMachine`` on the device CPU with ``inputs`` copied there once, and timed by TVM's
    ``time_evaluator`` on the device (``repeat`` runs of ≥ ``min_repeat_ms``, ``number`` calls
    each) — the same protocol as ``tvm_lower.Lowered.time_ms`` locally, so the number excludes
    the network. The file is removed from the device afterwards, also on failure."""
    with _loaded(lib_path, session) as (vm, dev):
        timer = vm.time_evaluator("main", dev, number=number, repeat=repeat,
                                  min_repeat_ms=min_repeat_ms)
        return float(timer(*_remote_args(inputs, dev)).median * 1e3)


def run_remote(lib_path, input_lists: Sequence, session) -> list:
    """``main``'s outputs (numpy lists) for each input list, computed on the device (one upload
    for all of them)."""
    out = []
    with _loaded(lib_path, session) as (vm, dev):
        for inputs in input_lists:
            y = vm["main"](*_remote_args(inputs, dev))
            out.append([y.numpy()] if hasattr(y, "numpy") else [o.numpy() for o in y])
    return out


# --- MetaSchedule's RPCRunner -------------------------------------------------------------------

_TUNING_RUNS: dict = {}  # device HOST:PORT → MetaSchedule candidates timed there (``tuning_runs()``)


def tuning_runs() -> dict:
    """``{device HOST:PORT: candidates}`` that MetaSchedule's runner (``tuning_runner``) timed on
    remote devices for this process so far (a copy). The runner's worker processes note each
    timed candidate in a ledger file; it is summed here when the tuning ends."""
    with _UPLOADS_LOCK:
        return dict(_TUNING_RUNS)


def _note(ledger: str, **event) -> None:
    """Append one event to a tuning ledger (one short ``O_APPEND`` write: the runner's worker
    processes never interleave within a line)."""
    import json
    import os
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def _ms_create_session(ledger: str, rpc_config):
    """RPCRunner's ``f_create_session`` (runs in its worker process): a session on a free device
    under the key from ``request_device``, which waits at most ``session_timeout_sec`` for one
    (TVM's default ``RPCConfig.connect_server`` waits forever), the device noted on the session."""
    try:
        lease = request_device(str(rpc_config.tracker_host), int(rpc_config.tracker_port),
                               str(rpc_config.tracker_key), int(rpc_config.session_priority),
                               timeout=float(rpc_config.session_timeout_sec),
                               wait=float(rpc_config.session_timeout_sec))
    except Exception as e:  # noqa: BLE001 — noted, then MetaSchedule's own error handling
        _note(ledger, step="session", error=one_line(e))
        raise
    lease.session._fliqs_device = lease.device
    return lease.session


def _ms_step(ledger: str, step: str, fn: Callable, session, *args):
    """One RPCRunner step (``fn``: TVM's default upload / argument allocation) with its failure
    noted in the ledger."""
    try:
        return fn(session, *args)
    except Exception as e:  # noqa: BLE001
        _note(ledger, step=step, device=getattr(session, "_fliqs_device", "?"), error=one_line(e))
        raise


def _ms_run_evaluator(ledger: str, session, rt_mod, device, evaluator_config, repeated_args):
    """RPCRunner's ``f_run_evaluator``: TVM's own ``time_evaluator`` protocol on the device,
    each timed candidate noted in the ledger with the device that timed it."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common
    where = getattr(session, "_fliqs_device", "?")
    try:
        costs = run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)
    except Exception as e:  # noqa: BLE001
        _note(ledger, step="time", device=where, error=one_line(e))
        raise
    _note(ledger, step="time", device=where)
    return costs


def _read_ledger(ledger: str) -> tuple:
    """``({device: candidates timed}, [error lines])`` of a tuning ledger."""
    import json
    timed: dict = {}
    errors: list = []
    try:
        lines = Path(ledger).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "error" in event:
            errors.append(f"{event.get('step', '?')} on {event.get('device', '?')}: {event['error']}")
        elif event.get("step") == "time":
            timed[event["device"]] = timed.get(event["device"], 0) + 1
    return timed, errors


@contextmanager
def tuning_runner(host: str, port: int, key: str, priority: int = 1,
                  timeout: float = DEFAULT_SESSION_TIMEOUT_S, workers: int = 1):
    """MetaSchedule's ``RPCRunner`` (``tvm.s_tir.meta_schedule``) on the devices under ``key`` at
    the tracker ``host:port``: every candidate is uploaded to a device, timed there with TVM's
    ``time_evaluator`` and removed, one fresh session per candidate, ``workers`` candidates at
    once (one per device). ``RPCConfig`` carries the tracker, key, ``priority`` and ``timeout``
    (the session limit, and how long a candidate waits for a free device).

    Before the runner is made a device under ``key`` must be free within ``timeout`` (else the
    one-line FliqsError of ``request_device``, naming the key); when the tuning ends, the
    candidates each device timed are added to ``tuning_runs()``, and FliqsError if candidates
    reached the devices but none could be timed there (the first device errors quoted)."""
    import os
    import tempfile
    from functools import partial

    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner import rpc_runner
    request_device(host, port, key, priority, timeout=timeout, wait=timeout).close()
    fd, ledger = tempfile.mkstemp(prefix="fliqs-ms-runs-", suffix=".jsonl")
    os.close(fd)
    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                       session_priority=int(priority),
                                       session_timeout_sec=max(1, int(round(timeout)))),
        f_create_session=partial(_ms_create_session, ledger),
        f_upload_module=partial(_ms_step, ledger, "upload", rpc_runner.default_upload_module),
        f_alloc_argument=partial(_ms_step, ledger, "alloc", rpc_runner.default_alloc_argument),
        f_run_evaluator=partial(_ms_run_evaluator, ledger),
        max_workers=max(1, int(workers)))
    try:
        yield runner
    finally:
        runner.pool.shutdown(wait=True)
        timed, errors = _read_ledger(ledger)
        with contextlib.suppress(OSError):  # a ledger already gone is nothing to clean up
            os.remove(ledger)
        with _UPLOADS_LOCK:
            for device, n in timed.items():
                _TUNING_RUNS[device] = _TUNING_RUNS.get(device, 0) + n
    if errors and not timed:
        raise FliqsError(f"MetaSchedule could not time any candidate on the devices under key "
                         f"{key!r} at {host}:{port} ({len(errors)} failures; first: {errors[0]})")


# --- a farm of devices --------------------------------------------------------------------------

@dataclass(frozen=True)
class FarmResult:
    """One measured job: its position in ``jobs``, the job, ``ms`` (what ``measure_one``
    returned), the ``device`` (HOST:PORT) that measured it and the ``attempts`` it took."""

    index: int
    job: object
    ms: float
    device: str
    attempts: int


@dataclass(frozen=True)
class _Fatal:
    """Feeding the farm failed (e.g. a job could not be compiled): the run ends with ``error``."""

    error: BaseException


@dataclass(frozen=True)
class _Failed:
    index: int
    job: object
    attempts: int
    device: str
    error: BaseException


class _Farm:
    """The shared state of one ``measure_on_farm`` run: the job queue, the results queue, the
    devices in use, and a stop flag set on a fatal failure or when the caller stops reading."""

    def __init__(self, jobs: list, retries: int, fed: bool = True):
        self.jobs = jobs
        self.pending: queue.Queue = queue.Queue()
        if fed:
            for i, job in enumerate(jobs):
                self.pending.put((i, job, 0))
        self.fed = threading.Event()  # every job is (or was) in ``pending``: no more will come
        if fed:
            self.fed.set()
        self.results: queue.Queue = queue.Queue()
        self.retries = retries
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.in_use = 0

    def failed(self, index, job, attempts: int, device: str, error: BaseException) -> None:
        """Requeue a job a device lost; after ``retries`` re-measurements report it as failed."""
        if attempts + 1 > self.retries:
            # without its traceback: its frames would keep the lost session (and device) alive
            self.results.put(_Failed(index, job, attempts + 1, device, error.with_traceback(None)))
        else:
            self.pending.put((index, job, attempts + 1))

    def using(self, delta: int) -> None:
        with self.lock:
            self.in_use += delta


def _worker(farm: _Farm, request: Callable[[], Lease], measure_one: Callable) -> None:
    """One device thread: take a job, lease a fresh session, measure, hand the device back.

    A session per job (as MetaSchedule's RPCRunner does) bounds each job by the session timeout
    and means a device that dies loses the one job it was running. The thread ends when the
    queue is empty and nothing more will be fed; a thread that requeues a job is still running, so
    someone retries it."""
    while not farm.stop.is_set():
        try:
            index, job, attempts = farm.pending.get(timeout=0.05)
        except queue.Empty:
            if farm.fed.is_set() and farm.pending.empty():
                return
            continue
        try:
            lease = request()
        except FliqsError as e:
            farm.failed(index, job, attempts, "no device", e)
            continue
        farm.using(+1)
        try:
            ms = measure_one(lease.session, job)
            farm.results.put(FarmResult(index, job, float(ms), lease.device, attempts + 1))
        except Exception as e:  # noqa: BLE001 — a lost device raises TVMError/RuntimeError/OSError
            farm.failed(index, job, attempts, lease.device, e)
        finally:
            farm.using(-1)
            lease.close()


def _feed(farm: _Farm, ready: Iterable) -> None:
    """Put each job into the queue as ``ready`` yields its position (in the feeder thread, which
    drives ``ready``: the compiles happen here); a failure of ``ready`` ends the run (``_Fatal``)."""
    try:
        seen = set()
        for index in ready:
            if farm.stop.is_set():
                return
            index = int(index)
            if index in seen or not 0 <= index < len(farm.jobs):
                raise FliqsError(f"RPC farm: job position {index} fed twice or out of range")
            seen.add(index)
            farm.pending.put((index, farm.jobs[index], 0))
        if len(seen) != len(farm.jobs) and not farm.stop.is_set():
            raise FliqsError(f"RPC farm: only {len(seen)} of {len(farm.jobs)} jobs became ready")
    except BaseException as e:  # noqa: BLE001 — reported by the reader of the results
        farm.results.put(_Fatal(e.with_traceback(None)))
    finally:
        close = getattr(ready, "close", None)
        if close is not None:
            close()  # a generator: its own cleanup (e.g. a compile pool) runs in this thread
        farm.fed.set()


def measure_on_farm(jobs: Iterable, host: str, port: int, key: str, n_devices: int,
                    measure_one: Callable[[object, object], float], retries: int = 2,
                    progress: bool = True, priority: int = 1,
                    timeout: float = DEFAULT_SESSION_TIMEOUT_S,
                    wait: float = DEFAULT_WAIT_S,
                    ready: Optional[Iterable] = None) -> Iterator[FarmResult]:
    """Measure every job on whichever of ``n_devices`` devices under ``key`` is free; yields a
    ``FarmResult`` per job as it completes (so the caller can cache each one at once).

    ``measure_one(session, job) -> ms`` runs on a fresh device session per job, one thread per
    device. A job whose device disconnects, times out (``timeout``) or errs is remeasured on
    another device, at most ``retries`` more times; then FliqsError naming the job and the last
    device. A tqdm bar (``progress``) shows done/total and the devices in use. Stopping the
    iteration early stops the farm after the jobs in flight.

    ``ready``: None, every job can be measured now; else an iterable (run in a feeder thread of
    its own) yielding the positions of jobs as they become measurable — e.g. as their
    micro-graphs finish compiling, so devices time finished jobs while the others compile. An
    exception it raises ends the run with that error (a FliqsError as it is)."""
    jobs = list(jobs)
    if not jobs:
        return
    farm = _Farm(jobs, retries, fed=ready is None)

    def request() -> Lease:
        return request_device(host, port, key, priority, timeout, wait)

    _require_key(_fresh_summary(host, port), host, port, key)  # fail fast, before any thread
    threads = [threading.Thread(target=_worker, args=(farm, request, measure_one), daemon=True,
                                name=f"fliqs-rpc-{key}-{i}") for i in range(max(1, n_devices))]
    feeder = None
    if ready is not None:
        feeder = threading.Thread(target=_feed, args=(farm, ready), daemon=True,
                                  name=f"fliqs-rpc-{key}-feed")
        feeder.start()
    for t in threads:
        t.start()
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc=f"rpc {key}", unit="job", disable=not progress, leave=False)
    try:
        yield from _collect(farm, threads, len(jobs), bar, len(threads))
    finally:
        farm.stop.set()
        bar.close()
        for t in threads:
            t.join()
        if feeder is not None:
            feeder.join()  # the job being prepared (a compile) finishes; nothing runs after us


def _collect(farm: _Farm, threads: list, total: int, bar, n: int) -> Iterator[FarmResult]:
    """Yield results as the workers finish them; raise on a job that failed for good."""
    done = 0
    while done < total:
        try:
            item = farm.results.get(timeout=0.5)
        except queue.Empty:
            if not any(t.is_alive() for t in threads) and farm.results.empty():
                raise FliqsError(f"RPC farm stopped with {total - done} of {total} jobs unmeasured")
            bar.set_postfix_str(f"devices in use {farm.in_use}/{n}", refresh=True)
            continue
        if isinstance(item, _Fatal):
            if isinstance(item.error, FliqsError):
                raise item.error
            raise FliqsError(f"RPC farm: preparing a job failed: {one_line(item.error)}") from None
        if isinstance(item, _Failed):
            raise FliqsError(f"RPC job {item.index} ({_short(item.job)}) failed {item.attempts} "
                             f"times, last on {item.device}: {one_line(item.error)}")
        done += 1
        bar.update(1)
        bar.set_postfix_str(f"devices in use {farm.in_use}/{n}")
        yield item


def _short(job, limit: int = 60) -> str:
    text = repr(job)
    return text if len(text) <= limit else text[:limit - 3] + "..."

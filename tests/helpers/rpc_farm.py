"""A real TVM RPC device farm on loopback for tests: one tracker and N servers, each a subprocess
(``python -m tvm.exec.rpc_tracker`` / ``python -m tvm.exec.rpc_server``) bound to 127.0.0.1 on
a free port, in its own process group so that ``kill``/``close`` end its whole tree (a server
forks one child per session).

    with RpcFarm(key="farm", servers=2) as farm:
        farm.host, farm.port, farm.key, farm.servers[0].port
        farm.kill_server(0)          # SIGKILL one device (its session child included)

``close()`` (also run on ``__exit__`` and by the pytest fixtures' finalizers) kills every group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """One farm process: what it is (``name``), its port and its ``Popen``."""

    name: str
    port: int
    popen: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group (the process and every child it forked), then reap it."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already gone: what kill() wants
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # SIGKILLed group that is slow to reap: nothing more to do from here


def _start(name: str, args: list, port: int, threads: int) -> Proc:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    popen = subprocess.Popen([sys.executable, "-m", *args], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # own group: killpg reaches its children
    return Proc(name, port, popen)


@dataclass
class RpcFarm:
    """A tracker plus ``servers`` devices registered under ``key``; ``start()`` returns once the
    tracker reports them all free (``ready_s`` at most, else RuntimeError)."""

    key: str = "fliqs-test"
    servers_n: int = 2
    threads: int = 2
    ready_s: float = 60.0
    host: str = HOST
    port: int = 0
    tracker: Optional[Proc] = None
    servers: list = field(default_factory=list)

    def start(self) -> "RpcFarm":
        try:
            self.port = free_port()
            self.tracker = _start("tracker", ["tvm.exec.rpc_tracker", "--host", HOST, "--port",
                                              str(self.port), "--port-end", str(self.port + 1),
                                              "--silent"], self.port, self.threads)
            for _ in range(self.servers_n):  # in parallel with the tracker's start-up (a
                self.add_server()              # server retries the tracker every 5 s)
            self._wait_tracker()
            self.wait_free(self.servers_n)
        except BaseException:
            self.close()
            raise
        return self

    def add_server(self) -> Proc:
        """Start one more device under ``key`` (not waited for: see ``wait_free``)."""
        port = free_port()
        proc = _start(f"server{len(self.servers)}",
                      ["tvm.exec.rpc_server", "--tracker", f"{HOST}:{self.port}", "--key", self.key,
                       "--host", HOST, "--port", str(port), "--port-end", str(port + 1), "--silent"],
                      port, self.threads)
        self.servers.append(proc)
        return proc

    def _wait_tracker(self) -> None:
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            if not self.tracker.alive:
                raise RuntimeError("rpc_tracker exited at start")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"rpc_tracker not listening on {HOST}:{self.port} after {self.ready_s} s")

    def summary(self) -> dict:
        """The tracker's own summary (``TrackerSession.summary()``)."""
        from tvm import rpc
        tracker = rpc.connect_tracker(HOST, self.port)
        try:
            return tracker.summary()
        finally:
            tracker.close()

    def free(self) -> int:
        """Devices under ``key`` the tracker has free now."""
        return int(self.summary()["queue_info"].get(self.key, {}).get("free", 0))

    def wait_free(self, n: int, within_s: Optional[float] = None) -> None:
        """Block until the tracker has ``n`` free devices under ``key`` (RuntimeError after
        ``within_s``, default ``ready_s``)."""
        deadline = time.monotonic() + (within_s or self.ready_s)
        while time.monotonic() < deadline:
            if any(not s.alive for s in self.servers):
                raise RuntimeError("an rpc_server exited at start")
            if self.free() >= n:
                return
            time.sleep(0.2)
        raise RuntimeError(f"tracker {HOST}:{self.port} has {self.free()} of {n} devices free "
                           f"under {self.key!r} after {within_s or self.ready_s} s")

    def all_free(self) -> "RpcFarm":
        """The farm with every device free again: a session ended by an earlier test re-registers
        its device within a moment of its last reference going (hence the collection)."""
        import gc
        gc.collect()
        self.wait_free(self.servers_n, within_s=30)
        return self

    def kill_server(self, index: int) -> None:
        """SIGKILL device ``index`` and its session children (a device vanishing mid-job)."""
        self.servers[index].kill()

    def close(self) -> None:
        """Kill every server group, then the tracker's; safe to call twice."""
        for proc in [*self.servers, self.tracker]:
            if proc is not None:
                proc.kill()

    def __enter__(self) -> "RpcFarm":
        return self.start() if self.tracker is None else self

    def __exit__(self, *exc) -> None:
        self.close()

"""``backends.rpc`` against a real TVM RPC tracker and real servers on 127.0.0.1
(``tests/helpers/rpc_farm.py``): sessions, the device's own target, remote timing of a compiled
Relax model, the device-farm work queue (a device killed mid-job included), and the errors."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fliqs_compiler.backends import rpc as R
from fliqs_compiler.base.errors import FliqsError
from rpc_farm import RpcFarm, free_port

KEY = "fliqs-test"


@pytest.fixture(scope="module")
def farm_two():
    """A tracker and two devices under KEY, shared by this module's tests."""
    with RpcFarm(key=KEY, servers_n=2) as farm:
        yield farm


@pytest.fixture
def farm(farm_two):
    return farm_two.all_free()


@pytest.fixture(scope="module")
def model_lib(tmp_path_factory):
    """A 2-layer MLP lowered by ``tvm_lower.lower`` for 'llvm' (this host = the loopback
    devices): (the ``Lowered``, path of its ``tvm/model.so``, numpy inputs)."""
    from fliqs_compiler.backends.tvm_lower import lower
    from fliqs_compiler.frontends.load import load
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(1, 16)
    lowered = lower(load(model, (x,)), "llvm", tmp_path_factory.mktemp("rpc_model"))
    return lowered, lowered.path, [x.numpy()]


def _addresses(farm) -> set:
    return {f"{farm.host}:{s.port}" for s in farm.servers}


def _workdir(session) -> str:
    """The device's directory for this session (where uploads land; same machine here)."""
    return os.path.normpath(session.get_function("tvm.rpc.server.workpath")(""))


def test_session_and_device_target(farm):
    from fliqs_compiler.backends.targets import host_cpu
    lease = R.request_device(farm.host, farm.port, KEY, timeout=60, wait=10)
    assert lease.device in _addresses(farm) and lease.key == KEY
    target = R.device_target(lease.session, name=lease.device)
    # loopback: the device is this machine, started with TVM_NUM_THREADS=2
    assert target["kind"] == "llvm" and target["mcpu"] == host_cpu()
    assert target["num-cores"] == farm.threads
    assert isinstance(target.get("mtriple"), str) and target["mtriple"]
    import tvm
    assert tvm.target.Target(target).kind.name == "llvm"
    lease.close()
    assert R.request_session(farm.host, farm.port, KEY, timeout=60, wait=10) is not None


def test_device_target_error_when_the_device_cannot_say(farm, monkeypatch):
    session = R.request_session(farm.host, farm.port, KEY, timeout=60, wait=10)
    monkeypatch.setattr(R, "DEVICE_QUERIES", (("mcpu", ("no.such.function",), str, True),))
    with pytest.raises(FliqsError, match=r"cannot report its mcpu.*target=") as e:
        R.device_target(session)
    assert "\n" not in str(e.value)


def test_time_remote_times_the_model_and_removes_the_upload(farm, model_lib):
    lowered, lib, inputs = model_lib
    session = R.request_session(farm.host, farm.port, KEY, timeout=60, wait=10)
    workdir = _workdir(session)
    seen = []
    real_upload = session.upload

    def upload_and_look(path, name):  # wraps the real upload: see the file land on the device
        real_upload(path, name)
        seen.append((name, os.path.isfile(os.path.join(workdir, name))))

    session.upload = upload_and_look
    try:
        ms = R.time_remote(lib, inputs, session, number=1, repeat=3, min_repeat_ms=10)
    finally:
        del session.upload  # the wrapper refers to the session: keep no cycle holding the device
    assert ms > 0 and np.isfinite(ms)
    assert len(seen) == 1 and seen[0][1], "the library was not on the device while timed"
    assert seen[0][0].endswith(".so")
    assert not os.path.exists(os.path.join(workdir, seen[0][0])), "upload left on the device"
    local = lowered.time_ms(inputs, number=1, repeat=3, min_repeat_ms=10)
    assert local > 0
    with pytest.raises(FliqsError, match="no compiled library"):
        R.time_remote(lib.parent / "missing.so", inputs, session)


def test_farm_of_two_devices_measures_six_jobs_on_both(farm, model_lib):
    _, lib, inputs = model_lib

    def measure_one(session, job):
        return R.time_remote(lib, inputs, session, number=1, repeat=2, min_repeat_ms=5)

    results = list(R.measure_on_farm(range(6), farm.host, farm.port, KEY, 2, measure_one,
                                     progress=False, timeout=60, wait=30))
    assert sorted(r.index for r in results) == list(range(6))
    assert [r.job for r in sorted(results, key=lambda r: r.index)] == list(range(6))
    assert all(r.ms > 0 and r.attempts == 1 for r in results)
    served = {r.device for r in results}
    assert served == _addresses(farm), f"job→device {[(r.job, r.device) for r in results]}"


def test_farm_job_that_keeps_failing_is_a_one_line_error(farm):
    def measure_one(session, job):
        if job == "bad":
            raise RuntimeError("kernel crashed\nsecond line")
        return 1.0

    t0 = time.monotonic()
    with pytest.raises(FliqsError, match=r"RPC job 1 \('bad'\) failed 3 times") as e:
        list(R.measure_on_farm(["ok", "bad", "ok2"], farm.host, farm.port, KEY, 2, measure_one,
                               retries=2, progress=False, timeout=60, wait=30))
    assert "\n" not in str(e.value) and "kernel crashed" in str(e.value)
    assert time.monotonic() - t0 < 30


def test_unreachable_tracker_fails_fast():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(FliqsError, match=rf"127\.0\.0\.1:{port} is unreachable.*rpc_tracker") as e:
        R.request_session("127.0.0.1", port, KEY)
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    with pytest.raises(FliqsError, match="unreachable"):
        R.list_devices("127.0.0.1", port)


def test_unknown_key_names_what_the_tracker_has(farm):
    t0 = time.monotonic()
    with pytest.raises(FliqsError, match=rf"no device under key 'nope'.*{KEY} \(2/2 free\)") as e:
        R.request_session(farm.host, farm.port, "nope", wait=30)
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)


def test_no_free_device_within_the_wait_then_the_tracker_recovers(farm):
    held = [R.request_device(farm.host, farm.port, KEY, timeout=60, wait=10) for _ in range(2)]
    assert {h.device for h in held} == _addresses(farm)
    t0 = time.monotonic()
    with pytest.raises(FliqsError, match=rf"no free device under key '{KEY}' within 1 s "
                                         r"\(2 registered, 0 free") as e:
        R.request_session(farm.host, farm.port, KEY, wait=1)
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    for lease in held:
        lease.close()
    # the abandoned request must not swallow a device: both come back and serve again
    farm.wait_free(2, within_s=30)
    again = [R.request_device(farm.host, farm.port, KEY, timeout=60, wait=10) for _ in range(2)]
    assert {h.device for h in again} == _addresses(farm)


def test_list_devices_and_the_devices_command(farm):
    info = R.list_devices(farm.host, farm.port)
    assert info["tracker"] == f"{farm.host}:{farm.port}"
    assert info["keys"][KEY] == {"total": 2, "free": 2, "pending": 0}
    assert {s["address"] for s in info["servers"] if s["key"] == KEY} == _addresses(farm)

    from fliqs_compiler.cli.devices_cmd import devices
    runner = CliRunner()
    out = runner.invoke(devices, [f"rpc://{farm.host}:{farm.port}", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["keys"][KEY]["free"] == 2
    out = runner.invoke(devices, [f"rpc://{farm.host}:{farm.port}"])
    assert out.exit_code == 0 and KEY in out.output


def test_devices_command_errors_are_one_line(no_debug_env):
    from fliqs_compiler.cli.devices_cmd import devices
    runner = CliRunner()
    port = free_port()
    out = runner.invoke(devices, [f"rpc://127.0.0.1:{port}"])
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert f"127.0.0.1:{port} is unreachable" in out.output
    out = runner.invoke(devices, ["rpc://nohost"])
    assert out.exit_code == 2 and "expected rpc://HOST:PORT" in out.output


def _server_of(farm, workdir: str) -> int:
    """Index of the farm server whose process tree serves the session in ``workdir`` (the
    server chdirs into a session's directory before forking its session process)."""
    for i, server in enumerate(farm.servers):
        root = psutil.Process(server.popen.pid)
        for proc in [root, *root.children(recursive=True)]:
            try:
                if os.path.normpath(proc.cwd()) == workdir:
                    return i
            except psutil.Error:
                continue
    raise AssertionError(f"no farm server serves {workdir}")


@pytest.mark.slow
def test_farm_survives_a_device_killed_mid_job(model_lib):
    _, lib, inputs = model_lib
    victim, attempts = 2, {}
    started = threading.Event()
    workdirs = []

    def measure_one(session, job):
        attempts[job] = attempts.get(job, 0) + 1
        if job == victim and attempts[job] == 1:  # first try: stall until the device is killed
            workdirs.append(_workdir(session))
            started.set()
            ping = session.get_function("runtime.NumThreads")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ping()
                time.sleep(0.05)
            return -1.0  # not reached when the kill works: the test then fails below
        return R.time_remote(lib, inputs, session, number=1, repeat=2, min_repeat_ms=5)

    with RpcFarm(key="fliqs-kill", servers_n=2) as farm:
        killed = {}

        def killer():
            if started.wait(60):
                killed["index"] = _server_of(farm, workdirs[0])
                farm.kill_server(killed["index"])

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        results = list(R.measure_on_farm(range(6), farm.host, farm.port, "fliqs-kill", 2,
                                         measure_one, retries=2, progress=False, timeout=60, wait=30))
        thread.join(10)
        assert "index" in killed, "the victim job never started"
        dead = f"{farm.host}:{farm.servers[killed['index']].port}"
        alive = (_addresses(farm) - {dead}).pop()
        by_job = {r.job: r for r in results}
        assert sorted(by_job) == list(range(6)) and all(r.ms > 0 for r in results)
        assert attempts[victim] == 2 and by_job[victim].attempts == 2
        assert by_job[victim].device == alive, "the killed job was not remeasured elsewhere"
        assert not farm.servers[killed["index"]].alive


def test_farm_measures_jobs_as_they_become_ready(farm, model_lib):
    """``ready``: jobs fed while the farm runs (what compiling micro-graphs does): each job is
    measured only after it is fed, both devices serve, and the feed's own error ends the run."""
    _, lib, inputs = model_lib
    fed_at, measured_at = {}, {}

    def ready():
        for i in (3, 0, 2, 1):  # any order: completion order of the compiles
            time.sleep(0.3)
            fed_at[i] = time.monotonic()
            yield i

    def measure_one(session, job):
        ms = R.time_remote(lib, inputs, session, number=1, repeat=2, min_repeat_ms=5)
        measured_at[job] = time.monotonic()
        return ms

    results = list(R.measure_on_farm(list("abcd"), farm.host, farm.port, KEY, 2, measure_one,
                                     progress=False, timeout=60, wait=30, ready=ready()))
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    assert all(measured_at[r.job] >= fed_at[r.index] for r in results)
    assert results[0].index == 3  # the first fed is the first measured: nothing waits for the rest

    def broken():
        yield 0
        raise FliqsError("layer x: cannot compile")

    farm.all_free()
    with pytest.raises(FliqsError, match="^layer x: cannot compile$"):
        list(R.measure_on_farm(list("ab"), farm.host, farm.port, KEY, 2, lambda s, j: 1.0,
                               progress=False, timeout=60, wait=30, ready=broken()))

"""``--target rpc://HOST:PORT/KEY`` end to end, on a real TVM RPC tracker with two real servers on
loopback: the device is asked for its own target, the per-layer table is measured on both
devices, and ``fliqs compile`` builds for, runs on and times on the device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fliqs_compiler.backends import devices
from fliqs_compiler.backends.targets import parse_target
from fliqs_compiler.driver import api
from rpc_farm import RpcFarm, free_port

KEY = "fliqs-target"


@pytest.fixture(scope="module")
def farm():
    with RpcFarm(key=KEY, servers_n=2) as farm:
        yield farm


@pytest.fixture
def rpc(farm, tmp_path, monkeypatch):
    """The target text, with fliqs' caches (device targets, latency tables) in ``tmp_path``."""
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    farm.all_free()
    return f"rpc://{farm.host}:{farm.port}/{KEY}"


def test_the_device_reports_its_own_target(rpc, tmp_path):
    t = devices.resolve(parse_target(rpc))
    host = parse_target("llvm").tvm_target  # loopback: the device IS this machine
    assert t.tvm_target["mcpu"] == host["mcpu"] and t.tvm_target["num-cores"] == 2
    assert t.caps.device == "rpc" and t.caps.features == parse_target("llvm").caps.features
    assert t.key.startswith(f"rpc:{KEY}:") and "127.0.0.1" not in t.key
    given = parse_target(rpc + '?target={"kind":"llvm","mcpu":"cascadelake","num-cores":4}')
    assert devices.resolve(given).tvm_target["mcpu"] == "cascadelake"  # as given, never asked


def _watch_pipeline(monkeypatch) -> dict:
    """Wrap the real compile of a micro-graph and the real remote timing (no behaviour changed)
    to record when each compile ends and each timing starts."""
    from fliqs_compiler.backends import rpc as R
    seen = {"compiled": [], "timed": []}
    real_compile, real_time = devices._compile_entry, R.time_remote

    def compile_entry(*args, **kwargs):
        out = real_compile(*args, **kwargs)
        seen["compiled"].append(time.monotonic())
        return out

    def time_remote(*args, **kwargs):
        seen["timed"].append(time.monotonic())
        return real_time(*args, **kwargs)
    monkeypatch.setattr(devices, "_compile_entry", compile_entry)
    monkeypatch.setattr(R, "time_remote", time_remote)
    return seen


def test_profile_measures_the_table_on_both_devices(rpc, tmp_path, monkeypatch):
    assert devices.pipelined()  # the default
    seen = _watch_pipeline(monkeypatch)
    graph, table = api.profile(api.DEMO_MODEL, target=rpc, formats="int8,int4", progress=False,
                               cache_dir=tmp_path / "remote")
    monkeypatch.undo()
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    # a pipeline: the devices time the first entries while the host still compiles the others
    assert len(seen["compiled"]) == len(seen["timed"]) == len(table.entries)
    assert min(seen["timed"]) < max(seen["compiled"])
    _, local = api.profile(api.DEMO_MODEL, target="llvm", formats="int8,int4", progress=False,
                           cache_dir=tmp_path / "local")
    def entries(tab):  # what was measured (layer, formats, backend, threads, versions), wherever
        return {json.dumps(json.loads(k)[1:]) for k in tab.entries}
    assert entries(table) == entries(local) and len(table.entries) >= 4
    assert all(json.loads(k)[0] == devices.resolve(parse_target(rpc)).key for k in table.entries)
    assert all(e["ms"] > 0 for e in table.entries.values())
    assert len(set(table.measured_on.values())) == 2  # the farm used both devices


def _model_uploads(before: dict) -> dict:
    """Uploads since ``before`` of libraries other than the per-layer micro-graphs."""
    from fliqs_compiler.backends import rpc as R
    now = R.uploads()
    return {p: n - before.get(p, 0) for p, n in now.items()
            if n > before.get(p, 0) and "fliqs-rpc-layers-" not in p}


def test_compile_builds_runs_and_times_on_the_device(rpc, farm, tmp_path):
    from fliqs_compiler.backends import rpc as R
    before = R.uploads()
    result = api.compile(api.DEMO_MODEL, target=rpc, data="digits", formats="int4,int8",
                         budget="bops=0.4x", steps=6, out=tmp_path / "out", progress=False)
    device = result.report["environment"]["device"]
    assert device["where"] == "rpc" and device["key"] == KEY and device["tracker"] == f"{farm.host}:{farm.port}"
    assert device["target"]["mcpu"] == parse_target("llvm").tvm_target["mcpu"]
    assert result.report["totals"]["latency_ms"] > 0
    assert result.report["numerics"]["tvm_max_abs_err"] < 1e-3  # outputs computed on the device
    assert (tmp_path / "out" / "tvm" / "model.so").is_file()
    # the model's library went to the device twice: once for the numerics check of every input
    # list (Artifact.run_many), once to time it — not once per input list
    assert list(_model_uploads(before).values()) == [2]


def test_run_many_uploads_once_and_matches_run(rpc, tmp_path):
    import numpy as np
    import torch
    from torch import nn

    from fliqs_compiler.backends import registry
    from fliqs_compiler.frontends.load import load
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    target = devices.resolve(parse_target(rpc))
    artifact = registry.get("tvm").lower(load(model, (torch.randn(1, 16),)), target, tmp_path / "o", None)
    rng = np.random.default_rng(0)
    lists = [[rng.standard_normal((1, 16)).astype(np.float32)] for _ in range(5)]
    before = _model_uploads({})
    many = artifact.run_many(lists)
    assert _model_uploads(before) == {str(artifact.path): 1}
    before = _model_uploads({})
    one_by_one = [artifact.run(x) for x in lists]
    assert _model_uploads(before) == {str(artifact.path): 5}
    assert len(many) == 5
    for a, b, x in zip(many, one_by_one, lists):
        np.testing.assert_array_equal(a[0], b[0])
        expected = model(torch.from_numpy(x[0])).detach().numpy()
        np.testing.assert_allclose(a[0], expected, atol=1e-5)


def test_tuning_applies_to_rpc_targets(rpc):
    from fliqs_compiler.backends import registry
    t = parse_target(rpc)
    assert registry.tunes(registry.backend_for(t), t) is True  # RPCRunner: timed on the device
    assert registry.tuning_refusal(registry.backend_for(t), t) is None
    api.plan("profile", model=api.DEMO_MODEL, target=rpc, tune_trials=4)  # accepted


def test_tuning_without_a_free_device_is_one_line_naming_the_key(rpc, farm):
    """At tuning time every device under the key is busy: MetaSchedule's runner is never made,
    the error names the key (the CLI exits 2 on it, as on every FliqsError)."""
    import gc

    from fliqs_compiler.backends import rpc as R
    from fliqs_compiler.base.errors import FliqsError
    held = [R.request_device(farm.host, farm.port, KEY) for _ in range(farm.servers_n)]
    try:
        device = devices.device_for(parse_target(rpc + "?timeout=2"))
        with pytest.raises(FliqsError, match=f"no free device under key {KEY!r}") as e:
            with device.tuning_runner(300.0):
                pytest.fail("a runner without a free device")
        assert "\n" not in str(e.value)
    finally:
        for lease in held:
            lease.close()
        del held
        gc.collect()


def _tiny():
    """Three linears: the middle one is the only searched layer (first and last stay float)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).eval(), (torch.randn(1, 8),)


@pytest.mark.slow
def test_tuned_table_times_candidates_on_the_device_and_reuses_its_cache(rpc, farm, tmp_path):
    """``--tune-trials 1`` on an rpc:// target: MetaSchedule's RPCRunner times the candidate on
    a farm device (counted by the runner's worker processes: ``rpc.tuning_runs``), the tuned
    entry and the tuning database are filed under the device key and target, and a rerun
    measures nothing."""
    from fliqs_compiler.backends import rpc as R
    model, example = _tiny()
    cache = tmp_path / "tuned"
    farm_devices = {f"{farm.host}:{s.port}" for s in farm.servers}

    def profile():
        return api.profile(model, target=rpc, formats="int8", progress=False, cache_dir=cache,
                           example_inputs=example, tune_trials=1)[1]

    runs, ups = R.tuning_runs(), R.uploads()
    t0 = time.monotonic()
    table = profile()
    first_s = time.monotonic() - t0
    new_runs = {d: n - runs.get(d, 0) for d, n in R.tuning_runs().items() if n > runs.get(d, 0)}
    assert new_runs and set(new_runs) <= farm_devices, new_runs  # timed on a farm device
    assert table.measured == len(table.entries) == 1
    key = json.loads(next(iter(table.entries)))
    device_key = devices.resolve(parse_target(rpc)).key
    assert key[0] == device_key and device_key.startswith(f"rpc:{KEY}:") and key[4] == "tvm-tuned1"
    assert next(iter(table.entries.values()))["ms"] > 0
    # the tuning database: the device's own folder (key + digest of its target), none for the host
    ms_dirs = [d for d in (cache / "metaschedule").iterdir() if d.is_dir()]
    assert [d.name for d in ms_dirs] == [f"rpc-{KEY}-{devices._digest(device_key)}"]
    assert (ms_dirs[0] / "database_tuning_record.json").read_text().strip()
    assert not (cache / "metaschedule" / "database_tuning_record.json").exists()

    runs, ups = R.tuning_runs(), R.uploads()
    t0 = time.monotonic()
    again = profile()  # the cached table: nothing compiled, tuned or timed
    rerun_s = time.monotonic() - t0
    assert again.measured == 0 and again.entries.keys() == table.entries.keys()
    assert R.tuning_runs() == runs and R.uploads() == ups
    print(f"tuned table: {first_s:.1f} s, rerun {rerun_s:.2f} s, candidates {new_runs}")


@pytest.mark.parametrize("target, match", [
    (lambda port: f"rpc://127.0.0.1:{port}/{KEY}", "tracker"),
    (lambda port: "rpc://127.0.0.1:1/k?target=notjson", "JSON target dict"),
])
def test_bad_rpc_targets_are_one_line_errors_before_any_work(target, match, tmp_path):
    text = target(free_port())
    p = subprocess.run([sys.executable, "-m", "fliqs_compiler.cli.main", "compile", str(api.DEMO_MODEL),
                        "--target", text, "--out", str(tmp_path / "o"), "--dry-run"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FLIQS_CACHE_DIR": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and match in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_key_is_named(rpc, farm, tmp_path):
    from fliqs_compiler.base.errors import FliqsError
    with pytest.raises(FliqsError, match="no-such-key"):
        devices.resolve(parse_target(f"rpc://{farm.host}:{farm.port}/no-such-key?timeout=3"))


def test_devices_command_lists_the_key(farm):
    p = subprocess.run([sys.executable, "-m", "fliqs_compiler.cli.main", "devices",
                        f"rpc://{farm.host}:{farm.port}", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["keys"][KEY]["total"] == 2


@pytest.mark.slow
def test_compile_worker_processes_build_the_same_table(rpc, tmp_path, monkeypatch):
    """``FLIQS_COMPILE_WORKERS=2``: micro-graphs compiled by two spawned processes, timed on the
    farm as they arrive; the same entries as the in-process pipeline."""
    monkeypatch.setenv("FLIQS_COMPILE_WORKERS", "2")
    _, table = api.profile(api.DEMO_MODEL, target=rpc, formats="int8", progress=False,
                           cache_dir=tmp_path / "pool")
    monkeypatch.setenv("FLIQS_COMPILE_WORKERS", "0")
    _, again = api.profile(api.DEMO_MODEL, target=rpc, formats="int8", progress=False,
                           cache_dir=tmp_path / "inline")
    assert set(table.entries) == set(again.entries) and table.measured == len(table.entries) >= 2
    assert all(e["ms"] > 0 for e in table.entries.values())
    monkeypatch.setenv("FLIQS_COMPILE_WORKERS", "two")
    from fliqs_compiler.base.errors import FliqsError
    with pytest.raises(FliqsError, match="FLIQS_COMPILE_WORKERS"):
        devices.compile_workers()
    monkeypatch.setenv("FLIQS_COMPILE_WORKERS", "0")
    monkeypatch.setenv("FLIQS_RPC_PIPELINE", "0")  # compile everything first: the same entries
    _, first = api.profile(api.DEMO_MODEL, target=rpc, formats="int8", progress=False,
                           cache_dir=tmp_path / "unpipelined")
    assert set(first.entries) == set(table.entries) and not devices.pipelined()


def _kill_after(monkeypatch, farm, calls: int, server=None):
    """Make a real server vanish (SIGKILL) right after the ``calls``-th timing returns: a device
    lost in the middle of building the table. ``server``: that server's index; None: the server
    that ran the ``calls``-th timing, so it has measured before it is lost whichever device the
    tracker handed out first (a fixed index raced the tracker: when the first timings all went
    to the other device, the killed one had measured nothing)."""
    from fliqs_compiler.backends import rpc as R
    real_time, real_request, done, device_of = R.time_remote, R.request_device, [], {}

    def request(*args, **kwargs):
        lease = real_request(*args, **kwargs)
        device_of[id(lease.session)] = lease.device
        return lease

    def timed(lib_path, inputs, session, *args, **kwargs):
        ms = real_time(lib_path, inputs, session, *args, **kwargs)
        done.append(ms)
        if len(done) == calls:
            port = int(device_of[id(session)].rsplit(":", 1)[1])
            farm.kill_server(server if server is not None
                             else next(i for i, s in enumerate(farm.servers) if s.port == port))
        return ms
    monkeypatch.setattr(R, "request_device", request)
    monkeypatch.setattr(R, "time_remote", timed)
    return done


@pytest.mark.slow
def test_a_device_lost_mid_table_loses_only_its_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    with RpcFarm(key="fliqs-lose-one", servers_n=2) as farm:
        _kill_after(monkeypatch, farm, calls=2)
        _, table = api.profile(api.DEMO_MODEL, target=f"rpc://{farm.host}:{farm.port}/fliqs-lose-one?timeout=20",
                               formats="int8,int4", progress=False, cache_dir=tmp_path / "t")
        assert len(table.entries) == table.measured >= 4  # every entry, none lost
        assert len(set(table.measured_on.values())) == 2


@pytest.mark.slow
def test_the_only_device_lost_is_one_line_and_the_cache_resumes(monkeypatch, tmp_path):
    from fliqs_compiler.base.errors import FliqsError
    monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "t"
    with RpcFarm(key="fliqs-lose-all", servers_n=1) as farm:
        target = f"rpc://{farm.host}:{farm.port}/fliqs-lose-all?timeout=5"
        devices.resolve(parse_target(target))  # the device's target, cached before it dies
        _kill_after(monkeypatch, farm, server=0, calls=2)
        with pytest.raises(FliqsError) as e:
            api.profile(api.DEMO_MODEL, target=target, formats="int8,int4", progress=False, cache_dir=cache)
        assert "\n" not in str(e.value)
        monkeypatch.undo()
        monkeypatch.setenv("FLIQS_CACHE_DIR", str(tmp_path / "cache"))
        kept = [e for f in cache.glob("*.json") for e in json.loads(f.read_text())["entries"]]
        assert len(kept) == 2  # what was measured before the device died is in the cache
        farm.add_server()
        deadline = time.monotonic() + 60
        while farm.free() < 1 and time.monotonic() < deadline:  # the new device registers
            time.sleep(0.2)
        _, table = api.profile(api.DEMO_MODEL, target=target, formats="int8,int4", progress=False,
                               cache_dir=cache)
        assert table.measured == len(table.entries) - 2  # resumed: only the rest was measured

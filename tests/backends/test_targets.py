"""Target parsing: the accepted forms, their data, and one-line FliqsErrors for bad input."""
import json

import pytest

from fliqs_compiler.backends.targets import Target, parse_target
from fliqs_compiler.base.errors import FliqsError


def test_llvm_is_host_cpu_with_thread_count(monkeypatch, threads):
    monkeypatch.setenv("TVM_NUM_THREADS", str(threads))
    t = parse_target("llvm")
    assert t.kind == "tvm"
    assert t.tvm_target["kind"] == "llvm"
    assert t.tvm_target["num-cores"] == threads
    assert t.tvm_target["mcpu"] and t.tvm_target["mcpu"] != ""
    assert t.key == parse_target("llvm").key  # stable
    assert t.tvm().kind.name == "llvm"


def test_json_dict_target_gets_num_cores(threads):
    t = parse_target('{"kind": "llvm", "mcpu": "znver4"}')
    assert t.tvm_target == {"kind": "llvm", "mcpu": "znver4", "num-cores": threads}
    same = parse_target(json.dumps({"mcpu": "znver4", "num-cores": threads, "kind": "llvm"}))
    assert t.key == same.key  # key ignores key order
    assert t.key != parse_target('{"kind": "llvm", "mcpu": "skylake-avx512"}').key


def test_ort_target():
    t = parse_target("ort")
    assert t.kind == "ort" and t.tvm_target is None and t.key == "ort"
    with pytest.raises(FliqsError, match="not a TVM target"):
        t.tvm()


def test_rpc_parsed_with_its_options_and_no_host_cpu():
    t = parse_target("rpc://10.0.0.5:9190/rasp4")
    assert (t.rpc.host, t.rpc.port, t.rpc.key, t.rpc.priority, t.rpc.timeout) == \
        ("10.0.0.5", 9190, "rasp4", 1, 60.0)
    assert t.tvm_target is None and t.caps.device == "rpc" and t.caps.features == frozenset()
    with pytest.raises(FliqsError, match="not known yet"):  # asked of the device, never guessed
        t.tvm()
    board = '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"cortex-a72","num-cores":4}'
    t = parse_target(f"rpc://10.0.0.5:9190/rasp4?target={board}&priority=3&timeout=20")
    assert t.tvm_target["mcpu"] == "cortex-a72" and (t.rpc.priority, t.rpc.timeout) == (3, 20.0)
    assert t.key.startswith("rpc:rasp4:") and "10.0.0.5" not in t.key  # the device, not the tracker


@pytest.mark.parametrize("text, match", [
    ("cuda", "llvm, a JSON target dict"),
    ("", "not a known target"),
    ("llvm -mcpu=znver4", "rpc://HOST:PORT/KEY"),
    ('{"kind": "llvm", ', "invalid JSON"),
    ('{"kind": "cuda"}', '"kind": "llvm"'),
    ('{"kind": "llvm", "mcpu": 5}', "TVM rejects"),
    ("rpc://host:99999/key", "port in 1..65535"),
    ("rpc://host/key", "rpc://HOST:PORT/KEY"),
    ("rpc://host:9190/key?target=cortex", "not a JSON target dict"),
    ("rpc://host:9190/key?prio=2", "unknown option 'prio'"),
    ("rpc://host:9190/key?timeout=0", "positive number of seconds"),
])
def test_bad_targets_are_one_line_errors(text, match):
    with pytest.raises(FliqsError, match=match) as e:
        parse_target(text)
    assert "\n" not in str(e.value)


def test_target_passes_through():
    t = parse_target("ort")
    assert parse_target(t) is t and isinstance(t, Target)

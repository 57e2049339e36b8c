"""Target parsing: the accepted forms, their data, and one-line FliqsErrors for bad input."""
import json

import pytest

from fliqs_compiler.backends.targets import Target, parse_target
from fliqs_compiler.errors import FliqsError


def test_llvm_is_host_cpu_with_thread_count(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    t = parse_target("llvm")
    assert t.kind == "tvm"
    assert t.tvm_target["kind"] == "llvm"
    assert t.tvm_target["num-cores"] == 2
    assert t.tvm_target["mcpu"] and t.tvm_target["mcpu"] != ""
    assert t.key == parse_target("llvm").key  # stable
    assert t.tvm().kind.name == "llvm"


def test_json_dict_target_gets_num_cores():
    t = parse_target('{"kind": "llvm", "mcpu": "znver4"}')
    assert t.tvm_target == {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
    same = parse_target(json.dumps({"mcpu": "znver4", "num-cores": 2, "kind": "llvm"}))
    assert t.key == same.key  # key ignores key order
    assert t.key != parse_target('{"kind": "llvm", "mcpu": "skylake-avx512"}').key


def test_ort_target():
    t = parse_target("ort")
    assert t.kind == "ort" and t.tvm_target is None and t.key == "ort"
    with pytest.raises(FliqsError, match="not a TVM target"):
        t.tvm()


def test_rpc_parsed_but_not_supported():
    t = parse_target("rpc://10.0.0.5:9190/rasp4")
    assert t.rpc == ("10.0.0.5", 9190, "rasp4")
    assert t.key == "rpc:10.0.0.5:9190:rasp4"
    with pytest.raises(FliqsError, match="not supported yet"):
        t.require_local()


@pytest.mark.parametrize("text, match", [
    ("cuda", "llvm, a JSON target dict"),
    ("", "not a known target"),
    ("llvm -mcpu=znver4", "rpc://HOST:PORT/KEY"),
    ('{"kind": "llvm", ', "invalid JSON"),
    ('{"kind": "cuda"}', '"kind": "llvm"'),
    ('{"kind": "llvm", "mcpu": 5}', "TVM rejects"),
    ("rpc://host:99999/key", "port in 1..65535"),
    ("rpc://host/key", "rpc://HOST:PORT/KEY"),
])
def test_bad_targets_are_one_line_errors(text, match):
    with pytest.raises(FliqsError, match=match) as e:
        parse_target(text)
    assert "\n" not in str(e.value)


def test_target_passes_through():
    t = parse_target("ort")
    assert parse_target(t) is t and isinstance(t, Target)

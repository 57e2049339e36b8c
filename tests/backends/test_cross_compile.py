"""Cross-compiled ``export_library`` for a device whose triple is not the host's
(``targets.cross_compiler``, used by ``tvm_lower.lower``): an aarch64 target gives an AArch64 ELF
with no x86 kernel, and a triple without a cross compiler is a one-line FliqsError (exit 2)
naming the triple, the package and the variable — before any compile."""
from __future__ import annotations

import json
import shutil
import struct

import pytest

from fliqs_compiler.backends import tvm_kernels as K
from fliqs_compiler.backends.targets import (CROSS_CC_ENV, cpu_features, cross_compiler,
                                             host_triple, parse_target, same_triple)
from fliqs_compiler.backends.tvm_lower import lower
from fliqs_compiler.base.errors import FliqsError
from tvm_models import ConvLinear, graph_of

pytestmark = pytest.mark.tvm

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}
EM_AARCH64 = 183
X86_KERNEL_FEATURES = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni",
                       "avx512bf16"}


def _e_machine(path) -> int:
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    endian = "<" if head[5] == 1 else ">"
    return struct.unpack(endian + "H", head[18:20])[0]


def test_aarch64_target_gets_no_x86_kernels():
    caps = parse_target(json.dumps(AARCH64)).caps
    assert not caps.features & X86_KERNEL_FEATURES
    assert K.kernels_for(caps) == []
    # an x86 mcpu name on an aarch64 triple does not bring x86 features either
    assert cpu_features({**AARCH64, "mcpu": "znver4"}) == frozenset()
    assert "avx512vnni" in cpu_features({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})


def test_host_triple_needs_no_cross_compiler():
    assert cross_compiler(parse_target("llvm")) is None
    host = host_triple()
    assert host and same_triple(host, "x86_64-linux-gnu") == host.startswith("x86_64")
    assert cross_compiler(parse_target(json.dumps({"kind": "llvm", "mtriple": host}))) is None


def test_rpc_cc_option_keeps_plus():
    t = parse_target("rpc://127.0.0.1:9190/pi?cc=aarch64-linux-gnu-g++&target=" + json.dumps(AARCH64))
    assert t.cc == "aarch64-linux-gnu-g++" and t.tvm_target["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(FliqsError, match="cc= needs a compiler"):
        parse_target("rpc://127.0.0.1:9190/pi?cc=")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64-linux-gnu-g++ not on PATH (Debian: apt-get install g++-aarch64-linux-gnu)")
def test_aarch64_export_is_an_aarch64_elf(tmp_path, monkeypatch):
    monkeypatch.delenv(CROSS_CC_ENV, raising=False)
    low = lower(graph_of(ConvLinear("int8", "int8")), json.dumps(AARCH64), tmp_path)
    assert low.path == tmp_path / "tvm" / "model.so"
    assert _e_machine(low.path) == EM_AARCH64
    assert not low.target.caps.features & X86_KERNEL_FEATURES
    for name, entry in low.executed.items():
        assert entry["kernel"] == "int8", (name, entry)  # plain int8 loops, no x86 kernel
        assert "vpdpbusd" not in entry and "prepacked" not in entry["weight_storage"]
    assert low.instruction_counts == {"vpdpbusd": 0, "vdpbf16ps": 0}


def test_missing_cross_compiler_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(CROSS_CC_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no riscv64-linux-gnu-g++ here
    target = json.dumps({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "num-cores": 1})
    with pytest.raises(FliqsError) as e:
        lower(graph_of(ConvLinear("int8", "int8")), target, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert "'riscv64-linux-gnu'" in msg and "apt-get install g++-riscv64-linux-gnu" in msg
    assert CROSS_CC_ENV in msg and "cc=" in msg
    assert not (tmp_path / "out").exists()  # raised before any compile or write


def test_named_cross_compiler_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv(CROSS_CC_ENV, "no-such-cross-g++")
    with pytest.raises(FliqsError, match=f"no-such-cross-g\\+\\+.*{CROSS_CC_ENV}"):
        cross_compiler(parse_target(json.dumps(AARCH64)))

"""The TVM 0.27 fixes of ``backends/tvm_compat.py``: quantizer loops vectorize (and round as
before), and the tensor-intrinsic import's shortcut answers exactly what ``inspect.getmodule``
answers, on the frames of a real import, leaving inspect as it found it."""
import importlib
import inspect
import re
import sys

import numpy as np
import pytest

from fliqs_compiler.backends import tvm_compat as TC

tvm = pytest.importorskip("tvm")


def _quantizer_build():
    """A rule-scheduled build of one uint8 quantizer (divide, round half even, clip, cast) over
    a [1, 28, 28, 16] NHWC activation, as a model's standalone quantize is built."""
    from tvm import relax
    from fliqs_compiler.backends import tvm_schedules
    from fliqs_compiler.backends.targets import parse_target
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 28, 28, 16), "float32"))
    with bb.function("main", [x]):
        op = relax.op
        s = relax.const(np.float32(0.0107))
        q = op.astype(op.clip(op.round(op.divide(x, s)), 0, 255), "uint8")
        bb.emit_func_output(bb.emit(q))
    tgt = parse_target("llvm").tvm()
    with tgt:
        mod = relax.transform.LegalizeOps()(bb.get())
    scheduled, _ = tvm_schedules.schedule(mod, tgt)
    ex, reverted = tvm_schedules.build(scheduled, mod, tgt)
    assert not reverted
    return ex


def _asm(ex) -> str:
    return ex.mod.imports[0].inspect_source("asm")


def _run(ex, x):
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_quantizer_loop_is_vector_code_and_rounds_half_even():
    op = tvm.ir.Op.get("tirx.nearbyint")
    x = np.random.default_rng(0).normal(0, 1, (1, 28, 28, 16)).astype(np.float32)
    x.reshape(-1)[:64] = (np.arange(64, dtype=np.float32) / 2) * np.float32(0.0107)  # ties
    op.reset_attr("TVectorizable")  # TVM 0.27 as shipped: the control
    try:
        scalar = _quantizer_build()
    finally:
        TC.vectorizable_nearbyint()
    vector = _quantizer_build()
    assert "vgatherqps" in _asm(scalar) or "vpextrb" in _asm(scalar)  # the control shows the bug
    asm = _asm(vector)
    assert "vrndscaleps" in asm and not re.search(r"vgather|vpextrb", asm)
    want = np.clip(np.round(x / np.float32(0.0107)), 0, 255).astype(np.uint8)  # numpy: half even
    assert np.array_equal(_run(vector, x), want) and np.array_equal(_run(scalar, x), want)


def test_shortcut_answers_what_getmodule_answers_on_an_imports_frames(tmp_path, monkeypatch):
    (tmp_path / "fliqs_probe_mod.py").write_text(
        "import inspect\n"
        "FRAMES = [f.frame for f in inspect.stack(context=0)]\n"
        "exec(compile('PSEUDO = inspect.currentframe()', '<pseudo>', 'exec'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("fliqs_probe_mod")
    frames = mod.FRAMES + [mod.PSEUDO]
    files = [f.f_code.co_filename for f in frames]
    assert any(f.startswith("<frozen") for f in files) and "<pseudo>" in files  # the case it skips
    real = inspect.getmodule
    fast = TC._getmodule_without_pseudo_file_scan(real)
    for frame, file in zip(frames, files):
        assert fast(frame, file) is real(frame, file), file
    assert fast(TC, None) is real(TC, None) is TC  # anything else goes to the real one
    sys.modules.pop("fliqs_probe_mod", None)


def test_builder_setup_restores_inspect_and_registers_the_intrinsics():
    real = inspect.getmodule
    TC.builder_worker_setup()
    assert inspect.getmodule is real
    from tvm.s_tir import TensorIntrin
    assert TensorIntrin.get("dot_16x4_vnni") is not None
    assert tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable")

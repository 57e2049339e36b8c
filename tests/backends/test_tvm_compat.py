"""The tensor-intrinsic import's shortcut (``backends/tvm_tensor_intrin.py``) answers exactly what
``inspect.getmodule`` answers, on the frames of a real import, and leaves inspect as it found it."""
import importlib
import inspect
import sys

from fliqs_compiler.backends import tvm_tensor_intrin as TI


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
    fast = TI._getmodule_without_pseudo_file_scan(real)
    for frame, file in zip(frames, files):
        assert fast(frame, file) is real(frame, file), file
    assert fast(TI, None) is real(TI, None) is TI  # anything else goes to the real one
    sys.modules.pop("fliqs_probe_mod", None)


def test_import_restores_inspect_and_registers_the_intrinsics():
    real = inspect.getmodule
    TI.import_tensor_intrin()
    assert inspect.getmodule is real
    from tvm.s_tir import TensorIntrin
    assert TensorIntrin.get("dot_16x4_vnni") is not None

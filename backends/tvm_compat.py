"""Two fixes for TVM 0.27 behaviours measured on this project's 2-core Zen 4, applied before
every build (``tvm_lower.compile_module``) and in MetaSchedule's builder workers
(``builder_worker_setup``, their ``initializer``).

**Rounding that vectorizes.** Relax's ``round`` (every quantizer: ``x / s``, round half even,
clip, cast) legalizes to ``tirx.nearbyint``, and TVM 0.27 does not mark that op ``TVectorizable``
(``tirx.round``, ``exp``, ``floor`` … are): its loop vectorizer then scalarizes the whole loop
body, and LLVM rebuilds it from gathers and per-byte extracts. Measured, 1 thread: quantizing a
[1, 112, 112, 16] tensor to uint8 took 0.18 ms, a plain cast of it 0.010 ms; all-int8
MobileNetV2 2.82 → 2.58–2.84 ms (ResNet-18: no change). ``vectorizable_nearbyint`` sets the
attribute: the op, and so the rounding, stays the same (LLVM's ``nearbyint``, ties to even); only
the vectorizer's choice changes.

**Importing the tensor-intrinsic library in seconds.** MetaSchedule imports
``tvm.s_tir.tensor_intrin`` in every ``TuneContext`` and in every ``LocalBuilder`` worker. Its
~260 TVMScript ``prim_func`` definitions each call ``inspect.stack()``, which asks
``inspect.getmodule`` for every frame on the stack; for the frames of the import machinery (file
``<frozen importlib._bootstrap>``) no module ever matches, so each of those ~40,000 calls scans all
of ``sys.modules``. Measured: 25 s for the import in a bare process, 5.6 s with the scan skipped —
a one-trial ``--tune-trials`` run spent about a minute in it. Skipping is exact: for a frame whose
file is a ``<pseudo-file>`` the scan finds nothing and ``getmodule`` then returns None, because a
frame has no ``__name__`` to match ``__main__`` by.
"""
from __future__ import annotations

import contextlib
import inspect
import threading

__all__ = ["vectorizable_nearbyint", "import_tensor_intrin", "builder_worker_setup"]


_REGISTER = threading.Lock()  # TVM refuses a second registration of the same attribute


def vectorizable_nearbyint() -> None:
    """Mark ``tirx.nearbyint`` vectorizable, as TVM marks ``tirx.round`` (idempotent, and safe
    from concurrent compile threads)."""
    import tvm
    with _REGISTER:
        if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
            tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


def _getmodule_without_pseudo_file_scan(real):
    def getmodule(obj, _filename=None):
        if _filename is not None and _filename.startswith("<") and inspect.isframe(obj):
            return None  # what the full scan would return, without the scan
        return real(obj, _filename)
    getmodule.__wrapped__ = real
    return getmodule


@contextlib.contextmanager
def _pseudo_file_frames_unscanned():
    real = inspect.getmodule
    inspect.getmodule = _getmodule_without_pseudo_file_scan(real)
    try:
        yield
    finally:
        inspect.getmodule = real


def import_tensor_intrin() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (registering its intrinsics) with the scan skipped.
    Idempotent."""
    with _pseudo_file_frames_unscanned():
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)


def builder_worker_setup() -> None:
    """MetaSchedule ``LocalBuilder`` ``initializer``: the worker builds candidates as this
    process builds the model, and imports the intrinsic library (its first build would) fast."""
    vectorizable_nearbyint()
    import_tensor_intrin()

"""Import TVM's tensor-intrinsic library (``tvm.s_tir.tensor_intrin``) in seconds, not half a minute.

MetaSchedule imports that library in every ``TuneContext`` and in every ``LocalBuilder`` worker
process. Its ~260 TVMScript ``prim_func`` definitions each call ``inspect.stack()``, which asks
``inspect.getmodule`` for every frame on the stack; for the frames of the import machinery (file
``<frozen importlib._bootstrap>``) no module ever matches, so each of those ~40,000 calls scans all
of ``sys.modules``. Measured on the 2-core box: 25 s for the import in a bare process, 5.6 s with
the scan skipped — so a one-trial ``--tune-trials`` run spent about a minute in it (in the tuning
process and again in each builder worker).

Skipping is exact: for a frame whose file is a ``<pseudo-file>`` the scan finds nothing and
``getmodule`` then returns None, because a frame has no ``__name__`` to match ``__main__`` by.
"""
from __future__ import annotations

import contextlib
import inspect


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
    Idempotent; also the ``initializer`` of MetaSchedule's builder workers, which import it on
    their first build."""
    with _pseudo_file_frames_unscanned():
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)

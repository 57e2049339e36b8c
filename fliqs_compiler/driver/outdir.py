"""The output folder of a run: created and probed up front, final files staged in a hidden folder
and moved in only when the whole run succeeded (``staging`` → ``publish``), and on failure put
back as it was except the search checkpoint that ``--resume`` needs (``out_dir``)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from fliqs_compiler.base.errors import FliqsError

STAGING = ".fliqs-partial"


def model_stem(model) -> str:
    """The default output folder's name: the file stem of a path, the class name of a module."""
    if isinstance(model, (str, Path)):
        return Path(model).stem or "model"
    return type(model).__name__.lower()


def default_path(out, model) -> Path:
    """``out``, or ``./fliqs-out/<model stem>/`` (nothing created)."""
    return Path(out) if out is not None else Path("fliqs-out") / model_stem(model)


def resolve_out_dir(out, model) -> Path:
    """``out`` or ``./fliqs-out/<model stem>/``; created and probed for writing up front.
    Not a folder / not writable → FliqsError (nothing left behind)."""
    path = default_path(out, model)
    if path.exists() and not path.is_dir():
        raise FliqsError(f"--out {path}: exists and is not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fliqs-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FliqsError(f"--out {path}: not writable ({e.strerror or e}); choose a folder you can "
                         "write to") from None
    return path


def staging(out: Path) -> Path:
    """A fresh, empty hidden staging folder inside ``out`` (a stale one from a killed run goes)."""
    stage = out / STAGING
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    return stage


def publish(stage: Path, out: Path) -> dict:
    """Move every file of ``stage`` into ``out`` (same relative path, ``os.replace``), then drop
    ``stage``. Returns ``{relative path: final Path}``."""
    moved = {}
    for src in sorted(p for p in stage.rglob("*") if p.is_file()):
        rel = src.relative_to(stage)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o644)
        os.replace(src, dst)
        moved[str(rel)] = dst
    shutil.rmtree(stage, ignore_errors=True)
    return moved


def first_missing_ancestor(path: Path) -> Optional[Path]:
    """The outermost folder of ``path`` that does not exist yet (what a run would create)."""
    missing = None
    p = path.absolute()
    while not p.exists():
        missing = p
        p = p.parent
    return missing


KEEP_ON_FAILURE = ("checkpoint", "search.jsonl", "sweep")  # what --resume needs


def cleanup_failed(out: Path, created: Optional[Path], before: set) -> None:
    """After a failure: remove what this run added to ``out`` except the search checkpoint and
    its step log (kept for ``--resume``), then the folders this run created if they are empty."""
    for p in list(out.iterdir()) if out.is_dir() else []:
        if p.name in before or p.name in KEEP_ON_FAILURE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if created is None:
        return
    out = out.absolute()
    for d in [out, *out.parents]:
        if d != created and created not in d.parents:
            break
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            break


@contextmanager
def out_dir(out, model):
    """The output folder (``out`` or ``./fliqs-out/<model stem>/``), created and probed; if the
    body fails, ``cleanup_failed`` leaves it as it was (plus the checkpoint)."""
    out_path = default_path(out, model)
    created = first_missing_ancestor(out_path)
    path = resolve_out_dir(out_path, model)
    before = {p.name for p in path.iterdir()}
    try:
        yield path
    except BaseException:
        cleanup_failed(path, created, before)
        raise

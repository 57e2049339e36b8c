"""Atomic writes: a failure at any point leaves the old file and no temporary behind."""
import pytest

from fliqs_compiler.base import atomic


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic.write_text(target, "old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_failed_rename_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        atomic.write_text(target, "new", fsync=True)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_error_inside_writer_keeps_old_file(tmp_path):
    target = tmp_path / "model.so"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target, suffix=".so") as tmp:
            assert tmp.endswith(".so")
            open(tmp, "wb").write(b"half")
            raise RuntimeError("compiler crashed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.so"]

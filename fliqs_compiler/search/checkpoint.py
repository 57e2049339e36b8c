"""Search checkpoints and the ``search.jsonl`` step log, both crash-safe.

A checkpoint is one ``torch.save`` of plain dicts/tensors at ``out_dir/checkpoint/state.pt``
(weights and per-format scales via ``state_dict``, optimizer states, controller logits / Adam /
baseline, generator and global RNG states, the step), written to a temporary file and moved into
place with ``os.replace``, so a kill at any instant leaves either the old or the new checkpoint.
It is read back with ``torch.load(weights_only=True)``.

The log gets one JSON line per step, each written with a single ``write`` and flushed. On resume
the log is cut back (atomically) to the steps the checkpoint covers, so lines a killed run wrote
after its last checkpoint are replaced by the resumed run's identical ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.base import atomic

__all__ = ["CHECKPOINT_DIR", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "StepLog", "atomic_write_text"]

CHECKPOINT_DIR = "checkpoint"
_FILE = "state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    atomic.write_text(path, text, fsync=True)


def checkpoint_path(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / _FILE


def save_checkpoint(out_dir, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, nested dicts/lists) atomically."""
    path = checkpoint_path(out_dir)
    with atomic.replacing(path, fsync=True) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(out_dir) -> Optional[dict]:
    """The saved state, or None when there is no checkpoint. A corrupt file is a FliqsError."""
    path = checkpoint_path(out_dir)
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")  # any device resumes it
    except Exception as e:  # noqa: BLE001
        raise FliqsError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete "
                         f"{path.parent} and rerun without --resume") from None


class StepLog:
    """Appends one JSON object per line to ``path``."""

    def __init__(self, path, keep_through_step: Optional[int] = None):
        """Start a fresh log, or (``keep_through_step`` = s) keep the lines with ``step <= s``."""
        self.path = Path(path)
        kept = []
        if keep_through_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
                if rec.get("step", -1) <= keep_through_step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path) -> list:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""The machine and library versions a run used (``report.json`` → ``environment``)."""
from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["environment"]

CPUINFO = Path("/proc/cpuinfo")


def tvm_version() -> str:
    """The installed apache-tvm version, read from package metadata (importing tvm is slow)."""
    try:
        from importlib.metadata import version
        return version("apache-tvm")
    except Exception:  # noqa: BLE001 — no TVM is a valid install for the ort target
        return "unavailable"


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # no /proc (not Linux): platform's name above stands
    return cpu


def environment() -> dict:
    """Threads and library versions for ``report.json`` (``environment``)."""
    import onnxruntime
    import torch
    return {"threads": int(torch.get_num_threads()), "torch": torch.__version__,
            "tvm": tvm_version(), "onnxruntime": onnxruntime.__version__, "cpu": cpu_name()}

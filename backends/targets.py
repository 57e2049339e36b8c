"""Compilation targets as data: what ``--target TEXT`` means.

Accepted forms (``parse_target``):

- ``llvm`` — the host CPU through TVM: ``{"kind": "llvm", "mcpu": <detected>, "num-cores": N}``
  with ``mcpu`` from ``tvm.target.codegen.llvm_get_system_cpu()`` and ``N`` the thread count
  (``TVM_NUM_THREADS``, default 2 on this project's machines).
- a JSON target dict, e.g. ``{"kind":"llvm","mcpu":"znver4","num-cores":2}`` (TVM 0.27 accepts
  only dicts; ``num-cores`` is added when missing because MetaSchedule needs it).
- ``ort`` — onnxruntime's CPU execution provider (no TVM).
- ``rpc://HOST:PORT/KEY`` — a TVM RPC tracker. Parsed and validated, but running on it is not
  implemented yet: ``Target.require_local()`` raises a FliqsError saying so.

A ``Target`` is plain data: ``kind`` ('tvm' | 'ort'), ``tvm_target`` (dict or None), ``key`` (a
stable string for caches: same target → same key, across processes), ``text`` (what the user
wrote), ``rpc`` (host, port, key) or None. Adding a target form is adding an entry to ``_FORMS``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from fliqs_compiler.errors import FliqsError

__all__ = ["Target", "parse_target", "default_threads", "host_cpu", "VALID_FORMS"]

VALID_FORMS = ("llvm", 'a JSON target dict such as {"kind":"llvm","mcpu":"znver4","num-cores":2}',
               "ort", "rpc://HOST:PORT/KEY")


def default_threads() -> int:
    """Threads used for TVM runs: ``TVM_NUM_THREADS`` if set, else 2 (the project's rule)."""
    try:
        return max(1, int(os.environ.get("TVM_NUM_THREADS", "2")))
    except ValueError:
        return 2


def host_cpu() -> str:
    """LLVM's name for the host CPU (e.g. ``znver4``); 'generic' when TVM cannot tell."""
    os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
    import tvm  # noqa: F401  (imported late: keeps `import targets` light)
    from tvm.target import codegen
    try:
        return str(codegen.llvm_get_system_cpu()) or "generic"
    except Exception:  # noqa: BLE001 — a build without the LLVM helper
        return "generic"


@dataclass(frozen=True)
class Target:
    """A parsed target. ``tvm_target`` is a JSON-able dict for ``tvm.target.Target``."""

    kind: str  # 'tvm' | 'ort'
    text: str
    tvm_target: Optional[dict] = None
    rpc: Optional[tuple] = None  # (host, port, key)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable cache key: the kind plus the sorted target dict (or the RPC address)."""
        if self.rpc:
            return f"rpc:{self.rpc[0]}:{self.rpc[1]}:{self.rpc[2]}"
        if self.tvm_target is None:
            return self.kind
        return "tvm:" + json.dumps(self.tvm_target, sort_keys=True, separators=(",", ":"))

    @property
    def threads(self) -> int:
        if self.tvm_target and "num-cores" in self.tvm_target:
            return int(self.tvm_target["num-cores"])
        return default_threads()

    @property
    def mcpu(self) -> str:
        return str((self.tvm_target or {}).get("mcpu", ""))

    def tvm(self):
        """The ``tvm.target.Target`` object (TVM targets only)."""
        self.require_local()
        if self.tvm_target is None:
            raise FliqsError(f"target {self.text!r} is not a TVM target; use 'llvm' or a JSON "
                             "target dict for TVM lowering")
        import tvm
        return tvm.target.Target(self.tvm_target)

    def require_local(self) -> "Target":
        """Raise a FliqsError for targets that cannot run in this process (RPC)."""
        if self.rpc:
            raise FliqsError(f"target {self.text!r}: RPC targets are parsed but not supported yet; "
                             "use --target llvm (host CPU) or a JSON target dict")
        return self

    def __str__(self):
        return self.text


def _llvm(text: str) -> Optional[Target]:
    if text != "llvm":
        return None
    return Target("tvm", text, {"kind": "llvm", "mcpu": host_cpu(), "num-cores": default_threads()})


def _json(text: str) -> Optional[Target]:
    if not text.startswith("{"):
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise FliqsError(f"--target: invalid JSON target dict ({e.msg} at char {e.pos}); write e.g. "
                         '{"kind":"llvm","mcpu":"znver4","num-cores":2}') from None
    if not isinstance(d, dict) or d.get("kind") != "llvm":
        raise FliqsError(f"--target {text!r}: a JSON target needs \"kind\": \"llvm\" (the only TVM "
                         "kind supported here)")
    d = dict(d)
    d.setdefault("num-cores", default_threads())
    try:
        import tvm
        tvm.target.Target(d)
    except Exception as e:  # noqa: BLE001 — TVM's own validation message
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FliqsError(f"--target {text!r}: TVM rejects this target dict: {msg}") from None
    return Target("tvm", text, d)


def _ort(text: str) -> Optional[Target]:
    if text not in ("ort", "onnxruntime"):
        return None
    return Target("ort", text, None, extra={"provider": "CPUExecutionProvider"})


_RPC_RE = re.compile(r"^rpc://(?P<host>[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/(?P<key>[A-Za-z0-9_.\-]+)$")


def _rpc(text: str) -> Optional[Target]:
    if not text.startswith("rpc://"):
        return None
    m = _RPC_RE.match(text)
    if not m or not (0 < int(m["port"]) < 65536):
        raise FliqsError(f"--target {text!r}: expected rpc://HOST:PORT/KEY with a port in 1..65535")
    return Target("tvm", text, {"kind": "llvm", "num-cores": default_threads()},
                  rpc=(m["host"], int(m["port"]), m["key"]))


# Target forms, tried in order; each returns a Target, None (not this form) or raises FliqsError.
_FORMS: list[Callable[[str], Optional[Target]]] = [_llvm, _json, _ort, _rpc]


def parse_target(text) -> Target:
    """Parse ``--target`` text into a ``Target`` (a Target passes through).

    Raises FliqsError naming the valid forms when ``text`` matches none of them.
    """
    if isinstance(text, Target):
        return text
    t = str(text or "").strip()
    for form in _FORMS:
        target = form(t)
        if target is not None:
            return target
    raise FliqsError(f"--target {text!r} is not a known target; use one of: " + ", ".join(VALID_FORMS))

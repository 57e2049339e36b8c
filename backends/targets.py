"""Compilation targets as data: what ``--target TEXT`` means.

Accepted forms (``parse_target``):

- ``llvm`` — the host CPU through TVM: ``{"kind": "llvm", "mcpu": <detected>, "num-cores": N}``
  with ``mcpu`` from ``tvm.target.codegen.llvm_get_system_cpu()`` and ``N`` the thread count
  (``TVM_NUM_THREADS``, default 2 on this project's machines).
- a JSON target dict, e.g. ``{"kind":"llvm","mcpu":"znver4","num-cores":2}`` (TVM 0.27 accepts
  only dicts; ``num-cores`` is added when missing because MetaSchedule needs it).
- ``ort`` — onnxruntime's CPU execution provider (no TVM).
- ``rpc://HOST:PORT/KEY[?target=<JSON target dict>&priority=N&timeout=S&cc=COMPILER]`` — a
  device behind a TVM RPC tracker. Without ``target=`` the device is asked for its own LLVM target
  (``backends.devices.resolve``, through the backend's ``resolve``); nothing uses the host CPU.
  ``cc=``: the cross compiler that links libraries for the device when its ``mtriple`` differs
  from the host's (``cross_compiler``; default ``$FLIQS_CROSS_CC``, else ``<mtriple>-g++``).

A ``Target`` is plain data: ``kind`` (the backend that runs it: 'tvm' | 'ort', a name in
``backends.registry``), ``tvm_target`` (dict or None), ``key`` (a stable string for caches: same
target → same key, across processes), ``text`` (what the user wrote), ``rpc`` (host, port, key)
or None, and ``caps``: its ``Capabilities`` (instruction-set features, threads, host or remote
device), read from data tables (``CPU_FEATURES``), never from names at the point of use.
Adding a target form is adding an entry to ``_FORMS``; adding a CPU is a row of ``CPU_FEATURES``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from fliqs_compiler.base.errors import FliqsError

__all__ = ["Target", "Capabilities", "CPU_FEATURES", "parse_target", "register_form",
           "unregister_form", "default_threads", "host_cpu", "host_triple", "same_triple",
           "cross_compiler", "CROSS_CC_ENV", "VALID_FORMS"]

VALID_FORMS = ("llvm", 'a JSON target dict such as {"kind":"llvm","mcpu":"znver4","num-cores":2}',
               "ort", "rpc://HOST:PORT/KEY[?target=<JSON target dict>&priority=N&timeout=S&cc=COMPILER]")


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


def host_triple() -> str:
    """LLVM's triple for this host (e.g. ``x86_64-pc-linux-gnu``); '' when TVM cannot tell."""
    import tvm  # noqa: F401
    from tvm.target import codegen
    try:
        return str(codegen.llvm_get_system_triple())
    except Exception:  # noqa: BLE001 — a build without the LLVM helper
        return ""


_VENDORS = frozenset({"pc", "unknown", "none", "conda", "redhat", "suse", "w64", "apple"})


def _triple_parts(triple: str) -> tuple:
    """(arch, os, env...) of an LLVM triple, the vendor dropped: ``x86_64-pc-linux-gnu``,
    ``x86_64-conda-linux-gnu`` and ``x86_64-linux-gnu`` all give ('x86_64', 'linux', 'gnu')."""
    parts = str(triple).strip().lower().split("-")
    if len(parts) >= 4 or (len(parts) == 3 and parts[1] in _VENDORS):
        parts = parts[:1] + parts[2:]
    return tuple(parts)


def same_triple(a: str, b: str) -> bool:
    """True when two LLVM triples name the same architecture and OS (vendors ignored)."""
    return _triple_parts(a) == _triple_parts(b)


def _is_x86(tvm_target: Optional[dict]) -> bool:
    """The target dict builds for x86: no ``mtriple`` (the host's, LLVM's default) or an x86 one."""
    triple = str((tvm_target or {}).get("mtriple") or "")
    if not triple:
        return True
    arch = _triple_parts(triple)[0]
    return arch in ("x86_64", "amd64", "x86", "i386", "i486", "i586", "i686")


# Instruction-set features per LLVM CPU name, for the features lowering rules choose kernels by
# (``tvm_kernels.KERNELS``' ``needs``). A target dict may add or remove features through
# ``mattr`` ("+avx512vnni", "-avx512bf16"). Rows are LLVM names as ``llvm_get_system_cpu`` reports.
_AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})
_VNNI = _AVX512 | {"avx512vnni"}
_BF16 = _VNNI | {"avx512bf16"}
CPU_FEATURES: dict[str, frozenset] = {
    **{cpu: frozenset({"avx2", "fma"}) for cpu in ("haswell", "broadwell", "skylake", "znver2", "znver3")},
    **{cpu: _AVX512 for cpu in ("skylake-avx512", "cannonlake")},
    **{cpu: frozenset(_VNNI) for cpu in ("cascadelake", "icelake-client", "icelake-server",
                                         "tigerlake", "rocketlake")},
    "alderlake": frozenset({"avx2", "fma", "avxvnni"}),
    **{cpu: frozenset(_BF16) for cpu in ("cooperlake", "sapphirerapids", "emeraldrapids", "graniterapids",
                                         "graniterapids-d", "diamondrapids", "znver4", "znver5")},
}


@dataclass(frozen=True)
class Capabilities:
    """What a target can execute, as data: instruction-set ``features`` (``CPU_FEATURES`` plus the
    target dict's ``mattr``), ``threads``, and ``device`` ('host': this process; 'rpc': a remote
    device behind a TVM RPC tracker). Which formats a target runs natively per role depends on
    the backend too: ``backends.registry.Backend.caps(target)`` adds that."""

    features: frozenset = frozenset()
    threads: int = 1
    device: str = "host"
    native: dict = field(default_factory=dict)  # role ('weight' | 'activation') → frozenset of formats

    def has(self, *features: str) -> bool:
        """True when every one of ``features`` is available (e.g. ``caps.has("avx512vnni")``)."""
        return all(f in self.features for f in features)

    def as_dict(self) -> dict:
        return {"features": sorted(self.features), "threads": self.threads, "device": self.device,
                "native": {role: sorted(f) for role, f in self.native.items()}}


def cpu_features(tvm_target: Optional[dict]) -> frozenset:
    """``CPU_FEATURES[mcpu]`` adjusted by the target dict's ``mattr`` (+feature / -feature)."""
    if not tvm_target:
        return frozenset()
    # CPU_FEATURES rows are x86 CPUs: an aarch64 (or other non-x86) mtriple never gets them, even
    # with an x86 mcpu name in the dict; only its own mattr features count then.
    features = set(CPU_FEATURES.get(str(tvm_target.get("mcpu", "")), ()) if _is_x86(tvm_target) else ())
    mattr = tvm_target.get("mattr") or []
    for item in mattr.split(",") if isinstance(mattr, str) else mattr:
        item = str(item).strip()
        if item[:1] == "+":
            features.add(item[1:])
        elif item[:1] == "-":
            features.discard(item[1:])
    return frozenset(features)


@dataclass(frozen=True)
class Target:
    """A parsed target. ``tvm_target`` is a JSON-able dict for ``tvm.target.Target``."""

    kind: str  # 'tvm' | 'ort'
    text: str
    tvm_target: Optional[dict] = None
    rpc: Optional[RpcAddress] = None  # a remote device behind a tracker
    cc: Optional[str] = None  # cross compiler for export_library (rpc ``cc=``); see cross_compiler

    @property
    def key(self) -> str:
        """Stable cache key: the kind plus the sorted target dict; for a remote device its key and
        its own target dict (never the tracker's address: a device is the same device behind
        any tracker)."""
        if self.rpc:
            return f"rpc:{self.rpc.key}:" + json.dumps(self.tvm_target, sort_keys=True, separators=(",", ":"))
        if self.tvm_target is None:
            return self.kind
        return "tvm:" + json.dumps(self.tvm_target, sort_keys=True, separators=(",", ":"))

    @property
    def threads(self) -> int:
        if self.tvm_target and "num-cores" in self.tvm_target:
            return int(self.tvm_target["num-cores"])
        return default_threads()

    @property
    def caps(self) -> Capabilities:
        """The target's own capabilities (features, threads, host or rpc device)."""
        return Capabilities(cpu_features(self.tvm_target), self.threads,
                            "rpc" if self.rpc else "host")

    @property
    def mcpu(self) -> str:
        return str((self.tvm_target or {}).get("mcpu", ""))

    def tvm(self):
        """The ``tvm.target.Target`` object (TVM targets only; an ``rpc://`` one once resolved)."""
        if self.tvm_target is None:
            if self.rpc:
                raise FliqsError(f"target {self.text!r}: the device's target is not known yet; "
                                 "resolve it first (backends.devices.resolve) or pass target=<JSON>")
            raise FliqsError(f"target {self.text!r} is not a TVM target; use 'llvm' or a JSON "
                             "target dict for TVM lowering")
        import tvm
        return tvm.target.Target(self.tvm_target)

    def __str__(self):
        return self.text


def _llvm(text: str) -> Optional[Target]:
    if text != "llvm":
        return None
    return Target("tvm", text, {"kind": "llvm", "mcpu": host_cpu(), "num-cores": default_threads()})


def _json(text: str, option: str = "") -> Optional[Target]:
    if not text.startswith("{"):
        if option:
            raise FliqsError(f"{option}{text!r} is not a JSON target dict; write e.g. "
                             '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"cortex-a72","num-cores":4}')
        return None
    option = option or f"--target {text!r}: "
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise FliqsError(f"{option}invalid JSON target dict ({e.msg} at char {e.pos}); write e.g. "
                         '{"kind":"llvm","mcpu":"znver4","num-cores":2}') from None
    if not isinstance(d, dict) or d.get("kind") != "llvm":
        raise FliqsError(f"{option}a JSON target needs \"kind\": \"llvm\" (the only TVM "
                         "kind supported here)")
    d = dict(d)
    d.setdefault("num-cores", default_threads())
    try:
        import tvm
        tvm.target.Target(d)
    except Exception as e:  # noqa: BLE001 — TVM's own validation message
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise FliqsError(f"{option}TVM rejects this target dict: {msg}") from None
    return Target("tvm", text, d)


def _ort(text: str) -> Optional[Target]:
    if text not in ("ort", "onnxruntime"):
        return None
    return Target("ort", text, None)  # onnxruntime's CPUExecutionProvider


_RPC_RE = re.compile(r"^rpc://(?P<host>[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/(?P<key>[A-Za-z0-9_.\-]+)"
                     r"(?:\?(?P<query>.*))?$")
_RPC_USAGE = "rpc://HOST:PORT/KEY[?target=<JSON target dict>&priority=N&timeout=S&cc=COMPILER]"


@dataclass(frozen=True)
class RpcAddress:
    """Where a remote device is: the tracker (``host``:``port``), the device ``key``, the request
    ``priority`` and how long to wait for a free device (``timeout`` seconds)."""

    host: str
    port: int
    key: str
    priority: int = 1
    timeout: float = 60.0


def _rpc_query(text: str, query: str) -> dict:
    """``target=<JSON>&priority=N&timeout=S&cc=COMPILER`` → checked values (unknown keys are
    errors)."""
    from urllib.parse import parse_qs
    out = {}
    try:
        items = parse_qs(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise FliqsError(f"--target {text!r}: cannot read the query; expected {_RPC_USAGE}") from None
    for name, values in items.items():
        value = values[-1]
        if name == "target":
            out["tvm_target"] = _json(value, option=f"--target {text!r}: target=").tvm_target
        elif name in ("priority", "timeout"):
            try:
                number = int(value) if name == "priority" else float(value)
                if number <= 0 and name == "timeout":
                    raise ValueError
            except ValueError:
                raise FliqsError(f"--target {text!r}: {name}={value!r} is not a "
                                 f"{'integer' if name == 'priority' else 'positive number of seconds'}") from None
            out[name] = number
        elif name == "cc":
            # read raw: a '+' in a compiler name (g++) is a plus, not a URL-encoded space
            from urllib.parse import unquote
            value = unquote([p for p in query.split("&") if p.startswith("cc=")][-1][3:])
            if not value.strip():
                raise FliqsError(f"--target {text!r}: cc= needs a compiler (a name on PATH or a "
                                 "path), e.g. cc=aarch64-linux-gnu-g++")
            out["cc"] = value.strip()
        else:
            raise FliqsError(f"--target {text!r}: unknown option {name!r}; expected {_RPC_USAGE}")
    return out


def _rpc(text: str) -> Optional[Target]:
    if not text.startswith("rpc://"):
        return None
    m = _RPC_RE.match(text)
    if not m or not (0 < int(m["port"]) < 65536):
        raise FliqsError(f"--target {text!r}: expected {_RPC_USAGE} with a port in 1..65535")
    opts = _rpc_query(text, m["query"]) if m["query"] else {}
    address = RpcAddress(m["host"], int(m["port"]), m["key"], int(opts.get("priority", 1)),
                         float(opts.get("timeout", 60.0)))
    # No target= : the device is asked for its own (``backends.rpc``); never the host's CPU.
    return Target("tvm", text, opts.get("tvm_target"), rpc=address, cc=opts.get("cc"))


# Target forms, tried in order; each returns a Target, None (not this form) or raises FliqsError.
_FORMS: list[Callable[[str], Optional[Target]]] = [_llvm, _json, _ort, _rpc]


def register_form(form: Callable[[str], Optional[Target]]) -> None:
    """Add a target form (a plug-in backend's, e.g. ``--target mybackend``), tried after the
    built-in ones."""
    if form not in _FORMS:
        _FORMS.append(form)


def unregister_form(form) -> None:
    if form in _FORMS:
        _FORMS.remove(form)


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


CROSS_CC_ENV = "FLIQS_CROSS_CC"


def cross_compiler(target: Target):
    """The ``fcompile`` for ``export_library`` of a library built for ``target`` (resolved).

    None (the host's default compiler) when the target dict has no ``mtriple`` or the same one as
    the host (``tvm.target.codegen.llvm_get_system_triple``, vendors ignored). Otherwise
    ``tvm.support.cc.cross_compiler(CC)`` with CC, in order: the rpc target's ``cc=`` option,
    ``$FLIQS_CROSS_CC``, ``<mtriple>-g++`` when on PATH. None of them → a one-line FliqsError
    naming the triple, the Debian package and the option/variable. (Android: set CC to the NDK's
    clang++, or use ``tvm.support.ndk.create_shared`` through the API.)"""
    import shutil
    triple = str((target.tvm_target or {}).get("mtriple") or "").strip()
    if not triple:
        return None
    host = host_triple()
    if host and same_triple(triple, host):
        return None
    cc = target.cc or os.environ.get(CROSS_CC_ENV, "").strip() or None
    if cc is None:
        cc = shutil.which(f"{triple}-g++")
        if cc is None:
            pkg = f"g++-{triple.replace('_', '-')}"
            raise FliqsError(
                f"target {target.text!r} builds for {triple!r} (host: {host or 'unknown'}) but no "
                f"cross compiler {triple}-g++ is on PATH; install one (Debian: apt-get install "
                f"{pkg}) or set {CROSS_CC_ENV}=COMPILER (rpc:// targets: &cc=COMPILER)")
    elif shutil.which(cc) is None:
        raise FliqsError(f"target {target.text!r}: cross compiler {cc!r} for {triple!r} is not "
                         f"found (from {'cc=' if target.cc else CROSS_CC_ENV}); give a name on "
                         "PATH or a path to an executable")
    from tvm.support import cc as tvm_cc
    return tvm_cc.cross_compiler(cc)

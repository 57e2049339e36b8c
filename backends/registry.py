"""Backends behind one interface, registered by name.

A backend turns a materialized graph into the artifact a user deploys and measures it. The driver
only ever talks to this interface (``backend_for(target)``): it never branches on a backend's
kind, so adding a backend is registering one object (docs/design.md, "Add a backend").

Every run also writes ``model.qdq.onnx`` (the contract's portable artifact, checked in a default
onnxruntime session: ``qdq.export_checked``); a backend's ``lower`` receives its path and writes its
own artifacts next to it (``artifacts(target)``), or deploys the QDQ file itself (``ort``).

The interface (``Backend``):

- ``name``: the registry key and ``Target.kind`` of its targets;
- ``resolve(target) -> Target``: the target completed before any work (a remote device is asked
  for its own LLVM target); identity where nothing is missing;
- ``caps(target) -> Capabilities``: the target's features plus the formats this backend runs
  natively per role (``native``: what executes as integer / native code, not emulated);
- ``artifacts(target) -> {report files key: relative path}``: what ``lower`` writes;
- ``lower(fixed, target, out_dir, onnx_path) -> Artifact``: build and load the artifact
  (``Artifact.run_many(input_lists)`` runs several input lists at once: one upload to a remote
  device for all of them);
- ``measure_layer(target, tuning, cache_dir) -> LayerMeasure``: how its latency tables time one
  layer in one (weight, activation) format pair; optional ``measure_layer_in(target, tuning,
  cache_dir, graph, formats) -> LayerMeasure``: the same for the layers of one configuration of
  a model (``driver.measure.chosen_latency``), where a layer's kernel depends on the whole model
  (TVM: the layout), its table named apart;
- ``measure_model(artifact, inputs) -> ms | None``: the whole model's latency;
- ``runners``: the ways users load its artifact (``Runner``), each checked by the conformance
  matrix (``backends.conformance``);
- ``tunes(target) -> bool``: whether ``TuningOptions.trials`` > 0 means something for that
  target (a plain bool attribute is accepted too); optional ``tuning_refusal(target) -> str``: what
  the user is told instead (``tuning_refusal`` below asks both).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from fliqs_compiler.backends.targets import Capabilities
from fliqs_compiler.base.errors import FliqsError

__all__ = ["Backend", "Artifact", "Runner", "LayerMeasure", "TuningOptions", "register",
           "unregister", "get", "names", "backend_for", "tunes", "tuning_refusal"]


@dataclass(frozen=True)
class TuningOptions:
    """Kernel tuning for latency tables: ``trials`` MetaSchedule trials per layer (0: default
    schedules, fast but not representative)."""

    trials: int = 0


@dataclass(frozen=True)
class Runner:
    """One way a user runs an artifact: ``open(artifact) -> run(inputs) -> outputs`` (numpy
    lists). ``artifact`` is 'graph' (the fx graph), 'onnx' (model.qdq.onnx) or a backend's name
    (what its ``lower`` writes)."""

    artifact: str
    open: Callable
    what: str


@dataclass(frozen=True)
class LayerMeasure:
    """``fn(layer, fmt_w, fmt_a) -> ms`` and the name its latency table is filed under (a table
    per backend and tuning: default and tuned kernels are different tables)."""

    table: str
    fn: Callable


@dataclass
class Artifact:
    """A lowered, loaded artifact: ``path`` (the deployable file), ``run(inputs) -> outputs``,
    ``time_ms(inputs) -> ms`` (None: not measurable here), ``executed``: per layer, what really
    runs (dtype, kernel, storage), ``facts``: anything else for the report, ``batch_run``:
    ``(list of input lists) -> list of outputs`` where the backend has something better than one
    ``run`` per list (a remote device: one upload for all of them); see ``run_many``."""

    path: Optional[Path]
    run: Callable
    time_ms: Optional[Callable] = None
    executed: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    batch_run: Optional[Callable] = None

    def run_many(self, input_lists) -> list:
        """The outputs of every input list, in order: ``batch_run`` when the backend gave one,
        else one ``run`` per list."""
        input_lists = list(input_lists)
        if self.batch_run is not None:
            return list(self.batch_run(input_lists))
        return [self.run(x) for x in input_lists]


class Backend(Protocol):
    name: str
    runners: dict

    def tunes(self, target) -> bool: ...

    def resolve(self, target): ...

    def caps(self, target) -> Capabilities: ...

    def artifacts(self, target) -> dict: ...

    def lower(self, fixed, target, out_dir: Path, onnx_path: Path) -> Artifact: ...

    def measure_layer(self, target, tuning: TuningOptions, cache_dir) -> LayerMeasure: ...

    def measure_model(self, artifact: Artifact, inputs: list) -> Optional[float]: ...


_REGISTRY: dict = {}


def register(backend) -> None:
    """Add ``backend`` under ``backend.name`` (an existing name is an error: unregister first)."""
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _builtins() -> None:
    from fliqs_compiler.backends import builtin  # noqa: F401 — registers tvm and ort on import


def names() -> list:
    _builtins()
    return list(_REGISTRY)


def get(name: str):
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise FliqsError(f"no backend named {name!r}; registered: {', '.join(_REGISTRY)}") from None


def backend_for(target):
    """The backend that runs ``target`` (by ``target.kind``)."""
    return get(target.kind)


def tunes(backend, target) -> bool:
    """Whether ``backend`` tunes kernels for ``target``: its ``tunes(target)``, or its plain
    ``tunes`` bool (plug-ins that tune everywhere or nowhere)."""
    answer = getattr(backend, "tunes", False)
    return bool(answer(target) if callable(answer) else answer)


def tuning_refusal(backend, target) -> Optional[str]:
    """None where ``--tune-trials`` > 0 applies to ``target``; else the one line the user gets
    (the backend's ``tuning_refusal(target)`` when it has one: it knows what to do instead)."""
    if tunes(backend, target):
        return None
    why = getattr(backend, "tuning_refusal", None)
    if callable(why):
        return why(target)
    return (f"--tune-trials applies to targets whose backend tunes kernels (TVM), not "
            f"{target.text!r} (backend {target.kind})")

"""The built-in backends: ``tvm`` (Relax lowering to a ``.so`` with integer compute and scheduled
kernels) and ``ort`` (the QDQ ONNX file itself, run by onnxruntime's CPU provider). Both follow
``backends.registry.Backend`` and are registered on import."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from fliqs_compiler.backends import registry
from fliqs_compiler.backends.registry import Artifact, LayerMeasure, Runner, TuningOptions
from fliqs_compiler.backends.targets import default_threads as threads

__all__ = ["TvmBackend", "OrtBackend", "open_tvm", "open_ort"]

_INT = tuple(f"int{b}" for b in range(2, 9)) + ("uint2", "uint3", "uint4", "uint8")


# ---- runners: how a user loads each artifact (the conformance matrix runs every one) ----------
def open_tvm(path: Path):
    """``tvm/model.so`` in a FRESH ``relax.VirtualMachine`` (what a user of the file gets)."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())

    def run(inputs):
        out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x), tvm.cpu()) for x in inputs])
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return run


def open_ort(level: Optional[str]):
    """An onnxruntime session opener: ``level`` None is ``InferenceSession(path)`` with no options
    at all (what a user of the file gets: every graph rewrite on); else that optimization level."""
    def open_(path: Path):
        import onnxruntime as ort
        if level is None:
            sess = ort.InferenceSession(str(path))
        else:
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(path), sess_options=so)
        names = [i.name for i in sess.get_inputs()]
        return lambda inputs: sess.run(None, dict(zip(names, inputs)))
    return open_


# ---- tvm -------------------------------------------------------------------------------------
class TvmBackend:
    """TVM Relax: per-format lowering rules (``tvm_lower``), kernels chosen from the target's
    capabilities (``tvm_kernels.kernels_for``), ``tvm/model.so`` with the weights bound."""

    name = "tvm"
    default_target = "llvm"
    runners = {"tvm": Runner("tvm", open_tvm, "tvm_lower.lower(graph, 'llvm') -> tvm/model.so, fresh VM")}
    # tvm_lower.COMPUTE_RULES: integer codes (int8 storage, int32 accumulation) for every int
    # format; bf16 / fp16 stored natively (upcast to fp32 in the loops); fp8/fp6/fp4/MX decoded.
    native = {"weight": frozenset(_INT + ("bf16", "fp16")), "activation": frozenset(_INT + ("bf16", "fp16"))}

    def resolve(self, target):
        from fliqs_compiler.backends.devices import resolve
        return resolve(target)

    def tunes(self, target) -> bool:
        """MetaSchedule tunes for every TVM target: candidates are built here for the target's
        TVM target and timed where it runs (``devices.device_for(target).tuning_runner``:
        ``LocalRunner`` on this host, ``RPCRunner`` on an ``rpc://`` device)."""
        return True

    def caps(self, target):
        return replace(target.caps, native=dict(self.native))

    def artifacts(self, target) -> dict:
        return {"tvm": "tvm/model.so"}

    def lower(self, fixed, target, out_dir: Path, onnx_path: Path) -> Artifact:
        """Compiled for the target's own TVM target (a remote device's, for ``rpc://``); run and
        timed where the target is (``devices.device_for``)."""
        from fliqs_compiler.backends.devices import device_for
        from fliqs_compiler.backends.tvm_lower import lower
        lowered = lower(fixed, target, out_dir)
        device = device_for(target)
        return Artifact(lowered.path, lambda inputs: device.run(lowered, [inputs])[0],
                        lambda inputs: device.time_ms(lowered, inputs), dict(lowered.executed or {}),
                        batch_run=lambda input_lists: device.run(lowered, input_lists))

    def measure_layer(self, target, tuning: TuningOptions, cache_dir) -> LayerMeasure:
        """Default schedules, or MetaSchedule with ``tuning.trials`` trials per layer and a tuning
        database beside the latency cache (reused across runs and models; a remote device's in a
        folder of its own: ``devices.Remote.tuning_dir``); candidates and entries are timed
        where the target is (a farm of remote devices measures entries in parallel)."""
        return self._measure(target, tuning, cache_dir, "NCHW")

    def measure_layer_in(self, target, tuning: TuningOptions, cache_dir, graph,
                         formats: dict) -> LayerMeasure:
        """``measure_layer`` for the layers of one configuration of a model: its convs measured in
        the layout the lowered model runs in (``tvm_measure.model_layout``: NHWC end to end when
        every conv runs on the VNNI kernel), in a table of that layout (``tvm-nhwc``)."""
        from fliqs_compiler.backends.tvm_measure import model_layout
        return self._measure(target, tuning, cache_dir, model_layout(graph, formats, target))

    def _measure(self, target, tuning: TuningOptions, cache_dir, layout: str) -> LayerMeasure:
        from fliqs_compiler.backends.devices import device_for
        device = device_for(target)
        per_layer = None
        if tuning.trials:
            from fliqs_compiler.backends.latency_table import default_cache_dir
            from fliqs_compiler.backends.tvm_lower import Tuning
            base = (Path(cache_dir) if cache_dir else default_cache_dir()) / "metaschedule"
            per_layer = Tuning(trials=tuning.trials, per_task=tuning.trials,
                               work_dir=str(device.tuning_dir(base, target)))
        return device.measure_layer(target, per_layer, layout)

    def measure_model(self, artifact: Artifact, inputs: list) -> Optional[float]:
        return float(artifact.time_ms(inputs))


# ---- ort -------------------------------------------------------------------------------------
class OrtBackend:
    """onnxruntime's CPU execution provider: the deployable is ``model.qdq.onnx`` itself."""

    name = "ort"
    default_target = "ort"

    def tunes(self, target) -> bool:
        return False
    runners = {"ort_default": Runner("onnx", open_ort(None), "onnxruntime.InferenceSession(path), no options"),
               "ort_disable_all": Runner("onnx", open_ort("ORT_DISABLE_ALL"),
                                         "onnxruntime session, graph optimizations ORT_DISABLE_ALL")}
    # QLinearConv / MatMulInteger (8-bit), MatMulNBits (4-bit weights, behind integer activations
    # only: onnx_export.shield_weight_only_matmul keeps float activations off it, since it would
    # re-quantize them to int8); other formats run as float after DequantizeLinear.
    native = {"weight": frozenset({"int8", "uint8", "int4", "uint4"}), "activation": frozenset({"int8", "uint8"})}

    def resolve(self, target):
        return target

    def caps(self, target):
        return replace(target.caps, native=dict(self.native))

    def artifacts(self, target) -> dict:
        return {}

    def lower(self, fixed, target, out_dir: Path, onnx_path: Path) -> Artifact:
        from fliqs_compiler.backends.ort_backend import ort_can_run, time_onnx
        if not ort_can_run(onnx_path):  # e.g. FP4 Q/DQ: no onnxruntime kernel, nothing to time
            return Artifact(onnx_path, run=None)
        return Artifact(onnx_path, open_ort(None)(onnx_path),
                        lambda inputs: time_onnx(str(onnx_path), inputs, threads=threads()))

    def measure_layer(self, target, tuning: TuningOptions, cache_dir) -> LayerMeasure:
        from fliqs_compiler.backends.latency_table import ort_layer_ms
        return LayerMeasure("ort", lambda layer, fw, fa: ort_layer_ms(layer, fw, fa, threads=threads()))

    def measure_model(self, artifact: Artifact, inputs: list) -> Optional[float]:
        return float(artifact.time_ms(inputs)) if artifact.time_ms else None


registry.register(OrtBackend())
registry.register(TvmBackend())

"""ONNX → trainable ``torch.fx`` importer (our own op table, :mod:`.onnx_ops`).

``import_onnx(path, input_shapes)`` reads and validates the file, pins every input shape (a
symbolic leading dim is the batch, traced at 1), then walks the nodes in order: shape arithmetic
folds to constants (inputs have static shapes), the rest becomes ``call_function`` nodes on
``torch`` / ``torch.nn.functional`` callables, weights become ``nn.Parameter``s and other
constants buffers (see ``docs/design.md``). :mod:`.batch` then generalizes the folded shapes to
any batch size (``graph.meta['batch']``), or guards a graph that cannot be batched.

Every user-facing failure is a one-line :class:`~fliqs_compiler.base.errors.FliqsError` naming the
file (and node / input) and what to do.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch

from fliqs_compiler.base.errors import FliqsError, one_line
from fliqs_compiler.ir.graph import Graph, InputSpec
from fliqs_compiler.frontends import batch
from fliqs_compiler.frontends.builder import MAX_ELEMENTS, Builder, V
from fliqs_compiler.frontends.onnx_ops import OPS, ONNX_TO_TORCH_DTYPE, NodeInfo, PendingQ, tensor_value

__all__ = ["import_onnx", "check_supported", "read_model", "SUPPORTED_OPS"]

SUPPORTED_OPS = frozenset(OPS)
_DOMAINS = ("", "ai.onnx")
# onnxruntime's contrib Q/DQ (used for int4/int16 before opset 21): same semantics as ONNX's
_CONTRIB_ALIASES = {("com.microsoft", "QuantizeLinear"), ("com.microsoft", "DequantizeLinear")}


def _supported(node) -> bool:
    if (node.domain, node.op_type) in _CONTRIB_ALIASES:
        return True
    return node.domain in _DOMAINS and node.op_type in OPS


# ---- reading and validation -------------------------------------------------------------
def read_model(path: Path):
    """Parse ``path`` into a ModelProto without external data. Guarantees a graph is present."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise FliqsError(f"{path}: no such file; check the model path")
    if path.is_dir():
        raise FliqsError(f"{path}: is a folder; pass the .onnx file inside it")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 — DecodeError, OSError, onnx's own parse errors
        raise FliqsError(f"{path}: not a readable ONNX model (truncated or not a protobuf: "
                         f"{one_line(e)}); re-export the model") from None
    if not model.ir_version or not model.graph.node and not model.graph.output:
        raise FliqsError(f"{path}: not an ONNX model (no graph found); pass an .onnx file")
    if model.functions:  # exporters may wrap ops in model-local functions: inline them
        from onnx import inliner
        try:
            model = inliner.inline_local_functions(model)
        except Exception as e:  # noqa: BLE001
            raise FliqsError(f"{path}: cannot inline the model's local functions "
                             f"({one_line(e)}); re-export without functions") from None
    return model


def check_supported(model, path: Optional[Path] = None) -> None:
    """Raise ONE FliqsError listing every unsupported op type (with its first node name).

    Requires a parsed ModelProto; does no other work. Custom domains are unsupported.
    """
    first: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        key = node.op_type if node.domain in _DOMAINS else f"{node.domain}.{node.op_type}"
        if not _supported(node) and key not in first:
            first[key] = node.name or f"{node.op_type}_{i}"
    if first:
        where = f"{path}: " if path else ""
        items = ", ".join(f"{op} (node {name!r})" for op, name in first.items())
        raise FliqsError(f"{where}unsupported ONNX operators: {items}; replace them in the "
                         "exporter or simplify the model (onnxsim) before importing")


def _load_external(model, path: Path) -> None:
    """Load external tensor data, refusing locations outside the model's folder."""
    from onnx import external_data_helper

    base = path.resolve().parent
    tensors = list(external_data_helper._get_all_tensors(model))
    external = [t for t in tensors if external_data_helper.uses_external_data(t)]
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or os.path.commonpath([base, target]) != str(base):
            raise FliqsError(f"{path}: tensor {t.name!r} points to external data {loc!r} outside "
                             "the model's folder; refused (keep external data next to the model)")
        if not target.is_file():
            raise FliqsError(f"{path}: external data file {loc!r} for tensor {t.name!r} is "
                             "missing; copy it next to the model")
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as e:  # noqa: BLE001 — a corrupt external file
            raise FliqsError(f"{path}: cannot read external data ({one_line(e)}); "
                             "re-export the model") from None


def _check_model(model, path: Path) -> None:
    import onnx

    try:
        if model.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 — onnx raises several checker error types
        raise FliqsError(f"{path}: ONNX checker failed: {one_line(e)}; re-export or repair "
                         "the model") from None


def _input_specs(model, path: Path, input_shapes: Optional[dict]) -> list[InputSpec]:
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in init_names]
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {i.name for i in graph_inputs}
    if unknown:
        names = ", ".join(i.name for i in graph_inputs)
        raise FliqsError(f"{path}: --input-shape names unknown input(s) {sorted(unknown)}; "
                         f"the model's inputs are: {names}")
    specs = []
    for inp in graph_inputs:
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise FliqsError(f"{path}: input {inp.name!r} is not a tensor (sequence/map/optional "
                             "inputs are not supported); export it as a tensor")
        dtype = ONNX_TO_TORCH_DTYPE.get(tt.elem_type)
        if dtype is None or tt.elem_type in (4, 12, 13, 21, 22):  # no torch kernels for these
            raise FliqsError(f"{path}: input {inp.name!r} has unsupported element type "
                             f"{tt.elem_type}; use float32 or an integer type")
        # dim_param, no value, or a negative value (Paddle2ONNX writes -1) is a dynamic dim
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                for d in tt.shape.dim]
        if inp.name in input_shapes:
            shape = tuple(input_shapes[inp.name])
            if tt.HasField("shape") and len(shape) != len(dims):
                raise FliqsError(f"{path}: --input-shape for {inp.name!r} has rank {len(shape)} "
                                 f"but the model expects rank {len(dims)}")
            bad = [i for i, (d, s) in enumerate(zip(dims, shape)) if d and d != s]
            if bad:
                raise FliqsError(f"{path}: --input-shape {inp.name}={'x'.join(map(str, shape))}"
                                 f" conflicts with the model's fixed dims {dims}")
        else:
            shape = _default_shape(inp.name, tt, dims, path)
        if any(d <= 0 for d in shape):
            raise FliqsError(f"{path}: input {inp.name!r} has a zero-size shape {shape}; "
                             "pin a positive shape with --input-shape")
        if math.prod(shape) > _MAX_INPUT_ELEMENTS:
            raise FliqsError(f"{path}: input {inp.name!r} has {math.prod(shape):,} elements "
                             f"({'x'.join(map(str, shape))}); pin a smaller shape with "
                             "--input-shape")
        specs.append(InputSpec(inp.name, shape, str(dtype).replace("torch.", "")))
    return specs


_MAX_INPUT_ELEMENTS = MAX_ELEMENTS  # one example larger than this is a corrupt shape


def _default_shape(name: str, tt, dims: list, path: Path) -> tuple:
    """The input shape without --input-shape. A dynamic *leading* dim (``batch``, ``N``, ``?``,
    ``-1``, unnamed) is the batch: traced at 1, and the graph stays batch-polymorphic (see
    :mod:`.batch`). Any other dynamic dim needs real sizes from the user."""
    if not tt.HasField("shape") or any(d is None for d in dims[1:]):
        shown = "x".join(str(d) if d else "?" for d in dims) or "unknown"
        example = "x".join(str(d) if d else "1" for d in dims) or "1x3x224x224"
        raise FliqsError(f"{path}: input {name!r} has dynamic shape {shown}; pin it "
                         f"with --input-shape {name}={example} (use the real sizes "
                         "for the '?' dims)")
    return tuple(1 if d is None else d for d in dims)


def _check_finite(gm: torch.nn.Module, path: Path) -> None:
    """Weights (the trainable parameters) must be finite; masks may hold -inf (buffers)."""
    for name, p in gm.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            raise FliqsError(f"{path}: weight {name!r} contains NaN or inf values; "
                             "fix the trained model before importing")


def _opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in _DOMAINS:
            return imp.version
    return 1


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


# ---- conversion -------------------------------------------------------------------------
def _convert(model, specs: list[InputSpec], path: Path, inits: dict, record: Optional[dict] = None,
             unpin=None):
    """One conversion at the input shapes ``specs`` → (GraphModule, output names).
    ``record`` (at the pinned batch) collects what shape ops read; ``unpin`` (at a probe batch)
    rewrites literal targets that baked the pinned batch (see :mod:`.batch`)."""
    b = Builder()
    opset = _opset(model)
    env: dict[str, object] = dict(inits)
    for spec in specs:
        env[spec.name] = b.placeholder(spec.name, spec.shape, getattr(torch, spec.dtype))
    for idx, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{idx}"
        info = NodeInfo(name, node.op_type, opset, len(node.output))
        ins = []
        for i in node.input:
            if i and i not in env:
                raise FliqsError(f"{path}: node {name!r} reads {i!r}, which is not produced "
                                 "before it; the graph is not topologically sorted")
            ins.append(env[i] if i else None)
        if any(isinstance(v, PendingQ) for v in ins) and node.op_type != "DequantizeLinear":
            raise FliqsError(f"{path}: node {name!r} ({node.op_type}) consumes quantized integers "
                             "directly; only QuantizeLinear→DequantizeLinear pairs are supported")
        if record is not None:
            batch.record_inputs(record, idx, node.op_type, ins)
        if unpin is not None:
            ins = unpin(idx, node.op_type, name, ins)
        b.current = (name, node.op_type)
        try:
            outs = OPS[node.op_type](b, info, ins, _attrs(node))
        except FliqsError as e:
            raise FliqsError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 — torch rejected the op: name it
            raise FliqsError(f"{path}: node {name!r} ({node.op_type}) cannot be converted: "
                             f"{one_line(e)}") from None
        finally:
            b.current = None
        outs = outs if isinstance(outs, list) else [outs]
        for out_name, value in zip(node.output, outs):
            if out_name:
                if isinstance(value, V) and not value.name:
                    value.name = out_name
                env[out_name] = value
    results = []
    for o in model.graph.output:
        value = env.get(o.name)
        if isinstance(value, PendingQ):
            raise FliqsError(f"{path}: graph output {o.name!r} is a bare QuantizeLinear output; "
                             "end the graph with DequantizeLinear")
        if not isinstance(value, V):
            raise FliqsError(f"{path}: graph output {o.name!r} is not produced by any node "
                             "(or by an optional output fliqs does not compute)")
        results.append(value)
    b.output(results)
    gm = b.finish(path.stem)
    return gm, [o.name for o in model.graph.output]


def _batch_polymorphic(model, specs, path: Path, inits: dict, gm0, record: dict) -> tuple:
    """(graph module, batch facts for ``graph.meta['batch']``): ``gm0`` generalized to any
    batch size, or ``gm0`` itself, guarded to refuse other batch sizes with one line naming
    the ONNX node that pins it."""
    p = batch.plan(specs)
    if p is None:
        return gm0, {"dynamic": False, "size": None, "pinned_by": None, "unpinned": []}

    def convert(batched_specs, unpin):
        return _convert(model, batched_specs, path, inits, unpin=unpin)[0]

    try:
        gm, unpinned = batch.generalize(convert, gm0, record, specs, p, prefix=f"{path}: ")
    except batch.ModelFails as e:
        raise FliqsError(f"{path}: {e}; the model is invalid, re-export it") from None
    except batch.NotBatchable as e:
        reason = str(e)
        batch.guard(gm0, p, f"{path.name}: {reason}; the model only runs on a batch of {p.b0}")
        return gm0, {"dynamic": False, "size": p.b0, "pinned_by": reason, "unpinned": []}
    return gm, {"dynamic": True, "size": p.b0, "pinned_by": None, "unpinned": unpinned,
                "inputs": [specs[i].name for i in p.inputs]}


def _initializers(model, path: Path) -> dict:
    try:
        return {t.name: tensor_value(t) for t in model.graph.initializer}
    except FliqsError as e:
        raise FliqsError(f"{path}: {e}") from None


def import_onnx(path: Path, input_shapes: Optional[dict] = None) -> Graph:
    """Import an ONNX file into a :class:`Graph` (see the module docstring).

    Requires: a valid ONNX model whose ops are in :data:`SUPPORTED_OPS` (default domain) and whose
    input shapes are static or pinned by ``input_shapes`` ({name: shape}).
    Guarantees: ``graph.gm`` reproduces onnxruntime's outputs (a single tensor for one output,
    a tuple otherwise); ``graph.meta['batch']`` says whether it runs on any batch size
    (``dynamic``; the batch inputs' leading dim) or which ONNX node pins it (``pinned_by``: other
    batch sizes then raise that one-line FliqsError); ``graph.inputs`` follow the ONNX input
    order; every node built from an ONNX node has ``meta['onnx_name']`` / ``meta['onnx_op']``;
    float weights are trainable.
    """
    path = Path(path)
    model = read_model(path)
    check_supported(model, path)
    _load_external(model, path)
    _check_model(model, path)
    specs = _input_specs(model, path, input_shapes)
    inits = _initializers(model, path)
    record: dict = {}
    gm, output_names = _convert(model, specs, path, inits, record=record)
    _check_finite(gm, path)
    gm, batch_facts = _batch_polymorphic(model, specs, path, inits, gm, record)
    graph = Graph(gm, specs, name=path.stem, output_names=output_names, source=str(path))
    graph.meta.update(onnx_opset=_opset(model), onnx_producer=model.producer_name,
                      input_shapes={s.name: s.shape for s in specs}, batch=batch_facts)
    return graph

"""Batch polymorphism for imported ONNX graphs.

The importer folds shape arithmetic to constants at the pinned input shapes, so every folded
Reshape / Expand / Tile / ConstantOfShape target holds the traced batch size. To know which
entries *are* the batch, the model is converted again at a probe batch and the two fx graphs
are compared node by node (pinned ``b0`` vs ``b0 + 1``; for ``b0 = 1``, 1 vs 2, and 2 vs 3 when
the graphs differ in form, as a batch of 1 hides broadcasts): an int argument or constant that
changes with the batch as ``k·b`` is rewritten to ``-1`` (a reshape entry), to
``k · sym_size(input, 0)`` (the batch read at run time) or, for a constant, to a broadcast of
its per-sample slab; anything else that changes is refused.

Literal targets exporters baked at batch 1 (Paddle2ONNX's ``Reshape(x, [1, -1])``, a folded
``Shape → … → Expand`` of a class token, a ConstantOfShape mask, Resize ``sizes``) do not
change between the two conversions; while converting at ``b1`` they are unpinned when their leading
entry equals ``b0`` and it stands for the batch (:class:`Unpin`).

The result is then checked sample by sample: the generalized graph on a batch of ``2·b0``
equals the pinned graph run on each half. A graph that fails any step stays pinned at ``b0``
and refuses other batch sizes with one line naming the ONNX node that pins it
(:func:`guard`).
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx

from fliqs_compiler.base.errors import FliqsError, one_line
from fliqs_compiler.frontends.builder import V

__all__ = ["NotBatchable", "ModelFails", "Plan", "plan", "Unpin", "SHAPE_INPUT", "record_inputs",
           "generalize", "guard"]

# op type -> index of its shape-like input (the target that may bake the batch size)
# (Resize: its ``sizes`` list the batch too)
SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0, "Resize": 3}


class NotBatchable(Exception):
    """The graph cannot run on other batch sizes; ``str()`` is one line naming the ONNX node."""


@dataclass
class Plan:
    """Which inputs carry the batch on axis 0 (indices into the input specs) and its size."""

    b0: int
    inputs: list

    def probes(self) -> list:
        """Batch sizes to convert at besides ``b0``: never 1 (a batch of 1 hides broadcasts)."""
        return [2, 3] if self.b0 == 1 else [self.b0 + 1]


def plan(specs) -> Optional[Plan]:
    """Every input whose leading dim equals the first input's is a batch input (None: no batch,
    e.g. scalar inputs only)."""
    ranked = [s for s in specs if len(s.shape)]
    if not ranked:
        return None
    b0 = int(ranked[0].shape[0])
    return Plan(b0, [i for i, s in enumerate(specs) if len(s.shape) and s.shape[0] == b0])


def _small_ints(v) -> Optional[list]:
    if isinstance(v, V) and v.is_const and v.ndim == 1 and not v.dtype.is_floating_point \
            and v.const.numel() <= 16:
        return v.ints()
    return None


def record_inputs(record: dict, idx: int, op_type: str, ins: list) -> None:
    """At the pinned batch: remember the shapes (and small int constants) a shape op reads."""
    if op_type in SHAPE_INPUT:
        record[idx] = [(v.shape if isinstance(v, V) else None, _small_ints(v)) for v in ins]


@dataclass
class Unpin:
    """Rewrites, while converting at batch ``b``, the literal targets that baked ``b0``."""

    record: dict
    b0: int
    b: int
    rewritten: list = field(default_factory=list)  # ONNX node names

    def __call__(self, idx: int, op_type: str, name: str, ins: list) -> list:
        j = SHAPE_INPUT.get(op_type)
        ref = self.record.get(idx)
        if j is None or ref is None or len(ins) <= j:
            return ins
        target = _small_ints(ins[j])
        # a target that changed with the batch is shape arithmetic: it is right as it is
        if not target or target != ref[j][1] or target[0] != self.b0:
            return ins
        if not self._batched(op_type, ins, ref, target):
            return ins
        out = list(ins)
        fixed = torch.tensor([self.b] + target[1:], dtype=ins[j].dtype)
        out[j] = V(const=fixed, name=ins[j].name)
        self.rewritten.append(name)
        return out

    def _batched(self, op_type: str, ins: list, ref: list, target: list) -> bool:
        """Does the leading target entry stand for the batch? Reshape / Resize: their data
        carries the batch on axis 0. Tile: its data does not (else repeats of 1 already keep
        it). Expand / ConstantOfShape create the leading axis: a leading entry equal to the
        batch is taken as the batch (checked sample by sample afterwards)."""
        if op_type == "ConstantOfShape":
            return True
        now, then = ins[0].shape if isinstance(ins[0], V) else None, ref[0][0]
        if not now or not then:
            return False
        carries = then[0] == self.b0 and now[0] == self.b and tuple(then[1:]) == tuple(now[1:])
        if op_type in ("Reshape", "Resize"):
            return carries
        if op_type == "Tile":
            return not carries and then[0] == 1
        return not carries or self.b0 != 1  # Expand: broadcasting 1 → b keeps a batch of 1 as is


# ---- comparing two conversions ---------------------------------------------------------------
@dataclass(frozen=True)
class _Batch:
    """Marks an int argument that is ``k`` times the batch size."""

    k: int


def _onnx_name(node: fx.Node) -> str:
    return node.meta.get("onnx_name") or node.name


def _where(node: fx.Node) -> str:
    op = node.meta.get("onnx_op")
    return f"node {_onnx_name(node)!r}" + (f" ({op})" if op else "")


class _Compare:
    """Walks two conversions of the same model (batch ``ba`` and ``bb``) in step."""

    def __init__(self, ga: fx.GraphModule, gb: fx.GraphModule, ba: int, bb: int):
        self.ga, self.gb, self.ba, self.bb = ga, gb, ba, bb
        self.map: dict = {}
        self.suspect: Optional[str] = None  # first node whose output mixes the batch into an axis

    def factor(self, a: int, b: int, node: fx.Node) -> _Batch:
        if a > 0 and a % self.ba == 0 and b == a // self.ba * self.bb:
            return _Batch(a // self.ba)
        raise NotBatchable(f"{_where(node)}: a shape entry changes with the batch as {a} → {b} "
                           f"(at batch {self.ba} → {self.bb}), not as a multiple of it")

    def merge(self, a: Any, b: Any, node: fx.Node) -> Any:
        if isinstance(a, fx.Node):
            if not isinstance(b, fx.Node) or self.map.get(a) is not b:
                raise _Mismatch(node)
            return a
        if isinstance(a, (tuple, list)):
            if type(a) is not type(b) or len(a) != len(b):
                raise _Mismatch(node)
            kind = list if isinstance(a, list) else tuple  # torch.Size holds ints only
            return kind(self.merge(x, y, node) for x, y in zip(a, b))
        if isinstance(a, dict):
            if not isinstance(b, dict) or a.keys() != b.keys():
                raise _Mismatch(node)
            return {k: self.merge(a[k], b[k], node) for k in a}
        if isinstance(a, slice):
            if not isinstance(b, slice):
                raise _Mismatch(node)
            return slice(*(self.merge(x, y, node) for x, y in
                           ((a.start, b.start), (a.stop, b.stop), (a.step, b.step))))
        if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) \
                and not isinstance(b, bool):
            return a if a == b else self.factor(a, b, node)
        if type(a) is not type(b):
            raise _Mismatch(node)
        if a != b and not (isinstance(a, float) and a != a and b != b):  # NaN == NaN here
            raise NotBatchable(f"{_where(node)}: an argument changes with the batch "
                               f"({a!r} → {b!r})")
        return a

    def constant(self, na: fx.Node, nb: fx.Node, user: fx.Node):
        """None if the constants agree; else (base slab, axis, k): the constant repeats a slab
        of k rows along one axis once per sample."""
        ta, tb = _fetch(self.ga, na.target), _fetch(self.gb, nb.target)
        if ta.shape == tb.shape:
            if ta.dtype == tb.dtype and (ta is tb or torch.equal(ta, tb) or (
                    ta.is_floating_point() and bool(torch.isclose(
                        ta, tb, rtol=0, atol=0, equal_nan=True).all()))):
                return None
            raise NotBatchable(f"{_where(user)}: a constant it reads changes value with the batch")
        axes = [i for i, (x, y) in enumerate(zip(ta.shape, tb.shape)) if x != y]
        if len(ta.shape) == len(tb.shape) and len(axes) == 1 and \
                not isinstance(ta, torch.nn.Parameter):
            i = axes[0]
            k = self.factor(ta.shape[i], tb.shape[i], user).k
            base = ta.narrow(i, 0, k)
            reps = [1] * ta.ndim
            if torch.equal(ta, base.repeat(*_with(reps, i, self.ba))) and \
                    torch.equal(tb, base.repeat(*_with(reps, i, self.bb))):
                return base, i, k
        raise NotBatchable(f"{_where(user)}: a constant it reads ({tuple(ta.shape)} at batch "
                           f"{self.ba}, {tuple(tb.shape)} at {self.bb}) is not one slab per sample")

    def note_shapes(self, na: fx.Node, nb: fx.Node) -> None:
        ma, mb = na.meta.get("tensor_meta"), nb.meta.get("tensor_meta")
        sa, sb = getattr(ma, "shape", None), getattr(mb, "shape", None)
        if self.suspect or sa is None or sb is None or tuple(sa) == tuple(sb):
            return
        diff = [i for i, (x, y) in enumerate(zip(sa, sb)) if x != y]
        if len(sa) != len(sb) or len(diff) != 1 or sa[diff[0]] != self.ba:
            self.suspect = (f"{_where(na)} mixes the batch into another dimension "
                            f"({'x'.join(map(str, sa))} at batch {self.ba}, "
                            f"{'x'.join(map(str, sb))} at batch {self.bb})")


class _Mismatch(Exception):
    def __init__(self, node: fx.Node):
        super().__init__(node)
        self.node = node


def _with(seq: list, i: int, value) -> list:
    out = list(seq)
    out[i] = value
    return out


def _fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first_user(node: fx.Node) -> fx.Node:
    return next((u for u in node.users if u.op == "call_function"), node)


def compare(ga: fx.GraphModule, gb: fx.GraphModule, ba: int, bb: int):
    """Match the two conversions node by node. Returns (args, constants, suspect): new args for
    ``ga``'s nodes that hold :class:`_Batch` markers, the get_attr nodes of ``ga`` whose constant
    is one slab per sample, and a description of the first node that mixes the batch into
    another axis (for messages). Raises :class:`_Mismatch` when the graphs differ in form and
    :class:`NotBatchable` when a value changes with the batch in a way no rewrite expresses."""
    c = _Compare(ga, gb, ba, bb)
    nodes_a, nodes_b = list(ga.graph.nodes), list(gb.graph.nodes)
    args, consts = {}, {}
    for na, nb in zip(nodes_a, nodes_b):
        if na.op != nb.op or (na.op != "get_attr" and na.target != nb.target):
            raise _Mismatch(na)
        c.map[na] = nb
        if na.op == "get_attr":
            slab = c.constant(na, nb, _first_user(na))
            if slab is not None:
                consts[na] = slab
            continue
        if na.op == "placeholder":
            continue
        new = (c.merge(na.args, nb.args, na), c.merge(na.kwargs, nb.kwargs, na))
        if _has_batch(new):
            args[na] = new
        c.note_shapes(na, nb)
    if len(nodes_a) != len(nodes_b):
        raise _Mismatch(nodes_a[min(len(nodes_a), len(nodes_b)) - 1])
    return args, consts, c.suspect


def _has_batch(tree) -> bool:
    found = []
    fx.node.map_aggregate(tree, lambda a: found.append(a) if isinstance(a, _Batch) else None)
    return bool(found)


# ---- rewriting ------------------------------------------------------------------------------
class _Sizes:
    """``k · sym_size(batch input, 0)`` nodes, made once each, right after the placeholders."""

    def __init__(self, gm: fx.GraphModule, input_index: int):
        self.graph = gm.graph
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.source = placeholders[input_index]
        self.anchor = placeholders[-1]
        self.nodes: dict = {}

    def get(self, k: int, user: fx.Node) -> fx.Node:
        if k not in self.nodes:
            if 1 not in self.nodes:
                self.nodes[1] = self._add(torch.ops.aten.sym_size.int, (self.source, 0), user)
            if k != 1:
                self.nodes[k] = self._add(operator.mul, (self.nodes[1], k), user)
        return self.nodes[k]

    def _add(self, fn, args, user: fx.Node) -> fx.Node:
        with self.graph.inserting_after(self.anchor):
            node = self.graph.call_function(fn, args)
        self.anchor = node
        node.meta["onnx_name"] = _onnx_name(user)
        node.meta["onnx_op"] = user.meta.get("onnx_op", "Shape")
        return node


def _resolve(tree, sizes: _Sizes, user: fx.Node):
    return fx.node.map_aggregate(
        tree, lambda a: sizes.get(a.k, user) if isinstance(a, _Batch) else a)


def _reshape_target(new_args: tuple):
    """A reshape whose target has exactly one batch entry and no -1: that entry becomes -1
    (the graph stays free of size nodes)."""
    target = new_args[1] if len(new_args) > 1 else None
    if not isinstance(target, (tuple, list)):
        return None
    marks = [i for i, d in enumerate(target) if isinstance(d, _Batch)]
    if len(marks) != 1 or -1 in target:
        return None
    kind = list if isinstance(target, list) else tuple
    return new_args[:1] + (kind(-1 if isinstance(d, _Batch) else d for d in target),) \
        + tuple(new_args[2:])


def rewrite(gm: fx.GraphModule, args: dict, consts: dict, input_index: int) -> fx.GraphModule:
    """Apply :func:`compare`'s findings to ``gm`` in place and return it."""
    sizes = _Sizes(gm, input_index)
    for node, (new_args, new_kwargs) in args.items():
        if node.target is torch.reshape and not _has_batch(new_kwargs):
            simple = _reshape_target(new_args)
            if simple is not None:
                node.args = simple
                continue
        node.args = _resolve(new_args, sizes, node)
        node.kwargs = _resolve(new_kwargs, sizes, node)
    for node, (base, axis, k) in consts.items():
        _repeat_constant(gm, node, base, axis, k, sizes)
    gm.graph.lint()
    gm.recompile()
    return gm


def _repeat_constant(gm, node: fx.Node, base: torch.Tensor, axis: int, k: int, sizes: _Sizes):
    """A constant that is one slab per sample becomes broadcast_to / tile of the slab."""
    name = f"{node.target}_slab"
    gm.register_buffer(name, base.clone().contiguous())
    user = _first_user(node)
    with gm.graph.inserting_after(node):
        slab = gm.graph.get_attr(name)
    with gm.graph.inserting_after(slab):
        if k == 1:
            shape = tuple(_with(list(base.shape), axis, _Batch(1)))
            new = gm.graph.call_function(torch.broadcast_to, (slab, shape))
        else:
            reps = tuple(_with([1] * base.ndim, axis, _Batch(1)))
            new = gm.graph.call_function(torch.tile, (slab, reps))
    new.args = _resolve(new.args, sizes, user)
    new.meta["onnx_name"] = _onnx_name(user)
    new.meta["onnx_op"] = user.meta.get("onnx_op", "Constant")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


# ---- checking and the whole procedure ---------------------------------------------------------
def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    if not ref.is_floating_point():
        return bool(torch.equal(got, ref))
    scale = float(ref.abs().nan_to_num(0, 0, 0).max()) if ref.numel() else 0.0
    return bool(torch.allclose(got, ref, rtol=1e-3, atol=1e-5 * max(1.0, scale), equal_nan=True))


def check_per_sample(g0: fx.GraphModule, dyn: fx.GraphModule, specs, p: Plan,
                     refresh: bool = False) -> bool:
    """On a batch of ``2·b0``, each half of ``dyn``'s outputs equals ``g0`` run on that half
    (``refresh``: also ``dyn`` on a batch of ``b0`` equals ``g0``, and its tensor metadata is
    recomputed at the pinned shapes — for a graph built at a probe batch)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gen = torch.Generator().manual_seed(0)
    xa = [s.random(gen) for s in specs]
    xb = [s.random(gen) for s in specs]
    xab = [torch.cat([a, b]) if i in p.inputs else a for i, (a, b) in enumerate(zip(xa, xb))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 1-2: extra intra-op threads only add sync cost
    try:
        with torch.no_grad():  # .forward: no hooks, and no fx printout of a failing line
            ref_a, ref_b = _run_blaming(g0, xa), _run_blaming(g0, xb)
            got_ab = _outputs(dyn.forward(*xab))
            got_a = _outputs(ShapeProp(dyn).propagate(*xa)) if refresh else ref_a
    finally:
        torch.set_num_threads(threads)
    if not len(got_a) == len(got_ab) == len(ref_a):
        return False
    b0 = p.b0
    for ra, rb, ga, gab in zip(ref_a, ref_b, got_a, got_ab):
        if not all(torch.is_tensor(t) for t in (ra, rb, ga, gab)):
            return False
        if not _close(ga, ra) or gab.dim() == 0 or gab.shape[0] != 2 * b0:
            return False
        if not (_close(gab[:b0], ra) and _close(gab[b0:], rb)):
            return False
    return True


class ModelFails(Exception):
    """The pinned graph itself fails on random inputs; ``str()`` names the ONNX node."""


class _Blame(fx.Interpreter):
    """Runs a graph node by node, remembering the node that raised."""

    failed: Optional[fx.Node] = None

    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise


def _run_blaming(gm: fx.GraphModule, inputs: list) -> list:
    """``gm`` on ``inputs``; a failure is :class:`ModelFails` naming the ONNX node (the meta
    kernels the importer traces with accept some arguments the real kernels refuse), or
    NotBatchable for an integer division by a random zero (data-dependent, not a bad model)."""
    try:
        return _outputs(gm.forward(*inputs))
    except Exception as e:  # noqa: BLE001
        first = e
    interp = _Blame(gm)
    try:
        interp.run(*inputs)
    except Exception as e:  # noqa: BLE001
        first = e.__cause__ or e
    text = one_line(first)
    if "ZeroDivision" in text or interp.failed is None:
        raise NotBatchable("the model does not run on random inputs, so its batch semantics "
                           f"cannot be checked ({text})")
    raise ModelFails(f"{_where(interp.failed)} fails on random inputs: {text}")


def generalize(convert: Callable, g0: fx.GraphModule, record: dict, specs, p: Plan,
               prefix: str = ""):
    """The batch-polymorphic version of ``g0`` (converted at the pinned batch; left untouched).
    ``convert(specs, unpin)`` converts the model at other input shapes; ``record`` is what
    :func:`record_inputs` noted while converting ``g0``. Returns ``(gm, unpinned)``: the new
    graph and the ONNX nodes whose literal targets were unpinned. Raises NotBatchable."""
    import dataclasses

    def at(batch: int):
        unpin = Unpin(record=record, b0=p.b0, b=batch)
        batched = [dataclasses.replace(s, shape=(batch,) + tuple(s.shape[1:]))
                   if i in p.inputs else s for i, s in enumerate(specs)]
        try:
            return convert(batched, unpin), unpin.rewritten
        except FliqsError as e:
            text, at_b = one_line(e, strip_prefix=prefix), f" at a batch of {batch}"
            if " cannot be converted: " in text:
                text = text.replace(" cannot be converted: ", f" cannot be converted{at_b}: ", 1)
            else:
                text += f" ({at_b.strip()})"
            raise NotBatchable(text) from None

    probes = p.probes()
    g1, unpinned = at(probes[0])
    try:
        base = _clone(g0)
        found = compare(base, g1, p.b0, probes[0])
    except _Mismatch as m:
        if len(probes) < 2:
            raise NotBatchable(f"{_where(m.node)}: the graph's form changes with the batch "
                               "size") from None
        g2, _ = at(probes[1])
        try:
            base = g1
            found = compare(base, g2, probes[0], probes[1])
        except _Mismatch as m2:
            raise NotBatchable(f"{_where(m2.node)}: the graph's form changes with the batch "
                               "size") from None
    args, consts, suspect = found
    dyn = rewrite(base, args, consts, p.inputs[0])
    try:
        ok = check_per_sample(g0, dyn, specs, p, refresh=base is g1)
    except (NotBatchable, ModelFails):
        raise
    except Exception as e:  # noqa: BLE001 — the rewritten graph does not run: pinned
        raise NotBatchable(suspect or f"the graph does not run on a batch of {2 * p.b0} "
                           f"({one_line(e)})") from None
    if not ok:
        raise NotBatchable(suspect or f"on a batch of {2 * p.b0} its outputs differ from the "
                           "model run sample by sample")
    return dyn, unpinned


def _clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own fx graph, sharing the tensors."""
    import copy
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)


# ---- graphs that stay pinned ------------------------------------------------------------------
def _guard_hook(b0: int, inputs: tuple, message: str, module, args):
    for i in inputs:
        x = args[i] if i < len(args) else None
        if torch.is_tensor(x) and x.dim() and x.shape[0] != b0:
            raise FliqsError(message)


def guard(gm: fx.GraphModule, p: Plan, message: str) -> None:
    """Make a batch-pinned graph refuse other batch sizes with ``message`` (one line) instead of
    a shape error deep inside torch."""
    gm.register_forward_pre_hook(functools.partial(_guard_hook, p.b0, tuple(p.inputs), message))

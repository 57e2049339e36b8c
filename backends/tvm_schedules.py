"""Rule-based CPU schedules for every PrimFunc a Relax build leaves unscheduled (no tuning).

Why (measured on this project's 2-core Zen 4): TVM 0.27's default CPU pipeline legalizes and
fuses but never schedules, so every kernel that is not one of our hand VNNI kernels ran as
naive single-threaded scalar loops (ResNet-18 fp32: 1.9 s vs onnxruntime's 20-30 ms). TVM ships
CPU default rules only for softmax / layer-norm-like reductions and GEMV (``s_tir.dlight.cpu``);
convolutions, matmuls, pooling and elementwise functions need the rules below.

``schedule(mod, target) -> (mod, counts)`` runs ``dlight.ApplyDefaultSchedule`` over the module
with ``RULES`` in order; the first rule that returns a schedule wins for a PrimFunc, and
functions already scheduled (``tirx.is_scheduled``: our VNNI kernels, MetaSchedule's tuned ones)
are left alone. ``counts`` says how many functions each rule scheduled. A rule that raises on a
function declines it (the function stays as before: never fail the build).

The rules, all from one per-block recipe (``_schedule_blocks``):

- ``contraction`` (a reduction block reading two or more buffers: conv, matmul, dense): a
  register tile of accumulators in a ``local`` cache (unrolled over up to two spatial axes,
  vectorized along the innermost spatial axis that divides into vector lanes), reduction loops
  between the parallel outer tile loop and the register tile, the elementwise epilogue (bias,
  rescale, ReLU, next quantizer) inlined into the tile's write-back;
- ``dlight.cpu.Reduction`` (TVM's rule: softmax, layer norm, RMS norm);
- ``loops`` (any other function in normal form: pooling, mean, elementwise chains): each
  reduction block tiled as above, each remaining spatial block parallel over its outer loops and
  vectorized along its innermost.

Spatial blocks are inlined into their consumers first, but never into a contraction (a quantizer
feeding a conv would otherwise be recomputed once per multiply-accumulate); into a window
reduction over one input (pooling) they are: a pool's padded input is then read in place.
"""
from __future__ import annotations

import contextlib
import logging

__all__ = ["schedule", "build", "RULES", "SCHEDULED_ATTR"]

_LOG = logging.getLogger(__name__)

SCHEDULED_ATTR = "tirx.is_scheduled"
# Below this many loop iterations a nest runs serially: waking the thread pool costs more than
# the loop. Measured on all-int8 ResNet-18, 2 threads, loaded 2-core box, spatial nests parallel
# from 4096 / 262144 elements / never: 52-57 / 56-57 / 63-68 ms in one run (default build
# 84-101), 30.5 / 29.6 / 31.0 ms medians of 6 rounds in another (default 45.2): a small
# threshold is never worse, the choice matters little.
_PARALLEL_MIN_ITERATIONS = 4096
_UNROLL = 4  # register-tile rows per unrolled axis: 4 × 4 tiles keep 16 accumulators in zmm registers


def _extent(sch, loop):
    """The loop's extent as an int, or None when symbolic."""
    from tvm import tirx
    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _largest_divisor(n, cap: int) -> int:
    """The largest divisor of ``n`` not above ``cap`` (1 for a symbolic ``n``)."""
    if n is None:
        return 1
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _lanes(sch, block, vector_bits: int) -> int:
    """Vector lanes for the block's written dtype."""
    bits = sch.get(block).writes[0].source.dtype.bits
    return max(1, vector_bits // max(bits, 8))


def _block_kinds(sch, block) -> str:
    from tvm import tirx
    return "".join("R" if iv.iter_type == tirx.IterVar.CommReduce else "S"
                   for iv in sch.get(block).iter_vars)


def _reads_buffers(sch, block) -> int:
    return len({r.source.name for r in sch.get(block).reads})


def _is_reduction(sch, block) -> bool:
    return "R" in _block_kinds(sch, block)


def _root_blocks(sch):
    try:
        root = sch.get_sblock("root", func_name="main")
    except Exception:  # noqa: BLE001 — no root block: not a function these rules schedule
        return []
    return list(sch.get_child_blocks(root))


def _window_reduction(sch, block) -> bool:
    """A reduction over ONE input (pooling, means): no multiply-accumulate of two operands."""
    blk = sch.get(block)
    own = {w.source.name for w in blk.writes}
    return _is_reduction(sch, block) and len({r.source.name for r in blk.reads} - own) == 1


def _inline_spatial(sch) -> None:
    """Inline spatial blocks into their consumers, never into a contraction (conv, matmul:
    a producer there would be recomputed once per multiply-accumulate), never an output block;
    repeat until nothing changes. Into a window reduction (pooling) they are inlined: a pool
    reads each input ~(k/s)^2 times, and a materialized pad of its input cost a full pass over
    it (ResNet-18's max pool on [1, 112, 112, 64] float32: 0.62 ms at 1 thread, most of it the
    3.3 MB padded copy)."""
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            if _is_reduction(sch, block):
                continue
            consumers = sch.get_consumers(block)
            if not consumers or any(_is_reduction(sch, c) and not _window_reduction(sch, c)
                                    for c in consumers):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # noqa: BLE001 — not inlinable (e.g. writes an output): keep it
                continue


def _parallel_vectorize(sch, block, vector_bits: int) -> None:
    """A spatial loop nest: fuse the outer loops into one parallel loop, vectorize the innermost."""
    loops = sch.get_loops(block)
    exts = [_extent(sch, lp) for lp in loops]
    lanes = _largest_divisor(exts[-1], _lanes(sch, block, vector_bits))
    outer = list(loops[:-1])
    if lanes > 1:
        o, i = sch.split(loops[-1], factors=[None, lanes])
        outer.append(o)
        sch.vectorize(i)
    else:
        outer.append(loops[-1])
    if _worth_parallel(exts):
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _worth_parallel(extents) -> bool:
    """Enough iterations to pay for waking the thread pool (a symbolic extent counts as many)."""
    total = 1
    for e in extents:
        if e is None:
            return True
        total *= e
    return total >= _PARALLEL_MIN_ITERATIONS


def _tile_reduction(sch, block, vector_bits: int) -> None:
    """A reduction block S…S R…R: parallel outer spatial tiles, the reduction loops, then an
    unrolled × vectorized register tile of accumulators in a ``local`` cache; the block's single
    elementwise consumer (the fused epilogue) is inlined into the tile's write-back."""
    kinds = _block_kinds(sch, block)
    n_s = len(kinds) - len(kinds.lstrip("S"))
    loops = sch.get_loops(block)
    if kinds[n_s:].strip("R") or len(loops) != len(kinds) or n_s == 0:
        raise ValueError(f"block loops {kinds} are not spatial then reduction")
    spatial, reduction = list(loops[:n_s]), list(loops[n_s:])
    exts = [_extent(sch, lp) for lp in spatial]
    cap = _lanes(sch, block, vector_bits)
    # Vectorize the innermost spatial axis that splits into ≥ 4 lanes (contiguous in the output
    # and, for NCHW conv / [K, N] matmul, in the input or weight); else the one with most lanes.
    lanes_of = [_largest_divisor(e, cap) for e in exts]
    v = next((i for i in reversed(range(n_s)) if lanes_of[i] >= 4),
             max(range(n_s), key=lambda i: (lanes_of[i], i)))
    tile_axes = [i for i in reversed(range(n_s)) if i != v and exts[i] not in (None, 1)][:2]
    outer, inner_loops = [], []
    for i, lp in enumerate(spatial):
        if i == v:
            lanes = lanes_of[i]
            rest = (exts[i] // lanes) if exts[i] is not None else None
            unroll = _largest_divisor(rest, _UNROLL) if not tile_axes else 1
            if unroll > 1:  # no other axis to tile: unroll this one for independent accumulators
                o, u, vi = sch.split(lp, factors=[None, unroll, lanes])
                outer.append(o)
                inner_loops.append(u)
            else:
                o, vi = sch.split(lp, factors=[None, lanes])
                outer.append(o)
            vec = (vi, lanes)
        elif i in tile_axes:
            u = _largest_divisor(exts[i], _UNROLL)
            o, ui = sch.split(lp, factors=[None, u])
            outer.append(o)
            inner_loops.append(ui)
        else:
            outer.append(lp)
    sch.reorder(*outer, *reduction, *inner_loops, vec[0])
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if _worth_parallel(exts + [_extent(sch, lp) for lp in reduction]):
        sch.parallel(fused)
    # Vectorize while the block still has its init: afterwards the update block is no longer a
    # complete reduction under the loop and ``vectorize`` refuses it.
    for lp in inner_loops:
        sch.unroll(lp)
    if vec[1] > 1:
        sch.vectorize(vec[0])
    consumers = sch.get_consumers(block)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, fused, preserve_unit_loops=True)
    if len(consumers) == 1 and not _is_reduction(sch, consumers[0]):
        # a consumer that is not elementwise on this buffer is not inlined: scheduled on its own
        with contextlib.suppress(Exception):
            sch.reverse_compute_inline(consumers[0])
    sch.decompose_reduction(block, reduction[0])
    last = sch.get_loops(write_back)[-1]  # the tile's store: a short loop along the output's last axis
    if (_extent(sch, last) or 1) > 1:
        sch.vectorize(last)


def _schedule_blocks(func, target, only_contractions: bool):
    """The per-block recipe shared by the ``contraction`` and ``loops`` rules."""
    from tvm import s_tir
    from tvm.target.codegen import llvm_get_vector_width
    if getattr(target.kind, "name", "") != "llvm":
        return None
    sch = s_tir.Schedule(func)
    blocks = _root_blocks(sch)
    if not blocks or not all(_plain_loops(sch, b) for b in blocks):
        return None
    if only_contractions and not any(_is_reduction(sch, b) and _reads_buffers(sch, b) >= 2
                                     for b in blocks):
        return None
    vector_bits = llvm_get_vector_width(target)
    vector_bits = vector_bits if vector_bits > 0 else 128
    _inline_spatial(sch)
    # Reductions first: their write-back absorbs the epilogue (which then no longer exists).
    for name in [sch.get(b).name_hint for b in _root_blocks(sch) if _is_reduction(sch, b)]:
        _tile_reduction(sch, sch.get_sblock(name), vector_bits)
    for block in _root_blocks(sch):
        if not _is_reduction(sch, block) and not _is_parallel(sch, block):
            _parallel_vectorize(sch, block, vector_bits)
    return sch


def _plain_loops(sch, block) -> bool:
    """One serial loop per block iterator, as legalization leaves them: anything else was
    scheduled by someone (MetaSchedule's database, a hand schedule) and is not touched."""
    from tvm import tirx
    loops = sch.get_loops(block)
    return (len(loops) == len(sch.get(block).iter_vars) > 0
            and all(sch.get(lp).kind == tirx.ForKind.SERIAL for lp in loops))


def _is_parallel(sch, block) -> bool:
    from tvm import tirx
    return any(sch.get(lp).kind == tirx.ForKind.PARALLEL for lp in sch.get_loops(block))


def _recipe(only_contractions: bool):
    from tvm.s_tir import dlight as dl

    class _Recipe(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            return _schedule_blocks(func, target, only_contractions)

    return _Recipe()


def _dlight_cpu_reduction():
    from tvm.s_tir import dlight as dl
    return dl.cpu.Reduction()


# (name, rule factory) in the order they are tried: the first that schedules a function wins.
RULES = (("contraction", lambda: _recipe(True)),
         ("dlight.cpu.Reduction", _dlight_cpu_reduction),
         ("loops", lambda: _recipe(False)))


def schedule(mod, target):
    """Schedule every unscheduled PrimFunc of a legalized, fused Relax module for a CPU target.

    Requires: ``mod`` after LegalizeOps / FuseOps / FuseTIR; ``target`` a ``tvm.target.Target``.
    Guarantees: the same computation; each function one of ``RULES`` schedules carries
    ``tirx.is_scheduled``; returns ``(mod, counts)`` with ``counts[name]`` functions per rule,
    ``counts["kept"]`` already-scheduled functions left alone and ``counts["unscheduled"]`` the
    ones no rule took (they run as before)."""
    from tvm import tirx
    from tvm.s_tir import dlight as dl
    counts = {name: 0 for name, _ in RULES}
    counts.update(kept=0, unscheduled=0)

    class _Counted(dl.ScheduleRule):
        def __init__(self, name, rule):
            self.name, self.rule = name, rule

        def apply(self, func, target, tunable):
            try:
                sch = self.rule.apply(func, target, tunable)
            except Exception as e:  # noqa: BLE001 — the rule cannot schedule it: the next rule tries
                _LOG.debug("schedule rule %s declined a function: %s", self.name,
                           str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                return None
            if sch is not None:
                counts[self.name] += 1
            return sch

    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None \
                and bool(func.attrs.get(SCHEDULED_ATTR, False)):
            counts["kept"] += 1
    with target:
        out = dl.ApplyDefaultSchedule(*[_Counted(n, make()) for n, make in RULES])(mod)
    n_prim = sum(isinstance(f, tirx.PrimFunc) for _, f in out.functions_items())
    counts["unscheduled"] = n_prim - counts["kept"] - sum(counts[n] for n, _ in RULES)
    return out, counts


def build(mod, unscheduled, target):
    """``tvm.compile`` of a scheduled module; if it fails, every function the rules scheduled is
    built alone, the ones that fail go back to their ``unscheduled`` form, and the module is
    compiled again. Returns ``(executable, reverted)``: the names of the functions put back."""
    import tvm
    from tvm import tirx
    try:
        return tvm.compile(mod, target=target), []
    except Exception:  # noqa: BLE001 — a schedule LLVM / the TIR passes refuse: find and revert it
        _LOG.debug("scheduled module failed to build; checking each scheduled function")
    reverted = []
    before = {gv.name_hint: f for gv, f in unscheduled.functions_items()}
    for gv, func in list(mod.functions_items()):
        plain = before.get(gv.name_hint)
        if not isinstance(func, tirx.PrimFunc) or plain is None or plain.same_as(func):
            continue
        try:
            tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                           target=target)
        except Exception:  # noqa: BLE001 — this schedule does not build: keep the plain loops
            mod[gv] = plain
            reverted.append(gv.name_hint)
    return tvm.compile(mod, target=target), reverted

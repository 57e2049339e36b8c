"""Epilogues fused into the hand kernels: the ops after a conv or a Linear (the s8 shift's
correction, channel un-padding, rescale, bias, ReLU / GELU, residual add, the next layer's quantize
to u8 / s8) are computed in the kernel's tile write-back, so the int32 accumulators never become a
tensor.

How: every conv kernel (VNNI, bf16, fp32: ``tvm_kernels._accumulate_in_registers``) and the VNNI
dense kernel (``tvm_kernels.dense_vnni``: each task's tile written out to the layer's leading
dims) marks its blocks ``KERNEL_BLOCK`` and its tile write-back ``EPILOGUE_SITE``. ``fuse_with_kernels`` replaces the
plain fusion pipeline (``tvm_lower.fuse_pipeline``):

1. LegalizeOps; every legalized function's indices narrowed to int32 (the kernels' own: FuseTIR
   refuses a group whose buffers differ in index type);
2. the kernels with a site declared ``kOutEWiseFusable`` (else they stay opaque), so FuseOps puts
   each with its elementwise consumers in one group and FuseTIR merges them;
3. in each merged function (``inline_epilogue``): every non-kernel block is inlined into its
   consumer, then the last one, which reads the accumulators, into the write-back
   (``reverse_compute_inline``); the function is then scheduled (``tirx.is_scheduled``);
4. a kernel whose group cannot be inlined that way (an op that is not elementwise in the output's
   index, a producer of the kernel's input) is made opaque again and the fusion redone: that
   layer's epilogue stays a separate function, as before (all kernels, when FuseTIR cannot merge
   a group at all).

Why, measured: see ``bench/results/README.md`` ("epilogue").
"""
from __future__ import annotations

import contextlib

__all__ = ["KERNEL_BLOCK", "EPILOGUE_SITE", "mark_kernel_blocks", "fuse_with_kernels",
           "inline_epilogue"]

KERNEL_BLOCK = "fliqs.kernel"  # annotation on every block of a hand kernel: its id
EPILOGUE_SITE = "fliqs.epilogue_site"  # annotation on the tile write-back block
_FUSABLE, _OPAQUE = 4, 8  # relax OpPatternKind kOutEWiseFusable / kOpaque
_SCHEDULED = "tirx.is_scheduled"


def mark_kernel_blocks(sch, kernel_id: str) -> None:
    """Annotate every block of the kernel being scheduled in ``sch`` with ``KERNEL_BLOCK``
    (``kernel_id``, unique per kernel), and its write-back block (annotated ``EPILOGUE_SITE`` by
    the schedule) with the same id."""
    for rv in _blocks(sch):
        sch.annotate(rv, KERNEL_BLOCK, kernel_id)
        if _annotation(sch, rv, EPILOGUE_SITE) is not None:
            sch.unannotate(rv, EPILOGUE_SITE)  # annotate keeps an existing value
            sch.annotate(rv, EPILOGUE_SITE, kernel_id)


def _blocks(sch) -> list:
    """Block handles of every block under the root of ``sch``'s function."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _annotation(sch, rv, key):
    value = sch.get(rv).annotations.get(key)
    return None if value is None else str(value)


def inline_epilogue(func):
    """``func`` (a FuseTIR merge of one kernel and its consumers) with every non-kernel block
    inlined into the kernel's write-back, or None when one cannot be (the caller then keeps that
    kernel opaque). A function without a site, or with nothing after it, comes back unchanged."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    sites = [b for b in blocks if _annotation(sch, b, EPILOGUE_SITE) is not None]
    if len(sites) != 1:
        return func if not sites else None
    site = sites[0]
    others = [b for b in blocks if _annotation(sch, b, KERNEL_BLOCK) is None]
    for b in others:  # into their consumers: what is left reads the accumulators, once
        # a block that writes the output (or is not elementwise) stays: the next step takes it
        with contextlib.suppress(Exception):
            sch.compute_inline(b)
    while sch.get_consumers(site):
        try:
            sch.reverse_compute_inline(sch.get_consumers(site)[0])
        except Exception:  # noqa: BLE001 — not elementwise in the output's index
            return None
    if any(_annotation(sch, b, KERNEL_BLOCK) is None for b in _blocks(sch)):
        return None  # a producer of the kernel's input: not an epilogue
    return sch.mod["main"]


def _kernel_ids(func) -> set:
    """The ``KERNEL_BLOCK`` ids of the kernels with an epilogue site in ``func``."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    return {v for v in (_annotation(sch, b, EPILOGUE_SITE) for b in _blocks(sch)) if v}


def _narrowed(mod):
    """A copy of ``mod`` with every legalized (not yet scheduled) PrimFunc's indices int32, like
    the kernels'; None when one cannot be narrowed (int64 data: a ``take``'s indices — fused with
    int32 neighbours, FuseTIR would reject the mix; a tensor of 2^31 elements or more)."""
    import tvm
    narrow = tvm.tirx.transform.ForceNarrowIndexToInt32()
    out = mod.clone()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc) and _SCHEDULED not in (func.attrs or {}):
            if any(_elements(p) >= 2 ** 31 for p in func.params):
                return None  # int32 indices would overflow
            try:
                out[gv] = narrow(tvm.IRModule({gv: func}))[gv.name_hint]
            except Exception:  # noqa: BLE001 — TVM raises InternalError for int64 buffers
                return None
    return out


def _elements(buffer) -> int:
    """Elements of a PrimFunc parameter's buffer (0 when its shape is not static)."""
    n = 1
    for d in getattr(buffer, "shape", ()):
        if not hasattr(d, "value"):
            return 0
        n *= int(d.value)
    return n


def _kernel_sites(mod) -> dict:
    """``{function name: ids}`` of the hand kernels in ``mod`` that have an epilogue site (only
    scheduled functions can be kernels)."""
    import tvm
    sites = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and _SCHEDULED in (func.attrs or {}):
            ids = _kernel_ids(func)
            if ids:
                sites[gv.name_hint] = ids
    return sites


def _with_pattern(mod, kernels: dict, fusable: set):
    """``mod`` with each of ``kernels`` fusable when its ids are in ``fusable``, else opaque."""
    for name, ids in kernels.items():
        gv = mod.get_global_var(name)
        mod[gv] = mod[gv].with_attr("op_pattern", _FUSABLE if ids <= fusable else _OPAQUE)
    return mod


def _fuse(mod):
    from tvm import relax
    return relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))


def fuse_with_kernels(mod):
    """LegalizeOps, AnnotateTIROpPattern, FuseOps, FuseTIR (``tvm_lower.fuse_pipeline``'s steps)
    with the conv kernels' epilogues fused into them (module docstring). Exact: the same ops on
    the same values, in the write-back loop. Where it cannot (no kernel with a site, see
    ``_narrowed``, or FuseTIR rejects a group), the plain pipeline with every kernel opaque: the
    behaviour before."""
    import tvm
    from tvm import relax
    legal = relax.transform.LegalizeOps()(mod)
    kernels = _kernel_sites(legal)
    narrowed = _narrowed(legal) if kernels else None
    if narrowed is not None:
        narrowed = relax.transform.AnnotateTIROpPattern()(narrowed)
        fusable = set().union(*kernels.values())
        while fusable:
            try:
                fused = _fuse(_with_pattern(narrowed, kernels, fusable))
            except Exception:  # noqa: BLE001 — a group FuseTIR cannot merge
                break
            failed = set()
            for gv, func in list(fused.functions.items()):
                if not isinstance(func, tvm.tirx.PrimFunc) or _SCHEDULED in (func.attrs or {}):
                    continue
                ids = _kernel_ids(func)
                merged = inline_epilogue(func) if ids else func
                if merged is None:
                    failed |= ids
                elif ids:
                    fused[gv] = merged.with_attr(_SCHEDULED, True)
            if not failed:
                return fused
            fusable -= failed
    return _fuse(relax.transform.AnnotateTIROpPattern()(legal))

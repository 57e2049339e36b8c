"""ONNX handlers: shape arithmetic (folds to constants once shapes are pinned), data
movement and Resize (registered into :data:`.onnx_ops.OPS`)."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F

from fliqs_compiler.frontends.builder import V, check_numel, require_const
from fliqs_compiler.frontends.onnx_ops import attr_or_input, axis_of, op, tensor_value, torch_pad_order


# ---- shapes and data movement -----------------------------------------------------------
@op("Shape")
def _shape(b, n, x, a):
    """The (pinned) static shape as an int64 constant; start/end honoured."""
    shape = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", len(shape))
    return V(const=torch.tensor(shape[start:end], dtype=torch.int64))


@op("Size")
def _size(b, n, x, a):
    return V(const=torch.tensor(math.prod(x[0].shape), dtype=torch.int64))


@op("Constant")
def _constant(b, n, x, a):
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return V(const=torch.tensor(a[key], dtype=dtype), name=n.name)
    if "value" in a:
        return tensor_value(a["value"], n.name)
    raise n.fail("only dense tensor/float/int values are supported")


@op("ConstantOfShape")
def _constant_of_shape(b, n, x, a):
    shape = require_const(x[0], "shape", n.name).ints()
    if any(d < 0 for d in shape):
        raise n.fail(f"negative dimension in shape {shape}")
    check_numel(shape, f"node {n.name!r} (ConstantOfShape)")
    if "value" in a:
        fill = tensor_value(a["value"], n.name).const.reshape(-1)
    else:
        fill = torch.zeros(1, dtype=torch.float32)
    return V(const=fill.expand(shape).clone() if shape else fill.reshape(()).clone())


@op("Range")
def _range(b, n, x, a):
    s, e, d = (require_const(v, "start/limit/delta", n.name) for v in x[:3])
    start, limit, delta = s.const.item(), e.const.item(), d.const.item()
    if delta == 0:
        raise n.fail("delta is 0")
    check_numel([max(math.ceil((limit - start) / delta), 0)], f"node {n.name!r} (Range)")
    return V(const=torch.arange(start, limit, delta, dtype=s.dtype))


@op("Reshape")
def _reshape(b, n, x, a):
    """torch.reshape to a constant shape; 0 copies the input dim unless allowzero."""
    shape = require_const(x[1], "shape", n.name).ints()
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return b.call(torch.reshape, x[0], tuple(shape))


@op("Flatten")
def _flatten(b, n, x, a):
    shape = x[0].shape
    axis = axis_of(a.get("axis", 1), len(shape))
    if axis == 1 and len(shape) >= 2:
        return b.call(torch.flatten, x[0], 1)
    return b.call(torch.reshape, x[0], (math.prod(shape[:axis]), math.prod(shape[axis:])))


@op("Transpose")
def _transpose(b, n, x, a):
    perm = a.get("perm", list(reversed(range(x[0].ndim))))
    if sorted(perm) != list(range(x[0].ndim)):
        raise n.fail(f"perm={perm} is not a permutation of the input's {x[0].ndim} axes")
    return b.call(torch.permute, x[0], tuple(perm))


@op("Squeeze")
def _squeeze(b, n, x, a):
    axes = attr_or_input(x, 1, a, "axes", None, n)
    if axes is None:
        axes = [i for i, d in enumerate(x[0].shape) if d == 1]
    return b.call(torch.squeeze, x[0], tuple(axis_of(d, x[0].ndim) for d in axes))


@op("Unsqueeze")
def _unsqueeze(b, n, x, a):
    axes = attr_or_input(x, 1, a, "axes", [], n)
    rank = x[0].ndim + len(axes)
    shape = list(x[0].shape)
    for d in sorted(axis_of(d, rank) for d in axes):
        shape.insert(d, 1)
    return b.call(torch.reshape, x[0], tuple(shape))


@op("Concat")
def _concat(b, n, x, a):
    vals = [v for v in x if v is not None and (v.ndim != 1 or v.shape[0] != 0 or len(x) == 1)]
    return b.call(torch.cat, vals, axis_of(a["axis"], x[0].ndim))


@op("Split")
def _split(b, n, x, a):
    """torch.split with sizes from input/attribute, or num_outputs equal parts."""
    axis = axis_of(a.get("axis", 0), x[0].ndim)
    dim = x[0].shape[axis]
    sizes = attr_or_input(x, 1, a, "split", None, n)
    if not sizes:
        parts = a.get("num_outputs", n.num_outputs)
        each = -(-dim // parts)
        sizes = [min(each, dim - i * each) for i in range(parts)]
    return b.call(torch.split, x[0], list(sizes), axis)


@op("Slice")
def _slice(b, n, x, a):
    """Constant starts/ends/axes/steps; negative steps use index_select."""
    rank = x[0].ndim
    if n.opset < 10:
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = require_const(x[1], "starts", n.name).ints()
        ends = require_const(x[2], "ends", n.name).ints()
        axes = attr_or_input(x, 3, {}, "axes", list(range(len(starts))), n)
        steps = attr_or_input(x, 4, {}, "steps", [1] * len(starts), n)
    index = [slice(None)] * rank
    out = x[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = axis_of(axis, rank)
        size = x[0].shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
        else:
            start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            idx = torch.tensor(list(range(start, end, step)), dtype=torch.int64)
            out = b.call(torch.index_select, out, axis, V(const=idx))
    if any(s != slice(None) for s in index):
        out = b.call(operator.getitem, out, tuple(index))
    return out


@op("Gather")
def _gather(b, n, x, a):
    """Scalar index → torch.select; else index_select + reshape (negative indices wrap)."""
    data, idx = x[0], x[1]
    axis = axis_of(a.get("axis", 0), data.ndim)
    dim = data.shape[axis]
    if idx.is_const:
        i = torch.where(idx.const < 0, idx.const + dim, idx.const).to(torch.int64)
        if i.ndim == 0:
            return b.call(torch.select, data, axis, int(i))
        idx = V(const=i)
    else:
        idx = b.call(torch.where, b.call(torch.lt, idx, 0), b.call(torch.add, idx, dim), idx)
    flat = b.call(torch.index_select, data, axis, b.call(torch.reshape, idx, (-1,)))
    shape = data.shape[:axis] + idx.shape + data.shape[axis + 1:]
    return b.call(torch.reshape, flat, shape)


@op("GatherElements")
def _gather_elements(b, n, x, a):
    axis = axis_of(a.get("axis", 0), x[0].ndim)
    idx = x[1]
    if idx.is_const:
        idx = V(const=torch.where(idx.const < 0, idx.const + x[0].shape[axis], idx.const).long())
    return b.call(torch.gather, x[0], axis, idx)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@op("Pad")
def _pad(b, n, x, a):
    """F.pad (constant/reflect/edge/wrap) with constant pads, optional axes."""
    rank = x[0].ndim
    mode = _PAD_MODES.get(a.get("mode", "constant"))
    if mode is None:
        raise n.fail(f"pad mode {a.get('mode')!r} is not supported")
    if n.opset < 11:
        pads, value = list(a["pads"]), a.get("value", 0.0)
    else:
        pads = require_const(x[1], "pads", n.name).ints()
        value = x[2].const.item() if len(x) > 2 and x[2] is not None else 0.0
        if len(x) > 2 and x[2] is not None and not x[2].is_const:
            raise n.fail("a run-time constant_value is not supported")
    axes = attr_or_input(x, 3, {}, "axes", list(range(rank)), n)
    full = [0] * (2 * rank)
    k = len(axes)
    for j, axis in enumerate(axes):
        axis = axis_of(axis, rank)
        full[axis], full[axis + rank] = pads[j], pads[j + k]
    order = torch_pad_order(full)  # last dim first
    while len(order) > 2 and order[-1] == 0 and order[-2] == 0:
        order = order[:-2]
    if not any(order):
        return x[0]
    if mode == "constant":
        return b.call(F.pad, x[0], order, "constant", value)
    try:  # torch pads only the trailing 1-3 dims in these modes, without negative pads
        return b.call(F.pad, x[0], order, mode)
    except (RuntimeError, NotImplementedError, ValueError):
        return _pad_by_index(b, x[0], full, a.get("mode"))


def _pad_source(mode: str, idx: np.ndarray, size: int) -> np.ndarray:
    """ONNX Pad: the input index each padded position reads. reflect mirrors without
    repeating the edge element, edge repeats it, wrap continues periodically."""
    if mode == "edge":
        return np.clip(idx, 0, size - 1)
    if mode == "wrap":
        return np.mod(idx, size)
    period = 2 * (size - 1)
    if period == 0:
        return np.zeros_like(idx)
    m = np.mod(idx, period)
    return np.where(m >= size, period - m, m)


def _pad_by_index(b, xv, full, mode):
    """reflect / edge / wrap padding (or cropping) on any axis: one index_select per padded
    axis with indices computed here."""
    rank = xv.ndim
    out = xv
    for axis in range(rank):
        begin, end = full[axis], full[axis + rank]
        if begin == 0 and end == 0:
            continue
        size = xv.shape[axis]
        check_numel([size + begin + end], "Pad")
        idx = _pad_source(mode, np.arange(-begin, size + end), size).astype(np.int64)
        out = b.call(torch.index_select, out, axis, V(const=torch.from_numpy(idx)))
    return out


@op("Expand")
def _expand(b, n, x, a):
    shape = require_const(x[1], "shape", n.name).ints()
    target = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return x[0] if tuple(target) == x[0].shape else b.call(torch.broadcast_to, x[0], target)


@op("Tile")
def _tile(b, n, x, a):
    return b.call(torch.tile, x[0], tuple(require_const(x[1], "repeats", n.name).ints()))


@op("Einsum")
def _einsum(b, n, x, a):
    return b.call(torch.einsum, a["equation"], *x)


@op("CumSum")
def _cumsum(b, n, x, a):
    axis = axis_of(require_const(x[1], "axis", n.name).ints()[0], x[0].ndim)
    if a.get("exclusive", 0):
        raise n.fail("exclusive=1 is not supported")
    if a.get("reverse", 0):
        flipped = b.call(torch.flip, x[0], (axis,))
        return b.call(torch.flip, b.call(torch.cumsum, flipped, axis), (axis,))
    return b.call(torch.cumsum, x[0], axis)


@op("Trilu")
def _trilu(b, n, x, a):
    k = require_const(x[1], "k", n.name).ints()[0] if len(x) > 1 and x[1] is not None else 0
    return b.call(torch.triu if a.get("upper", 1) else torch.tril, x[0], k)


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(b, n, x, a):
    bs = a["blocksize"]
    N, C, H, W = x[0].shape
    if n.op == "SpaceToDepth":
        t = b.call(torch.reshape, x[0], (N, C, H // bs, bs, W // bs, bs))
        crd = a.get("mode", "DCR") == "CRD"
        t = b.call(torch.permute, t, (0, 1, 3, 5, 2, 4) if crd else (0, 3, 5, 1, 2, 4))
        return b.call(torch.reshape, t, (N, C * bs * bs, H // bs, W // bs))
    if a.get("mode", "DCR") == "CRD":
        return b.call(F.pixel_shuffle, x[0], bs)
    t = b.call(torch.reshape, x[0], (N, bs, bs, C // (bs * bs), H, W))
    t = b.call(torch.permute, t, (0, 3, 4, 1, 5, 2))
    return b.call(torch.reshape, t, (N, C // (bs * bs), H * bs, W * bs))


# ---- Resize -----------------------------------------------------------------------------
_INTERP_LINEAR = {3: "linear", 4: "bilinear", 5: "trilinear"}


@op("Resize", "Upsample")
def _resize(b, n, x, a):
    """F.interpolate where torch is exact; other nearest / linear coordinate modes via constant
    index_select (+ lerp) per axis; cubic only where F.interpolate matches."""
    xv = x[0]
    rank = xv.ndim
    if n.op == "Upsample" or n.opset < 11:
        scales_v, sizes_v = (x[1] if len(x) > 1 else None), None
        scales = require_const(scales_v, "scales", n.name).floats() if scales_v else a.get("scales")
        coord, nearest = "asymmetric", "floor"
    else:
        scales_v = x[2] if len(x) > 2 else None
        sizes_v = x[3] if len(x) > 3 else None
        scales = require_const(scales_v, "scales", n.name).floats() \
            if scales_v is not None and scales_v.shape != (0,) else None
        coord = a.get("coordinate_transformation_mode", "half_pixel")
        nearest = a.get("nearest_mode", "round_prefer_floor")
    sizes = require_const(sizes_v, "sizes", n.name).ints() \
        if sizes_v is not None and sizes_v.shape != (0,) else None
    if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise n.fail("Resize with keep_aspect_ratio_policy is not supported")
    if a.get("axes") is not None:  # scales/sizes given for some axes only
        axes = [axis_of(d, rank) for d in a["axes"]]
        if scales:
            full = [1.0] * rank
            for d, v in zip(axes, scales):
                full[d] = v
            scales = full
        if sizes:
            full = list(xv.shape)
            for d, v in zip(axes, sizes):
                full[d] = v
            sizes = full
    if sizes is None and scales is None:
        raise n.fail("Resize needs scales or sizes")
    lead = sizes[:2] if sizes else scales[:2]
    if list(lead) not in ([1.0, 1.0], list(xv.shape[:2])):
        raise n.fail("Resize of batch/channel dims is not supported")
    mode = {"bilinear": "linear"}.get(a.get("mode", "nearest"), a.get("mode", "nearest"))
    size_kw = ({"size": tuple(sizes[2:])} if sizes else
               {"scale_factor": tuple(scales[2:]), "recompute_scale_factor": False})
    if mode == "nearest":
        ratios = [o / i for o, i in zip(sizes[2:], xv.shape[2:])] if sizes else scales[2:]
        integer_up = all(r >= 1 and float(r).is_integer() for r in ratios) and \
            nearest in ("round_prefer_floor", "round_prefer_ceil")
        if (coord == "asymmetric" and nearest == "floor") or (
                integer_up and coord in ("half_pixel", "pytorch_half_pixel")):
            return b.call(F.interpolate, xv, mode="nearest", **size_kw)
        if coord in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
            return b.call(F.interpolate, xv, mode="nearest-exact", **size_kw)
        return _nearest_by_index(b, n, xv, sizes, scales, coord, nearest)
    if mode in ("linear", "cubic"):
        if a.get("antialias", 0) and any(r < 1 for r in (scales[2:] if scales else [
                o / i for o, i in zip(sizes[2:], xv.shape[2:])])):
            raise n.fail("antialiased downsampling Resize has no exact torch equivalent")
        outs = [s_ for _, _, s_, _ in _resized_axes(xv, sizes, scales)]
        # ONNX's align_corners uses the *fractional* resized length in*scale when scales are given
        fractional = bool(scales) and any(not float(xv.shape[d] * scales[d]).is_integer()
                                          for d in range(2, rank))
        exact = coord == "half_pixel" or (coord == "align_corners" and not fractional) or (
            coord == "pytorch_half_pixel" and all(o > 1 for o in outs))
        if mode == "cubic" and exact and a.get("cubic_coeff_a", -0.75) == -0.75 and rank == 4 \
                and not a.get("exclude_outside", 0):
            return b.call(F.interpolate, xv, mode="bicubic", align_corners=coord == "align_corners",
                          **size_kw)
        if mode == "linear" and exact and rank in _INTERP_LINEAR:
            return b.call(F.interpolate, xv, mode=_INTERP_LINEAR[rank],
                          align_corners=coord == "align_corners", **size_kw)
        if mode == "linear" and coord in _COORD:
            return _linear_by_index(b, xv, sizes, scales, coord)
    raise n.fail(f"Resize mode={mode!r} coordinate_transformation_mode={coord!r} "
                 f"nearest_mode={nearest!r} has no exact torch equivalent")


_ROUND = {
    "round_prefer_floor": lambda v: np.ceil(v - 0.5),
    "round_prefer_ceil": lambda v: np.floor(v + 0.5),
    "floor": np.floor, "ceil": np.ceil,
}
_COORD = {  # ONNX Resize: output index o → input coordinate, per axis (s: scale, i: input size,
    # out: integer output size, ln: ONNX's length_resized = i*s when scales are given)
    "half_pixel": lambda o, s, i, out, ln: (o + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda o, s, i, out, ln: (o + 0.5) / s - 0.5 if ln > 1 else 0 * o,
    "asymmetric": lambda o, s, i, out, ln: o / s,
    "align_corners": lambda o, s, i, out, ln: o * (i - 1) / (ln - 1) if ln > 1 else 0 * o,
    "tf_half_pixel_for_nn": lambda o, s, i, out, ln: (o + 0.5) / s,
    "half_pixel_symmetric":
        lambda o, s, i, out, ln: (i / 2) * (1 - out / (s * i)) + (o + 0.5) / s - 0.5,
}


def _resized_axes(xv, sizes, scales):
    """(axis, size_in, size_out, scale) for every spatial axis Resize changes (``size_out`` is
    the integer output size)."""
    out = []
    for axis in range(2, xv.ndim):
        size_in = xv.shape[axis]
        scale = scales[axis] if scales else sizes[axis] / size_in
        size_out = sizes[axis] if sizes else int(math.floor(size_in * scale))
        check_numel([size_out], "Resize")
        if not (size_out == size_in and scale == 1.0):
            out.append((axis, size_in, size_out, scale))
    return out


def _linear_by_index(b, xv, sizes, scales, coord):
    """Linear Resize for any coordinate mode, separably per axis: two index_selects with constant
    indices and a lerp with constant weights (coordinates clamped to the input, as ONNX does)."""
    out = xv
    for axis, size_in, size_out, scale in _resized_axes(xv, sizes, scales):
        o = np.arange(size_out, dtype=np.float64)
        length = size_in * scale if scales else size_out  # ONNX's length_resized
        src = np.clip(_COORD[coord](o, scale, size_in, size_out, length), 0, size_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, size_in - 1)
        shape = [1] * xv.ndim
        shape[axis] = size_out
        w_hi = torch.from_numpy((src - lo).astype(np.float32)).reshape(shape).to(xv.dtype)
        a_lo = b.call(torch.index_select, out, axis, V(const=torch.from_numpy(lo)))
        a_hi = b.call(torch.index_select, out, axis, V(const=torch.from_numpy(hi)))
        out = b.call(torch.lerp, a_lo, a_hi, V(const=w_hi))
    return out


def _nearest_by_index(b, n, xv, sizes, scales, coord, nearest):
    """Nearest Resize for any coordinate/rounding mode: one index_select per resized axis with
    indices computed here (shapes are static)."""
    if coord not in _COORD or nearest not in _ROUND:
        raise n.fail(f"Resize nearest with coordinate_transformation_mode={coord!r} / "
                     f"nearest_mode={nearest!r} is not supported")
    out = xv
    for axis, size_in, size_out, scale in _resized_axes(xv, sizes, scales):
        o = np.arange(size_out, dtype=np.float64)
        length = size_in * scale if scales else size_out
        src = _ROUND[nearest](_COORD[coord](o, scale, size_in, size_out, length))
        idx = torch.from_numpy(np.clip(src, 0, size_in - 1).astype(np.int64))
        out = b.call(torch.index_select, out, axis, V(const=idx))
    return out

"""ONNX handlers: elementwise, activations, Cast, conv / linear, normalization, pooling,
reductions (registered into :data:`.onnx_ops.OPS`)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fliqs_compiler.frontends.builder import V
from fliqs_compiler.frontends.onnx_ops import ONNX_TO_TORCH_DTYPE, attr_or_input, axis_of, op, qformat, torch_pad_order


# ---- elementwise --------------------------------------------------------------------------
_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos,
    "Not": torch.logical_not, "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish,
    "HardSwish": F.hardswish, "IsNaN": torch.isnan,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq,
    "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}
_LINEAR_TARGETS = (F.linear, torch.matmul)


@op(*_UNARY)
def _unary(b, n, x, a):
    """One torch callable per op (table ``_UNARY``)."""
    return b.call(_UNARY[n.op], x[0])


@op(*_BINARY)
def _binary(b, n, x, a):
    """Broadcasting binary op; a constant added to a MatMul/linear output trains (bias)."""
    lhs, rhs = x[0], x[1]
    if n.op == "Add":  # the bias of a MatMul (dynamo/TF exports) trains with its weight
        if _is_bias(rhs, lhs):
            rhs = b.param(rhs)
        elif _is_bias(lhs, rhs):
            lhs = b.param(lhs)
    return b.call(_BINARY[n.op], lhs, rhs)


def _is_bias(c: V, y: V) -> bool:
    """A finite constant vector along the last axis added to a MatMul/linear output — not an
    attention mask (a -inf causal mask added to Q·Kᵀ is data, not a weight)."""
    if not c.is_const or y.is_const or y.node.target not in _LINEAR_TARGETS:
        return False
    if not c.dtype.is_floating_point or not bool(torch.isfinite(c.const).all()):
        return False
    return c.ndim >= 1 and all(d == 1 for d in c.shape[:-1]) and y.ndim >= 1 \
        and c.shape[-1] == y.shape[-1]


@op(*_VARIADIC)
def _variadic(b, n, x, a):
    """Max/Min/Sum/Mean over any number of inputs, folded pairwise."""
    out = x[0]
    for v in x[1:]:
        out = b.call(_VARIADIC[n.op], out, v)
    return b.call(torch.div, out, float(len(x))) if n.op == "Mean" and len(x) > 1 else out


@op("Div")
def _div(b, n, x, a):
    """Float division; integer Div truncates toward zero (ONNX semantics)."""
    if x[0].dtype.is_floating_point:
        return b.call(torch.div, x[0], x[1])
    return b.call(torch.div, x[0], x[1], rounding_mode="trunc")


@op("Mod")
def _mod(b, n, x, a):
    return b.call(torch.fmod if a.get("fmod", 0) else torch.remainder, x[0], x[1])


@op("Pow")
def _pow(b, n, x, a):
    """torch.pow, cast back to the base dtype (ONNX keeps the base type)."""
    out = b.call(torch.pow, x[0], x[1])
    return out if out.dtype == x[0].dtype else b.call(torch.Tensor.to, out, x[0].dtype)


@op("Where")
def _where(b, n, x, a):
    return b.call(torch.where, x[0], x[1], x[2])


@op("Identity", "Dropout")
def _identity(b, n, x, a):
    """Identity passes through; Dropout is inference-only (mask = all ones)."""
    if n.op == "Dropout":  # inference: identity, mask all ones
        training = x[2] if len(x) > 2 and x[2] is not None else None
        if a.get("training_mode") or (training is not None and (
                not training.is_const or bool(training.const.any()))):
            raise n.fail("Dropout in training mode is not supported; export in eval mode")
        return [x[0], V(const=torch.ones(x[0].shape, dtype=torch.bool))]
    return x[0]


@op("Gelu")
def _gelu(b, n, x, a):
    return b.call(F.gelu, x[0], approximate=a.get("approximate", "none"))


@op("LeakyRelu")
def _leaky_relu(b, n, x, a):
    return b.call(F.leaky_relu, x[0], a.get("alpha", 0.01))


@op("Elu")
def _elu(b, n, x, a):
    return b.call(F.elu, x[0], a.get("alpha", 1.0))


@op("Selu")
def _selu(b, n, x, a):
    elu = b.call(F.elu, x[0], a.get("alpha", 1.67326319217681884765625))
    return b.call(torch.mul, elu, a.get("gamma", 1.05070102214813232421875))


@op("HardSigmoid")
def _hard_sigmoid(b, n, x, a):
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return b.call(F.hardsigmoid, x[0])
    return b.call(torch.clamp, b.call(torch.add, b.call(torch.mul, x[0], alpha), beta), 0.0, 1.0)


@op("PRelu")
def _prelu(b, n, x, a):
    """F.prelu (trainable slope) where it means the same, else where(x<0, x*slope, x).

    ONNX PRelu: "slope ... should be unidirectional broadcastable to input tensor X", i.e.
    numpy broadcasting, aligned from the *last* axis; F.prelu instead applies a 1-D weight along
    axis 1. They agree only for one slope value or a slope that, right-aligned, is (C, 1, …, 1)
    on axis 1 — a (C,) slope on an N×T×C tensor broadcasts over C, the last axis (tf2onnx /
    Keras PReLU), not over axis 1."""
    slope = x[1]
    if slope.is_const and _per_channel(slope.shape, x[0].shape):
        flat = V(const=slope.const.reshape(-1), name=slope.name)
        return b.call(F.prelu, x[0], b.param(flat))
    neg = b.call(torch.mul, x[0], b.param(slope))
    return b.call(torch.where, b.call(torch.lt, x[0], 0.0), neg, x[0])


def _per_channel(slope_shape, x_shape) -> bool:
    """Is ``slope`` (broadcast the ONNX way) one value, or one value per axis-1 channel?"""
    if math.prod(slope_shape) == 1:
        return True
    if len(x_shape) < 2 or len(slope_shape) > len(x_shape):
        return False
    full = (1,) * (len(x_shape) - len(slope_shape)) + tuple(slope_shape)
    return full[1] == x_shape[1] and all(d == 1 for i, d in enumerate(full) if i != 1)


@op("Clip")
def _clip(b, n, x, a):
    """torch.clamp with attribute (opset < 11) or input bounds."""
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    lo = lo.floats()[0] if isinstance(lo, V) and lo.is_const else lo
    hi = hi.floats()[0] if isinstance(hi, V) and hi.is_const else hi
    if lo is None and hi is None:
        return x[0]
    return b.call(torch.clamp, x[0], lo, hi)


@op("Softmax", "LogSoftmax")
def _softmax(b, n, x, a):
    """Softmax/LogSoftmax; opset < 13 coerces to 2-D at ``axis`` first."""
    fn = torch.softmax if n.op == "Softmax" else torch.log_softmax
    rank = x[0].ndim
    if n.opset >= 13:
        return b.call(fn, x[0], axis_of(a.get("axis", -1), rank))
    axis = axis_of(a.get("axis", 1), rank)  # opset < 13: coerced to 2-D at axis
    shape = x[0].shape
    flat = b.call(torch.reshape, x[0], (math.prod(shape[:axis]), math.prod(shape[axis:])))
    return b.call(torch.reshape, b.call(fn, flat, 1), shape)


@op("Cast")
def _cast(b, n, x, a):
    """Tensor.to; float8 casts saturate at the format's max_finite like ONNX saturate=1."""
    dtype = ONNX_TO_TORCH_DTYPE.get(a["to"])
    if dtype is None or a["to"] in (21, 22):
        raise n.fail(f"Cast to ONNX type {a['to']} is not supported")
    if x[0].dtype == dtype:
        return x[0]
    if a["to"] in (17, 19):  # float8: ONNX saturates (±inf too) to ±max_finite by default
        if not a.get("saturate", 1):
            raise n.fail("Cast to float8 with saturate=0 is not supported")
        fmt = qformat(a["to"], n)
        v = b.call(torch.clamp, x[0], -fmt.max_finite, fmt.max_finite)
        return b.call(torch.Tensor.to, v, dtype)
    return b.call(torch.Tensor.to, x[0], dtype)


@op("CastLike")
def _cast_like(b, n, x, a):
    return x[0] if x[0].dtype == x[1].dtype else b.call(torch.Tensor.to, x[0], x[1].dtype)


# ---- conv / linear / normalization -----------------------------------------------------------
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _same_pads(auto_pad, in_sizes, kernel, strides, dilations):
    """ONNX SAME_UPPER / SAME_LOWER padding as [begins..., ends...]."""
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begin = small if auto_pad == "SAME_UPPER" else total - small
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def _ints(n, a: dict, key: str, count: int, default, low: int = 1) -> list:
    """A per-spatial-axis attribute: ``count`` integers ≥ ``low`` (torch's meta kernels accept
    wrong lengths that the real kernels then refuse, so they are checked here)."""
    value = a.get(key, default)
    if not isinstance(value, (list, tuple)) or len(value) != count or \
            any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in value):
        raise n.fail(f"attribute {key}={value!r} does not fit its input: expected {count} "
                     f"integers >= {low}")
    return list(value)


def _geometry(n, a: dict, nd: int, kernel_default) -> tuple:
    """(kernel, strides, dilations), checked against the ``nd`` spatial axes."""
    return (_ints(n, a, "kernel_shape", nd, kernel_default), _ints(n, a, "strides", nd, [1] * nd),
            _ints(n, a, "dilations", nd, [1] * nd))


def _resolve_pads(n, a, in_sizes, kernel, strides, dilations):
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(auto_pad, in_sizes, kernel, strides, dilations)
    if auto_pad == "VALID":
        return [0] * (2 * len(kernel))
    if auto_pad != "NOTSET":
        raise n.fail(f"auto_pad={auto_pad!r} is not supported")
    return _ints(n, a, "pads", 2 * len(kernel), [0] * (2 * len(kernel)), low=0)


def _split_pads(b, xv, pads, value=0.0):
    """Return (input, symmetric padding): asymmetric pads are applied with an explicit F.pad."""
    k = len(pads) // 2
    if pads[:k] == pads[k:]:
        return xv, pads[:k]
    return b.call(F.pad, xv, torch_pad_order(pads), value=value), [0] * k


@op("Conv")
def _conv(b, n, x, a):
    """F.conv{1,2,3}d with trainable weight/bias; asymmetric/SAME pads become an F.pad."""
    w = b.param(x[1])
    bias = b.param(x[2]) if len(x) > 2 else None
    nd = w.ndim - 2
    if nd not in _CONV or x[0].ndim != nd + 2:
        raise n.fail(f"a {nd}-D kernel on a rank-{x[0].ndim} input is not a supported "
                     "convolution")
    kernel, strides, dilations = _geometry(n, a, nd, list(w.shape[2:]))
    if kernel != list(w.shape[2:]):
        raise n.fail(f"kernel_shape={kernel} does not match the weight shape {list(w.shape)}")
    pads = _resolve_pads(n, a, x[0].shape[2:], kernel, strides, dilations)
    inp, padding = _split_pads(b, x[0], pads)
    return b.call(_CONV[nd], inp, w, bias, strides, padding, dilations, a.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(b, n, x, a):
    """F.conv_transpose{1,2,3}d; output_shape/SAME/asymmetric pads crop or grow the result."""
    w = b.param(x[1])
    bias = b.param(x[2]) if len(x) > 2 else None
    nd = w.ndim - 2
    if nd not in _CONV_T or x[0].ndim != nd + 2:
        raise n.fail(f"a {nd}-D kernel on a rank-{x[0].ndim} input is not a supported "
                     "transposed convolution")
    groups = a.get("group", 1)
    kernel, strides, dilations = _geometry(n, a, nd, list(w.shape[2:]))
    if kernel != list(w.shape[2:]):
        raise n.fail(f"kernel_shape={kernel} does not match the weight shape {list(w.shape)}")
    out_pad = _ints(n, a, "output_padding", nd, [0] * nd, low=0)
    in_sizes = x[0].shape[2:]
    full = [s * (i - 1) + op_ + (k - 1) * d + 1
            for i, s, op_, k, d in zip(in_sizes, strides, out_pad, kernel, dilations)]
    auto_pad = a.get("auto_pad", "NOTSET")
    if "output_shape" in a or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(a["output_shape"])[-nd:] if "output_shape" in a else [
            i * s for i, s in zip(in_sizes, strides)]
        totals = [f - t for f, t in zip(full, target)]
        if auto_pad == "SAME_UPPER":
            begins = [t // 2 for t in totals]
        else:
            begins = [t - t // 2 for t in totals]
        pads = begins + [t - bg for t, bg in zip(totals, begins)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(a.get("pads", [0] * (2 * nd)))
    if pads[:nd] == pads[nd:] and all(p >= 0 for p in pads):
        return b.call(_CONV_T[nd], x[0], w, bias, strides, pads[:nd], out_pad, groups, dilations)
    # asymmetric (or negative, i.e. growing) pads: crop/extend the unpadded result, then bias
    out = b.call(_CONV_T[nd], x[0], w, None, strides, 0, out_pad, groups, dilations)
    out = b.call(F.pad, out, torch_pad_order([-p for p in pads]))
    if bias is None:
        return out
    return b.call(torch.add, out, b.call(torch.reshape, bias, (-1,) + (1,) * nd))


@op("Gemm")
def _gemm(b, n, x, a):
    """Constant B → F.linear with a trainable [N, K] weight (alpha/beta folded); else matmul."""
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    A, B = x[0], x[1]
    C = x[2] if len(x) > 2 else None
    if a.get("transA", 0):
        A = b.call(torch.transpose, A, 0, 1)
    if B.is_const:
        w = B.const if a.get("transB", 0) else B.const.t()
        w = w * alpha if alpha != 1.0 else w
        weight = b.param(V(const=w.contiguous(), name=B.name))
        bias = None
        if C is not None and C.is_const and C.const.numel() == w.shape[0] and C.ndim <= 2 \
                and (C.ndim < 2 or C.shape[0] == 1):
            cb = C.const.reshape(-1)
            bias = b.param(V(const=(cb * beta if beta != 1.0 else cb).contiguous(), name=C.name))
            C = None
        out = b.call(F.linear, A, weight, bias)
    else:
        if a.get("transB", 0):
            B = b.call(torch.transpose, B, 0, 1)
        out = b.call(torch.matmul, A, B)
        if alpha != 1.0:
            out = b.call(torch.mul, out, alpha)
    if C is not None:
        c = C if beta == 1.0 else b.call(torch.mul, C, beta)
        out = b.call(torch.add, out, c)
    return out


@op("MatMul")
def _matmul(b, n, x, a):
    """Constant 2-D float B → F.linear with a trainable [N, K] weight; else torch.matmul."""
    A, B = x[0], x[1]
    if B.is_const and B.ndim == 2 and not A.is_const and B.dtype.is_floating_point:
        weight = b.param(V(const=B.const.t().contiguous(), name=B.name))
        return b.call(F.linear, A, weight)
    if A.is_const and not B.is_const:
        A = b.param(A)
    return b.call(torch.matmul, A, B)


@op("BatchNormalization")
def _batch_norm(b, n, x, a):
    """F.batch_norm (inference) with trainable scale/bias, running stats as buffers."""
    if a.get("training_mode", 0):
        raise n.fail("training_mode=1 is not supported; export the model in eval mode")
    scale, bias = b.param(x[1]), b.param(x[2])
    momentum = 1.0 - a.get("momentum", 0.9)
    return b.call(F.batch_norm, x[0], x[3], x[4], scale, bias, False, momentum,
                  a.get("epsilon", 1e-5))


def _norm_param(b, v: Optional[V], shape) -> Optional[V]:
    if v is None:
        return None
    if v.is_const and tuple(v.shape) != tuple(shape) and v.const.numel() == math.prod(shape):
        v = V(const=v.const.reshape(shape), name=v.name)
    return b.param(v)


@op("LayerNormalization")
def _layer_norm(b, n, x, a):
    """F.layer_norm over dims ``axis:``; optional Mean/InvStdDev outputs computed too."""
    axis = axis_of(a.get("axis", -1), x[0].ndim)
    shape = x[0].shape[axis:]
    w = _norm_param(b, x[1], shape)
    bias = _norm_param(b, x[2] if len(x) > 2 else None, shape)
    eps = a.get("epsilon", 1e-5)
    out = b.call(F.layer_norm, x[0], list(shape), w, bias, eps)
    if n.num_outputs == 1:
        return out
    dims = tuple(range(axis, x[0].ndim))  # optional Mean / InvStdDev outputs
    mean = b.call(torch.mean, x[0], dims, True)
    var = b.call(torch.var, x[0], dims, correction=0, keepdim=True)
    return [out, mean, b.call(torch.rsqrt, b.call(torch.add, var, eps))]


@op("InstanceNormalization")
def _instance_norm(b, n, x, a):
    return b.call(F.instance_norm, x[0], None, None, b.param(x[1]), b.param(x[2]), True, 0.1,
                  a.get("epsilon", 1e-5))


@op("GroupNormalization")
def _group_norm(b, n, x, a):
    groups, channels = a["num_groups"], x[0].shape[1]
    params = []
    for v in x[1:3]:
        if v.is_const and v.const.numel() == groups and groups != channels:  # opset-18 form
            v = V(const=v.const.repeat_interleave(channels // groups), name=v.name)
        params.append(b.param(v))
    return b.call(F.group_norm, x[0], groups, params[0], params[1], a.get("epsilon", 1e-5))


# ---- pooling / reductions ---------------------------------------------------------------
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(n, a, xv):
    nd = xv.ndim - 2
    if "kernel_shape" not in a or nd < 1:
        raise n.fail("needs kernel_shape and an input of rank 3 or more")
    kernel, strides, dilations = _geometry(n, a, nd, None)
    pads = _resolve_pads(n, a, xv.shape[2:], kernel, strides, dilations)
    return nd, kernel, strides, dilations, pads


@op("MaxPool")
def _max_pool(b, n, x, a):
    """F.max_pool{n}d; pads torch cannot express are applied with -inf F.pad."""
    nd, kernel, strides, dilations, pads = _pool_geometry(n, a, x[0])
    if nd not in _MAX_POOL or a.get("storage_order", 0) or n.num_outputs > 1:
        raise n.fail("only 1-3-D MaxPool without the Indices output is supported")
    ceil = bool(a.get("ceil_mode", 0))
    fits = all(p <= k // 2 for p, k in zip(pads, kernel + kernel))
    if pads[:nd] == pads[nd:] and fits:
        inp, padding = x[0], pads[:nd]
    else:
        inp, padding = b.call(F.pad, x[0], torch_pad_order(pads), value=-math.inf), [0] * nd
    return b.call(_MAX_POOL[nd], inp, kernel, strides, padding, dilations, ceil)


@op("AveragePool")
def _avg_pool(b, n, x, a):
    """F.avg_pool{n}d; odd pads are explicit, count_include_pad=0 divides by window coverage."""
    nd, kernel, strides, dilations, pads = _pool_geometry(n, a, x[0])
    if nd not in _AVG_POOL or any(d != 1 for d in dilations):
        raise n.fail("only 1-3-D AveragePool without dilations is supported")
    ceil = bool(a.get("ceil_mode", 0))
    include = bool(a.get("count_include_pad", 0))
    fn = _AVG_POOL[nd]
    fits = all(p <= k // 2 for p, k in zip(pads, kernel + kernel))
    if pads[:nd] == pads[nd:] and fits:
        return b.call(fn, x[0], kernel, strides, pads[:nd], ceil, include)
    padded = b.call(F.pad, x[0], torch_pad_order(pads))
    out = b.call(fn, padded, kernel, strides, 0, ceil, True)
    if include:
        return out
    # exclude the pads: divide by the fraction of each window inside the input (a constant)
    ones = V(const=torch.ones((1, 1) + tuple(x[0].shape[2:]), dtype=x[0].dtype))
    frac = b.call(fn, b.call(F.pad, ones, torch_pad_order(pads)), kernel, strides, 0, ceil, True)
    return b.call(torch.div, out, frac)


@op("LRN")
def _lrn(b, n, x, a):
    """ONNX LRN: x / (bias + alpha/size · Σ x² over a window of channels)^beta. The window spans
    floor((size-1)/2) channels before and ceil((size-1)/2) after (torch's local_response_norm
    pads the other way round for even sizes, so it is spelled out here with standard ops)."""
    size = int(a["size"])
    alpha, beta, bias = a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
    shape = tuple(x[0].shape)
    before = (size - 1) // 2
    sq = b.call(torch.reshape, b.call(torch.mul, x[0], x[0]),
                (shape[0], 1, shape[1], math.prod(shape[2:])))
    sq = b.call(F.pad, sq, (0, 0, before, size - 1 - before))
    mean = b.call(torch.reshape, b.call(F.avg_pool2d, sq, (size, 1), 1), shape)
    den = b.call(torch.pow, b.call(torch.add, b.call(torch.mul, mean, alpha), bias), beta)
    return b.call(torch.div, x[0], den)


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(b, n, x, a):
    """Mean / amax over all spatial dims, keepdim."""
    dims = tuple(range(2, x[0].ndim))
    fn = torch.mean if n.op == "GlobalAveragePool" else torch.amax
    return b.call(fn, x[0], dims, True)


_REDUCE = {
    "ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax,
    "ReduceMin": torch.amin, "ReduceLogSumExp": torch.logsumexp,
}


@op(*_REDUCE, "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare")
def _reduce(b, n, x, a):
    """Reduce* with attribute or input axes, keepdims and noop_with_empty_axes."""
    rank = x[0].ndim
    axes = attr_or_input(x, 1, a, "axes", None, n)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x[0]
        axes = list(range(rank))
    dims = tuple(sorted(axis_of(d, rank) for d in axes))
    if n.op in _REDUCE:
        return b.call(_REDUCE[n.op], x[0], dims, keep)
    if n.op == "ReduceProd":
        out = x[0]
        for d in sorted(dims, reverse=True):
            out = b.call(torch.prod, out, d, keep)
        return out
    if n.op == "ReduceSumSquare":
        return b.call(torch.sum, b.call(torch.mul, x[0], x[0]), dims, keep)
    order = 1 if n.op == "ReduceL1" else 2
    return b.call(torch.linalg.vector_norm, x[0], order, dims, keep)


@op("ArgMax", "ArgMin")
def _arg(b, n, x, a):
    if a.get("select_last_index", 0):
        raise n.fail("select_last_index=1 is not supported")
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    return b.call(fn, x[0], axis_of(a.get("axis", 0), x[0].ndim), bool(a.get("keepdims", 1)))

"""Where the hand kernels' operands live: the shape arithmetic of a conv2d / matmul as the NHWC kernels
compute it (``ConvGeometry``, ``DenseGeometry``: channel and spatial padding, layout in and out,
leading dims folded), and the model-wide layout choice (``choose_layout``: NHWC end to end when
every conv is on a kernel or is a float image stem, ``nhwc_ready`` the per-conv test that
``tvm_measure`` applies too). Shared by the VNNI (``tvm_kernels``), bf16 and fp32 rewrites."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fliqs_compiler.backends.tvm_relax import calls, rewrite_calls

__all__ = ["CONV_LAYOUTS", "ConvGeometry", "DenseGeometry", "float_stem", "depthwise", "to_nhwc",
           "nhwc_ready", "choose_layout", "ceil_to"]


@dataclass(frozen=True)
class _ConvLayout:
    """How an activation layout reaches the kernel's NHWC: the axes of N, H, W, C, and the
    conversion to / from NHWC (none for NHWC itself)."""

    nhwc: tuple
    to: tuple = ()

    def to_nhwc(self, x):
        from tvm.relax import op
        return op.permute_dims(x, list(self.to)) if self.to else x

    def from_nhwc(self, y):
        from tvm.relax import op
        return op.permute_dims(y, [self.to.index(i) for i in range(4)]) if self.to else y


CONV_LAYOUTS = {"NCHW": _ConvLayout((0, 2, 3, 1), (0, 2, 3, 1)), "NHWC": _ConvLayout((0, 1, 2, 3))}


@dataclass(frozen=True)
class DenseGeometry:
    """``matmul(a [..., K], const w [K, N])`` as the hand dense kernels compute it: one GEMM over
    all leading dims (a transformer's Linear reads [B, T, C] tokens), K zero-padded to a multiple
    of ``in_step`` (``kp``), N to 16 (``np_``); zero weight rows / columns make any pad inert."""

    lead: tuple
    m: int
    k: int
    n: int
    kp: int
    np_: int

    @classmethod
    def of(cls, a, w, in_step: int, out_step: int = 16) -> "DenseGeometry":
        *lead, k = (int(d) for d in list(a.ty.shape))
        n = int(w.ty.shape[1])
        return cls(tuple(lead), int(np.prod(lead)), k, n, ceil_to(k, in_step), ceil_to(n, out_step))

    def padded_weight(self, w, dtype) -> np.ndarray:
        """The constant ``w`` [K, N] as ``[np_, kp]`` (out, in), zero-padded."""
        wn = np.zeros((self.np_, self.kp), dtype)
        wn[:self.n, :self.k] = w.value.numpy().T
        return wn

    def kernel_input(self, x):
        from tvm.relax import op
        if len(self.lead) > 1:
            x = op.reshape(x, [self.m, self.k])
        return op.nn.pad(x, [0, 0, 0, self.kp - self.k]) if self.kp != self.k else x

    @property
    def leading_output_shape(self) -> tuple:
        """``[*lead, np_]``: the dense kernels write the layer's leading dims themselves
        (``tvm_kernels.leading_write_back``), so no reshape ends the fusion of the ops after them."""
        return (*self.lead, self.np_)

    def layer_output(self, y):
        """The kernel's output ``y`` (``leading_output_shape``) as the layer's ``[*lead, N]``."""
        from tvm.relax import op
        if self.np_ == self.n:
            return y
        return op.strided_slice(y, axes=[len(self.lead)], begin=[0], end=[self.n])


@dataclass(frozen=True)
class ConvGeometry:
    """A conv2d call (NCHW / NHWC data, OIHW weight) as the hand NHWC kernels compute it: input
    channels zero-padded to a multiple of ``in_step`` (``ci``), output channels to 16 (``co``),
    the spatial padding applied before the kernel (``hp``, ``wp``: padded extents)."""

    layout: _ConvLayout
    nb: int
    cin: int
    cout: int
    ci: int
    co: int
    kh: int
    kw: int
    pads: tuple  # (top, left, bottom, right)
    stride: tuple
    hp: int
    wp: int

    @classmethod
    def of(cls, call, in_step: int, out_step: int = 16) -> "ConvGeometry":
        a, w, at = call.args[0], call.args[1], call.attrs
        layout = CONV_LAYOUTS[str(at.data_layout)]
        nb, h, wd, cin = (int(a.ty.shape[i]) for i in layout.nhwc)
        cout, _, kh, kw = (int(d) for d in w.ty.shape)
        pt, pl, pb, pr = (int(p) for p in at.padding)
        return cls(layout, nb, cin, cout, ceil_to(cin, in_step), ceil_to(cout, out_step), kh, kw,
                   (pt, pl, pb, pr), tuple(int(s) for s in at.strides), h + pt + pb, wd + pl + pr)

    @property
    def kernel_output_shape(self) -> tuple:
        sh, sw = self.stride
        return self.nb, (self.hp - self.kh) // sh + 1, (self.wp - self.kw) // sw + 1, self.co

    def padded_weight(self, w, dtype) -> np.ndarray:
        """The constant weight ``w`` (OIHW) zero-padded to ``[co, ci, kh, kw]``."""
        wn = np.zeros((self.co, self.ci, self.kh, self.kw), dtype)
        wn[:self.cout, :self.cin] = w.value.numpy()
        return wn

    def kernel_input(self, x, pad_value: float):
        """The activation ``x`` as the kernel reads it: NHWC, spatially padded, channels padded."""
        from tvm.relax import op
        x = self.layout.to_nhwc(x)
        pt, pl, pb, pr = self.pads
        if pt or pb or pl or pr or self.ci != self.cin:
            x = op.nn.pad(x, [0, 0, pt, pb, pl, pr, 0, self.ci - self.cin], pad_value=pad_value)
        return x

    def layer_output(self, y):
        """The kernel's NHWC output ``y`` back as the layer's: padded channels cut, layout restored."""
        from tvm.relax import op
        if self.co != self.cout:
            y = op.strided_slice(y, axes=[3], begin=[0], end=[self.cout])
        return self.layout.from_nhwc(y)


# A float conv reading at most this many input channels (an image stem) does not keep the model
# out of NHWC. Measured on ResNet-18, 2 threads, idle 2-core Zen 4 (``fliqs compile`` keeps the first
# and last layer float by default): int8 with a float stem and classifier 8.66 ms with transposes
# around the 19 VNNI convs vs 6.47 ms in NHWC throughout (bench/latency.py --configs int8-float-ends,
# before / after). Wider float convs stay NCHW (bench/layout_float_convs.py, NHWC forced): the fp8
# layers of a mixed model as fp32 convs (no avx512bf16) 16.2 ms vs 22.1 ms; all-fp32 34 vs 104 ms.
_NHWC_FLOAT_CONV_MAX_CIN = 4


def float_stem(call) -> bool:
    """A float32 conv2d (NCHW / NHWC data, OIHW weight) with at most ``_NHWC_FLOAT_CONV_MAX_CIN``
    input channels: cheap in NHWC, so it may run in the kernels' layout."""
    a, at = call.args[0], call.attrs
    layout = CONV_LAYOUTS.get(str(at.data_layout))
    return (layout is not None and a.ty.dtype == "float32" and str(at.out_dtype) in ("float32", "")
            and str(at.kernel_layout) == "OIHW"
            and int(a.ty.shape[layout.nhwc[3]]) <= _NHWC_FLOAT_CONV_MAX_CIN)


def depthwise(call) -> bool:
    """A depthwise conv2d (one group per input channel; NCHW / NHWC data, OIHW weight): TVM's own
    conv, rule-scheduled (``tvm_schedules``), is vectorized along the channels in NHWC, so it
    does not keep a model out of the kernels' layout. Why, measured (``bench/depthwise_layout.py``:
    a MobileNetV2-shaped model, 2 threads, medians of 7 interleaved rounds, identical outputs):
    int8 1.42 ms with its 10 depthwise convs in NHWC vs 4.18 ms in NCHW with transposes around
    every VNNI conv; fp32 2.45 vs 6.36 ms."""
    a, at = call.args[0], call.attrs
    layout = CONV_LAYOUTS.get(str(at.data_layout))
    return (layout is not None and str(at.kernel_layout) == "OIHW"
            and int(at.groups) > 1 and int(at.groups) == int(a.ty.shape[layout.nhwc[3]]))


def to_nhwc(mod):
    """Every conv2d in NHWC (weights stay OIHW: the rewrite packs them), the layout carried through
    the ops between convs (requantize, ReLU / ReLU6, residual add, pooling) by TVM's
    ConvertLayout, so consecutive convs meet without NCHW<->NHWC transposes; depthwise convs then
    read HWIO weights (``_depthwise_hwio``). ``clip`` (ReLU6) is
    spelled ``minimum(maximum(x, lo), hi)`` first: TVM 0.27's ConvertLayout cannot carry a layout
    through ``clip`` and put two transposes around each (MobileNetV2-shaped model, int8: 0.9 of
    2.2 ms)."""
    from tvm import relax
    nhwc = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OIHW"]})(_clip_as_min_max(mod))
    return _depthwise_hwio(nhwc)


def _clip_as_min_max(mod):
    """``mod`` with every ``clip(x, lo, hi)`` as ``minimum(maximum(x, lo), hi)`` (the same values:
    a clip is exactly that) in the dtype of ``x``."""
    from tvm import relax

    def rewrite(_, call):
        if getattr(call.op, "name", None) != "relax.clip":
            return None
        x, lo, hi = call.args
        dtype = str(x.ty.dtype)

        def bound(v):  # a PrimValue of an IntImm / FloatImm
            value = getattr(v.value, "value", v.value)
            return relax.const(float(value) if "float" in dtype else int(value), dtype)
        return relax.op.minimum(relax.op.maximum(x, bound(lo)), bound(hi))
    return rewrite_calls(mod, rewrite)


def _depthwise_hwio(mod):
    """``mod`` with every NHWC depthwise conv2d's OIHW weight as HWIO (a constant transposed here,
    once; any other weight by a ``permute_dims``): TOPI's conv then reads the 16 channels of a
    vector from consecutive bytes instead of gathering them 9 bytes apart."""
    from tvm import relax
    from tvm.ir.expr import Constant

    def rewrite(_, call):
        if (getattr(call.op, "name", None) != "relax.nn.conv2d" or not depthwise(call)
                or str(call.attrs.data_layout) != "NHWC"):
            return None
        at, w = call.attrs, call.args[1]
        if isinstance(w, Constant):
            hwio = relax.const(np.ascontiguousarray(w.value.numpy().transpose(2, 3, 1, 0)))
        else:
            hwio = relax.op.permute_dims(w, [2, 3, 1, 0])
        return relax.op.nn.conv2d(call.args[0], hwio, at.strides, at.padding, at.dilation, at.groups,
                                  "NHWC", "HWIO", "NHWC", str(at.out_dtype) or None)
    return rewrite_calls(mod, rewrite)


def nhwc_ready(kernels_with_weights):
    """``call -> bool``: a conv2d that does not keep a model out of NHWC — one a kernel takes (its
    weight is one of the kernel's recorded constants and ``takes_conv`` accepts it), a float
    image stem or a depthwise conv. ``kernels_with_weights``: ``[(Kernel, [weight constants of its layers])]``."""
    takers = [(k.takes_conv, consts) for k, consts in kernels_with_weights if k.takes_conv]

    def ready(call) -> bool:
        return float_stem(call) or depthwise(call) or any(
            takes(call) and any(c is not None and c.same_as(call.args[1]) for c in consts)
            for takes, consts in takers)
    return ready


def choose_layout(mod, kernels_with_weights):
    """``mod`` in NHWC (``_nhwc``) when every conv2d is ``nhwc_ready``; else unchanged (NCHW, each
    kernel call transposing around itself).

    Why only then, measured: TVM's own NHWC fp32 conv (the generic schedule) was 3-5x slower
    than NCHW; with every conv on a hand kernel, NHWC throughout wins (ResNet-18 mixed with the
    fp8 layers on the bf16 kernel: 21.7 ms vs 28.0 ms with per-call transposes, 2 threads, load
    4.3, medians of 5 interleaved rounds, identical outputs)."""
    ready = nhwc_ready(kernels_with_weights)
    convs = calls(mod["main"], "relax.nn.conv2d")
    return to_nhwc(mod) if convs and all(ready(c) for c in convs) else mod


def ceil_to(v: int, m: int) -> int:
    return (v + m - 1) // m * m

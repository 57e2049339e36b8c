"""Builders of small, real ONNX test models (shared by every engineer's tests).

Each ``make_*`` function writes one model into ``folder`` and returns its ``Path``. Models are
small (import + onnxruntime run well under a second) and deterministic (seeded weights).

- ``make_resnet_legacy(folder, opset=17)``: ResNet-ish CNN (conv/BN/relu/residual/maxpool/
  avgpool/flatten/linear) via ``torch.onnx.export(dynamo=False)`` in train mode (BN kept).
- ``make_resnet_dynamo(folder, opset=18)``: the same with ``dynamo=True``.
- ``make_tf_style(folder)``: tf2onnx/Paddle style: Constant-node weights in HWIO + Transpose,
  Shape→Gather→Concat→Reshape, dynamic "same" Pad computed from the input shape.
- ``make_qdq(folder, fmt)``: a QDQ graph (Q→DQ activations, DQ of integer weights) for
  'int8' | 'uint8' | 'int4' | 'uint4' | 'fp8_e4m3' | 'fp8_e5m2'.
- ``make_conv1d(folder)``, ``make_conv_transpose(folder)``, ``make_transformer(folder)``.
- ``make_ort_qdq(folder, activation, weight, per_channel)``: the dynamo ResNetish quantized by
  ``onnxruntime.quantization.quantize_static`` (QDQ format; int4 uses com.microsoft Q/DQ).
- ``make_pool_zoo(folder)``: pooling / pad / reduce edge cases built by hand.
- ``make_op_zoo(folder, opset=11)``: older-opset attribute forms and misc ops (see its doc).
- ``make_unsupported(folder)``: uses a custom-domain op and two unknown ops.
- ``make_tf_conv1d(folder, opset, conv)``: tf2onnx-style int32-id Conv1D text classifier.
- ``make_paddle_pinned(folder)``, ``make_batch_merge(folder)``, ``make_vit(folder)``: batch
  polymorphism cases (literal batch-1 targets; a batch merged into features; a torch ViT).
- ``write_tiny(path, ...)``: a tiny conv classifier written as given (no checker), with
  options to break it (NaN / empty weights, a zero dim, a custom-domain op, external data).
- ``standard_models(folder)``: ``{key: (path, input_shapes or None)}`` for the models above.
"""
from __future__ import annotations

import io
import contextlib
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

__all__ = ["ResNetish", "make_resnet_legacy", "make_resnet_dynamo", "make_tf_style", "make_qdq",
           "make_conv1d", "make_conv_transpose", "make_transformer", "make_unsupported",
           "make_pool_zoo", "make_op_zoo", "make_ort_qdq", "standard_models", "save",
           "make_tf_conv1d", "make_paddle_pinned", "make_batch_merge", "make_vit", "TinyViT",
           "seeded_resnet", "write_tiny"]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """A small ResNet: stem conv+BN+relu+maxpool, two residual blocks, depthwise conv, GAP, fc."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, groups=2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = torch.nn.functional.hardswish(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def seeded_resnet() -> ResNetish:
    """A ResNetish under seed 0 with non-trivial BatchNorm statistics (train mode)."""
    torch.manual_seed(0)
    model = ResNetish()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def make_resnet_legacy(folder: Path, opset: int = 17, shape=(1, 3, 16, 16)) -> Path:
    """ResNetish via the legacy TorchScript exporter, BatchNorm kept (TRAINING mode export)."""
    path = Path(folder) / f"resnet_legacy_op{opset}.onnx"
    model = seeded_resnet().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path


def make_resnet_dynamo(folder: Path, opset: int = 18, shape=(1, 3, 16, 16)) -> Path:
    """ResNetish via the dynamo exporter (opset 18+)."""
    path = Path(folder) / f"resnet_dynamo_op{opset}.onnx"
    model = seeded_resnet().eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=True,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          external_data=False, verbose=False)
    return path


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(arr, name))


def _ints(name: str, values) -> onnx.NodeProto:
    return _const(name, np.asarray(values, dtype=np.int64))


def make_tf_style(folder: Path) -> Path:
    """tf2onnx-style CNN with Constant weights, shape arithmetic and SAME pads. Its input
    ``input`` is NHWC with dynamic N, H, W: pin it to 1x15x15x3 or 1x16x16x3 (an 8x8 map)."""
    rng = np.random.default_rng(0)
    w_hwio = rng.standard_normal((3, 3, 3, 8)).astype(np.float32) * 0.3
    fc = rng.standard_normal((8 * 8 * 8, 5)).astype(np.float32) * 0.05
    nodes = [
        _const("w_hwio", w_hwio), _ints("perm_dummy", [0]),
        helper.make_node("Transpose", ["input"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Transpose", ["w_hwio"], ["w_oihw"], name="w_to_oihw", perm=[3, 2, 0, 1]),
        # dynamic "same" padding for a stride-2 3x3 conv: total = max((ceil(H/2)-1)*2+3-H, 0)
        helper.make_node("Shape", ["x_nchw"], ["shp"], name="shape"),
        _ints("hw_idx", [2, 3]),
        helper.make_node("Gather", ["shp", "hw_idx"], ["hw"], name="gather_hw", axis=0),
        _ints("one", [1]), _ints("two", [2]), _ints("three", [3]), _ints("zero", [0]),
        helper.make_node("Sub", ["hw", "one"], ["hw_m1"], name="hw_m1"),
        helper.make_node("Div", ["hw_m1", "two"], ["half"], name="ceil_div"),
        helper.make_node("Mul", ["half", "two"], ["span"], name="span"),
        helper.make_node("Add", ["span", "three"], ["need"], name="need"),
        helper.make_node("Sub", ["need", "hw"], ["total_raw"], name="total_raw"),
        helper.make_node("Max", ["total_raw", "zero"], ["total"], name="total"),
        helper.make_node("Div", ["total", "two"], ["pad_begin"], name="pad_begin"),
        helper.make_node("Sub", ["total", "pad_begin"], ["pad_end"], name="pad_end"),
        _ints("zeros2", [0, 0]),
        helper.make_node("Concat", ["zeros2", "pad_begin", "zeros2", "pad_end"], ["pads"],
                         name="pads", axis=0),
        helper.make_node("Pad", ["x_nchw", "pads"], ["x_pad"], name="same_pad", mode="constant"),
        helper.make_node("Conv", ["x_pad", "w_oihw"], ["c1"], name="conv1", strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Transpose", ["r1"], ["r1_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        # flatten with shape arithmetic: Shape → Slice(batch) → Concat(-1) → Reshape
        helper.make_node("Shape", ["r1_nhwc"], ["s2"], name="shape2"),
        helper.make_node("Slice", ["s2", "zero", "one"], ["batch"], name="slice_batch"),
        _ints("minus1", [-1]),
        helper.make_node("Concat", ["batch", "minus1"], ["flat_shape"], name="flat_shape", axis=0),
        helper.make_node("Cast", ["flat_shape"], ["flat_shape64"], name="cast_shape",
                         to=TensorProto.INT64),
        helper.make_node("Reshape", ["r1_nhwc", "flat_shape64"], ["flat"], name="reshape"),
        _const("fc_w", fc),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="dense"),
        _const("fc_b", rng.standard_normal(5).astype(np.float32)),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="dense_bias"),
    ]
    graph = helper.make_graph(
        nodes, "tf_style",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["unk__1", "h", "w", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__1", 5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return save(model, Path(folder) / "tf_style.onnx")


_QTYPES = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4,
           "uint4": TensorProto.UINT4, "fp8_e4m3": TensorProto.FLOAT8E4M3FN,
           "fp8_e5m2": TensorProto.FLOAT8E5M2}


def _zp(name: str, fmt: str, value: int = 0, shape=()) -> onnx.TensorProto:
    vals = np.full(shape, value).reshape(-1).tolist()
    return helper.make_tensor(name, _QTYPES[fmt], list(shape), vals)


def make_qdq(folder: Path, fmt: str = "int8") -> Path:
    """conv → relu → gemm in QDQ form: activations Q→DQ (per tensor; the conv output per
    channel, axis 1), weights stored quantized (per output channel for int formats) and
    dequantized by DQ."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
    fc = rng.standard_normal((6, 4 * 8 * 8)).astype(np.float32) * 0.05
    is_int = not fmt.startswith("fp8")
    qmax = {"int8": 127, "uint8": 127, "int4": 7, "uint4": 7}.get(fmt, 1.0)
    signed_w = "int8" if fmt in ("int8", "uint8") else ("int4" if fmt in ("int4", "uint4") else fmt)
    inits = []
    if is_int:
        w_scale = np.abs(w).reshape(4, -1).max(1) / qmax
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -qmax - 1, qmax)
        inits += [helper.make_tensor("w_q", _QTYPES[signed_w], w.shape,
                                     wq.astype(int).reshape(-1).tolist()),
                  numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
                  _zp("w_zp", signed_w, 0, (4,))]
        w_dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"],
                                name="w_dq", axis=0)
    else:
        inits += [helper.make_tensor("w_q", _QTYPES[fmt], w.shape, w.reshape(-1).tolist()),
                  numpy_helper.from_array(np.float32(1.0), "w_scale"), _zp("w_zp", fmt)]
        w_dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_f"],
                                name="w_dq")
    act_zp = {"uint8": 128, "uint4": 8}.get(fmt, 0)
    act_scale = {"int8": 0.03, "uint8": 0.03, "int4": 0.4, "uint4": 0.4}.get(fmt, 0.25)
    inits += [numpy_helper.from_array(np.array([0.5, 1.0, 0.75, 1.25], np.float32) * act_scale * 4,
                                      "c_scale"), _zp("c_zp", fmt, act_zp, (4,))]
    inits += [numpy_helper.from_array(np.float32(act_scale), "a_scale"), _zp("a_zp", fmt, act_zp),
              numpy_helper.from_array(np.float32(act_scale), "r_scale"),
              _zp("r_zp", fmt, {"uint8": 0, "uint4": 0}.get(fmt, 0)),
              numpy_helper.from_array(fc, "fc_w"),
              numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "fc_b")]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "a_scale", "a_zp"], ["x_q"], name="in_q"),
        helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zp"], ["x_f"], name="in_dq"),
        w_dq,
        helper.make_node("Conv", ["x_f", "w_f"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "c_scale", "c_zp"], ["c_q"], name="conv_q",
                         axis=1),
        helper.make_node("DequantizeLinear", ["c_q", "c_scale", "c_zp"], ["c_f"], name="conv_dq",
                         axis=1),
        helper.make_node("Relu", ["c_f"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "r_scale", "r_zp"], ["r_q"], name="relu_q"),
        helper.make_node("DequantizeLinear", ["r_q", "r_scale", "r_zp"], ["r_f"], name="relu_dq"),
        helper.make_node("Flatten", ["r_f"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, f"qdq_{fmt}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6])], initializer=inits)
    opset = 21
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return save(model, Path(folder) / f"qdq_{fmt}.onnx")


class _Conv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.nn.functional.gelu(self.bn(self.c1(x)))
        y = torch.nn.functional.avg_pool1d(self.c2(y), 2, ceil_mode=True)
        return self.fc(y.mean(-1))


def make_conv1d(folder: Path) -> Path:
    torch.manual_seed(1)
    path = Path(folder) / "conv1d.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Conv1d().eval(), (torch.randn(2, 4, 19),), str(path), dynamo=False,
                          opset_version=17, input_names=["signal"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path


class _Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.up_g = nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=2)

    def forward(self, x):
        y = self.up(torch.sigmoid(self.down(x)))
        z = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")
        w = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear",
                                            align_corners=False)
        return self.up_g(torch.tanh(y)), z + w


def make_conv_transpose(folder: Path) -> Path:
    torch.manual_seed(2)
    path = Path(folder) / "conv_transpose.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Up().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["up", "resized"])
    return path


class TinyTransformer(nn.Module):
    """One pre-LN transformer block: LayerNorm, MatMul attention, Softmax, exact-erf GELU MLP."""

    def __init__(self, dim: int = 16, heads: int = 2, seq: int = 6):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


def make_transformer(folder: Path, dynamo: bool = False) -> Path:
    torch.manual_seed(3)
    path = Path(folder) / f"transformer_{'dynamo' if dynamo else 'legacy'}.onnx"
    kwargs = dict(dynamo=True, opset_version=18, external_data=False) if dynamo else dict(
        dynamo=False, opset_version=17)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyTransformer().eval(), (torch.randn(2, 6, 16),), str(path),
                          input_names=["tokens"], **kwargs)
    return path


def make_pool_zoo(folder: Path) -> Path:
    """Pooling/pad/reduce/resize edge cases built by hand: ceil_mode, count_include_pad,
    asymmetric pads, SAME_UPPER auto_pad, reflect pad, ReduceMean with axes input (opset 18),
    TF-style Resize (linear asymmetric; nearest tf_half_pixel_for_nn), LRN (GoogLeNet / AlexNet;
    onnxruntime refuses even window sizes: test_onnx_import checks those on onnx.reference)."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["m1"], name="mp_ceil", kernel_shape=[3, 3],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("AveragePool", ["x"], ["a1"], name="ap_excl", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("AveragePool", ["x"], ["a2"], name="ap_incl", kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("AveragePool", ["x"], ["a3"], name="ap_same", kernel_shape=[2, 2],
                         strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("MaxPool", ["x"], ["m2"], name="mp_asym", kernel_shape=[2, 2],
                         pads=[0, 0, 1, 1]),
        helper.make_node("Pad", ["x", "pads"], ["p"], name="reflect", mode="reflect"),
        helper.make_node("ReduceMean", ["p", "axes"], ["rm"], name="rmean", keepdims=1),
        helper.make_node("ReduceMax", ["x", "axes"], ["rx"], name="rmax", keepdims=0),
        helper.make_node("GlobalMaxPool", ["x"], ["g"], name="gmp"),
        helper.make_node("Resize", ["x", "", "scales"], ["rl"], name="resize_tf_linear",
                         mode="linear", coordinate_transformation_mode="asymmetric"),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["rn"], name="resize_tf_nearest",
                         mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn",
                         nearest_mode="round_prefer_ceil"),
        helper.make_node("LRN", ["x"], ["lrn3"], name="lrn_odd", size=3, alpha=0.3, beta=0.75,
                         bias=1.5),
    ]
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"),
             numpy_helper.from_array(np.array([-1, 2], np.int64), "axes"),
             numpy_helper.from_array(np.array([1, 1, 1.5, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([1, 2, 10, 5], np.int64), "sizes")]
    outs = {"m1": [1, 2, 3, 3], "a1": [1, 2, 4, 4], "a2": [1, 2, 4, 4], "a3": [1, 2, 4, 4],
            "m2": [1, 2, 7, 7], "rm": [1, 2, 1, 1], "rx": [1, 2], "g": [1, 2, 1, 1],
            "rl": [1, 2, 10, 14], "rn": [1, 2, 10, 5], "lrn3": [1, 2, 7, 7]}
    graph = helper.make_graph(
        nodes, "pool_zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 7, 7])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outs.items()],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return save(model, Path(folder) / "pool_zoo.onnx")


def make_unsupported(folder: Path) -> Path:
    """Relu → com.example.Swish → NonZero ×2 → Hardmax: the one-line error lists them all."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok_relu"),
        helper.make_node("Swish", ["a"], ["b"], name="my_swish", domain="com.example"),
        helper.make_node("NonZero", ["b"], ["c"], name="nz1"),
        helper.make_node("NonZero", ["b"], ["d"], name="nz2"),
        helper.make_node("Hardmax", ["b"], ["e"], name="hm"),
    ]
    graph = helper.make_graph(
        nodes, "unsupported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("e",)]
        + [helper.make_tensor_value_info("c", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    path = Path(folder) / "unsupported.onnx"
    onnx.save(model, str(path))
    return path


def make_ort_qdq(folder: Path, activation: str = "uint8", weight: str = "int8",
                 per_channel: bool = True) -> Path:
    """ResNetish (dynamo export) quantized by onnxruntime's ``quantize_static`` in QDQ format,
    calibrated on 4 seeded random inputs. ``activation``/``weight``: 'uint8' | 'int8' | 'int4'."""
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8, "int4": QuantType.QInt4,
             "uint4": QuantType.QUInt4}
    src = make_resnet_dynamo(folder)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": np.random.default_rng(i).standard_normal(
                (1, 3, 16, 16)).astype(np.float32)} for i in range(4)])

        def get_next(self):
            return next(self.items, None)

    path = Path(folder) / f"ort_qdq_{activation}_{weight}{'_pc' if per_channel else ''}.onnx"
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(str(src), str(path), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=types[activation], weight_type=types[weight],
                        per_channel=per_channel)
    finally:
        logging.getLogger().setLevel(level)
    return path


def standard_models(folder: Path) -> dict:
    """Write every test model above; ``{key: (path, input_shapes or None)}``."""
    out = {
        "resnet_legacy13": (make_resnet_legacy(folder, 13), None),
        "resnet_legacy17": (make_resnet_legacy(folder, 17), None),
        "resnet_dynamo18": (make_resnet_dynamo(folder, 18), None),
        "tf_style": (make_tf_style(folder), {"input": (1, 16, 16, 3)}),
        "conv1d": (make_conv1d(folder), None),
        "conv_transpose": (make_conv_transpose(folder), None),
        "transformer_legacy": (make_transformer(folder), None),
        "transformer_dynamo": (make_transformer(folder, dynamo=True), None),
        "pool_zoo": (make_pool_zoo(folder), None),
        "op_zoo11": (make_op_zoo(folder, 11), None),
    }
    for fmt in _QTYPES:
        out[f"qdq_{fmt}"] = (make_qdq(folder, fmt), None)
    return out


def make_op_zoo(folder: Path, opset: int = 11) -> Path:
    """Older-opset attribute forms and misc ops in one graph (opset 11 or 12): Gemm with
    transA/alpha/beta, Clip with inputs, Split/Squeeze/Unsqueeze/ReduceSum with attribute axes,
    Softmax (2-D coercion), PRelu, LeakyRelu, Erf, Pow, Where/Equal/Not, Expand/Tile, Gather,
    int8 Q→DQ with a non-zero zero point, Range/ConstantOfShape folding."""
    rng = np.random.default_rng(4)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(4, 6), "gemm_b"),
             numpy_helper.from_array(f32(6), "gemm_c"),
             numpy_helper.from_array(np.array(-0.5, np.float32), "clip_lo"),
             numpy_helper.from_array(np.array(0.7, np.float32), "clip_hi"),
             numpy_helper.from_array(f32(6).reshape(1, 6) * 0.1 + 0.2, "slope"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "tile_reps"),
             numpy_helper.from_array(np.array([3, 1, 6], np.int64), "expand_shape"),
             numpy_helper.from_array(np.array([1, 0, -1], np.int64), "gather_idx"),
             numpy_helper.from_array(np.array(0.03, np.float32), "q_scale"),
             numpy_helper.from_array(np.array(3, np.int8), "q_zp"),
             numpy_helper.from_array(np.array(0, np.int64), "r_start"),
             numpy_helper.from_array(np.array(6, np.int64), "r_limit"),
             numpy_helper.from_array(np.array(1, np.int64), "r_delta"),
             numpy_helper.from_array(np.array([2, 6], np.int64), "cos_shape")]
    nodes = [
        helper.make_node("Gemm", ["x", "gemm_b", "gemm_c"], ["g"], name="gemm", transA=1,
                         alpha=0.5, beta=2.0),
        helper.make_node("Clip", ["g", "clip_lo", "clip_hi"], ["c"], name="clip"),
        helper.make_node("PRelu", ["g", "slope"], ["pr"], name="prelu"),
        helper.make_node("LeakyRelu", ["g"], ["lr"], name="leaky", alpha=0.2),
        helper.make_node("Erf", ["lr"], ["erf"], name="erf"),
        helper.make_node("Pow", ["pr", "two"], ["sq"], name="pow"),
        helper.make_node("Add", ["sq", "erf"], ["s1"], name="add1"),
        helper.make_node("Softmax", ["s1"], ["sm"], name="softmax", axis=1),
        helper.make_node("Split", ["sm"], ["sp0", "sp1"], name="split", axis=1, split=[2, 4]),
        helper.make_node("ReduceSum", ["sp1"], ["rs"], name="rsum", axes=[1], keepdims=1),
        helper.make_node("Unsqueeze", ["c"], ["u"], name="unsq", axes=[1]),
        helper.make_node("Squeeze", ["u"], ["sqz"], name="sqz", axes=[1]),
        helper.make_node("Equal", ["sqz", "c"], ["eq"], name="eq"),
        helper.make_node("Not", ["eq"], ["neq"], name="not"),
        helper.make_node("Where", ["neq", "g", "c"], ["w"], name="where"),
        helper.make_node("Gather", ["w", "gather_idx"], ["ga"], name="gather", axis=0),
        helper.make_node("Tile", ["ga", "tile_reps"], ["ti"], name="tile"),
        helper.make_node("Unsqueeze", ["rs"], ["rs3"], name="unsq2", axes=[0]),
        helper.make_node("Expand", ["rs3", "expand_shape"], ["ex"], name="expand"),
        helper.make_node("Range", ["r_start", "r_limit", "r_delta"], ["rg"], name="range"),
        helper.make_node("Cast", ["rg"], ["rgf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["cos_shape"], ["ones"], name="cos",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Mul", ["ones", "rgf"], ["ramp"], name="ramp"),
        helper.make_node("Add", ["g", "ramp"], ["gr"], name="add_ramp"),
        helper.make_node("QuantizeLinear", ["gr", "q_scale", "q_zp"], ["gq"], name="q"),
        helper.make_node("DequantizeLinear", ["gq", "q_scale", "q_zp"], ["gdq"], name="dq"),
    ]
    outs = {"sp0": [2, 2], "ti": [3, 12], "ex": [3, 2, 6], "gdq": [2, 6]}
    graph = helper.make_graph(
        nodes, "op_zoo", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outs.items()],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return save(model, Path(folder) / f"op_zoo_op{opset}.onnx")


# ---- tf2onnx / Paddle2ONNX / ViT graphs for the conformance and batch tests --------------------
def make_tf_conv1d(folder: Path, opset: int = 13, conv: str = "2d", vocab: int = 256,
                   seq: int = 16) -> Path:
    """A tf2onnx-style byte-level text classifier (Keras Embedding → Conv1D → PReLU → Dense →
    GlobalMaxPooling1D → Dense → softmax), written the way tf2onnx writes it: int32 ids with a
    dynamic ``unk__`` batch, Cast to int64 before Gather, Conv1D as Unsqueeze → NHWC→NCHW
    Transpose → 1×k ``Conv`` with ``auto_pad=SAME_UPPER`` → Transpose → Squeeze (``conv="2d"``;
    ``"1d"``: Transpose + 1-D Conv), Keras PReLU (shared over time: slope (1, C)) as PRelu,
    Dense as MatMul + BiasAdd-as-Add, Relu6 as Clip with min/max inputs, ReduceMax keepdims=0,
    a Reshape with 0/-1 and Softmax (axis=1 on 2-D; opset < 13 uses the flatten-at-axis form)."""
    rng = np.random.default_rng(7)
    f32 = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    emb, ch, hid, classes = 16, 8, 32, 5  # ch == time steps after the stride-2 conv (16 → 8)
    sq_axes = {"axes": [1]} if opset < 13 else {}
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], name="embedding/Cast", to=TensorProto.INT64),
        helper.make_node("Gather", ["embedding/table", "ids64"], ["emb"], name="embedding/Gather",
                         axis=0),
    ]
    if conv == "2d":
        unsq_in = ["emb"] if opset < 13 else ["emb", "axes1"]
        sq_in = ["conv_nhwc"] if opset < 13 else ["conv_nhwc", "axes1"]
        nodes += [
            helper.make_node("Unsqueeze", unsq_in, ["emb4"], name="conv1d/ExpandDims", **sq_axes),
            helper.make_node("Transpose", ["emb4"], ["emb_nchw"], name="conv1d/Transpose",
                             perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["emb_nchw", "conv1d/kernel", "conv1d/bias"], ["conv"],
                             name="conv1d/Conv2D", auto_pad="SAME_UPPER", kernel_shape=[1, 5],
                             strides=[1, 2], dilations=[1, 1]),
            helper.make_node("Transpose", ["conv"], ["conv_nhwc"], name="conv1d/Transpose_1",
                             perm=[0, 2, 3, 1]),
            helper.make_node("Squeeze", sq_in, ["conv_ntc"], name="conv1d/Squeeze", **sq_axes),
        ]
        kernel = f32(ch, emb, 1, 5, k=0.3)
    else:
        nodes += [
            helper.make_node("Transpose", ["emb"], ["emb_ncw"], name="conv1d/Transpose",
                             perm=[0, 2, 1]),
            helper.make_node("Conv", ["emb_ncw", "conv1d/kernel", "conv1d/bias"], ["conv"],
                             name="conv1d/Conv1D", auto_pad="SAME_UPPER", kernel_shape=[5],
                             strides=[2]),
            helper.make_node("Transpose", ["conv"], ["conv_ntc"], name="conv1d/Transpose_1",
                             perm=[0, 2, 1]),
        ]
        kernel = f32(ch, emb, 5, k=0.3)
    nodes += [
        helper.make_node("PRelu", ["conv_ntc", "p_re_lu/alpha"], ["act"], name="p_re_lu/PRelu"),
        helper.make_node("MatMul", ["act", "dense/kernel"], ["mm"], name="dense/MatMul"),
        helper.make_node("Add", ["mm", "dense/bias"], ["dense"], name="dense/BiasAdd"),
        helper.make_node("Clip", ["dense", "relu6/min", "relu6/max"], ["r6"], name="relu6/Relu6"),
        helper.make_node("ReduceMax", ["r6"], ["pool"], name="global_max_pooling1d/Max",
                         axes=[1], keepdims=0),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "logits/kernel"], ["lmm"], name="logits/MatMul"),
        helper.make_node("Add", ["lmm", "logits/bias"], ["logits"], name="logits/BiasAdd"),
        helper.make_node("Mul", ["logits", "temperature"], ["scaled"], name="temperature/mul"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="probs/Softmax", axis=1),
    ]
    inits = [numpy_helper.from_array(f32(vocab, emb), "embedding/table"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(kernel, "conv1d/kernel"),
             numpy_helper.from_array(f32(ch, k=0.1), "conv1d/bias"),
             numpy_helper.from_array(f32(1, ch, k=0.3) + 0.25, "p_re_lu/alpha"),
             numpy_helper.from_array(f32(ch, hid, k=0.3), "dense/kernel"),
             numpy_helper.from_array(f32(hid, k=0.1), "dense/bias"),
             numpy_helper.from_array(np.array(0.0, np.float32), "relu6/min"),
             numpy_helper.from_array(np.array(6.0, np.float32), "relu6/max"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
             numpy_helper.from_array(f32(hid, classes, k=0.3), "logits/kernel"),
             numpy_helper.from_array(f32(classes, k=0.1), "logits/bias"),
             numpy_helper.from_array(np.array(1.5, np.float32), "temperature")]
    if opset < 13:
        inits = [t for t in inits if t.name != "axes1"]
    graph = helper.make_graph(
        nodes, "tf2onnx_conv1d",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["unk__12", seq])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["unk__12", classes])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="tf2onnx")
    model.ir_version = 8
    return save(model, Path(folder) / f"tf_conv1d_op{opset}_{conv}.onnx")


def make_paddle_pinned(folder: Path) -> Path:
    """A Paddle2ONNX-style graph exported at a static batch of 1: Conv → Relu → GAP → Reshape to
    the literal ``[1, -1]`` → Gemm, and a token branch whose folded Shape→…→Expand baked the batch
    as a literal ``[1, 1, 8]`` class token concatenated with patches, plus a ConstantOfShape
    ``[1, 5, 1]`` mask."""
    rng = np.random.default_rng(8)
    f32 = lambda *s, k=1.0: (rng.standard_normal(s) * k).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv2d_0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu_0"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool2d_0"),
        helper.make_node("Reshape", ["g", "pinned_flat"], ["flat"], name="flatten_0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="linear_0", transB=1),
        # token branch: 4 patches of 8 features, a class token expanded to the baked batch
        helper.make_node("Reshape", ["r", "pinned_tokens"], ["tok"], name="reshape2_0"),
        helper.make_node("Transpose", ["tok"], ["tok_t"], name="transpose2_0", perm=[0, 2, 1]),
        helper.make_node("Expand", ["cls", "pinned_cls"], ["cls_b"], name="expand_v2_0"),
        helper.make_node("Concat", ["cls_b", "tok_t"], ["seq"], name="concat_0", axis=1),
        helper.make_node("ConstantOfShape", ["pinned_mask"], ["mask"], name="fill_constant_0",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Mul", ["seq", "mask"], ["seq_m"], name="elementwise_mul_0"),
        helper.make_node("ReduceMean", ["seq_m"], ["tokens"], name="reduce_mean_0", axes=[1],
                         keepdims=0),
    ]
    inits = [numpy_helper.from_array(f32(8, 3, 3, 3, k=0.3), "conv_w"),
             numpy_helper.from_array(f32(8, k=0.1), "conv_b"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "pinned_flat"),
             numpy_helper.from_array(f32(4, 8, k=0.3), "fc_w"),
             numpy_helper.from_array(f32(4, k=0.1), "fc_b"),
             numpy_helper.from_array(np.array([1, 8, -1], np.int64), "pinned_tokens"),
             numpy_helper.from_array(f32(1, 1, 8), "cls"),
             numpy_helper.from_array(np.array([1, 1, 8], np.int64), "pinned_cls"),
             numpy_helper.from_array(np.array([1, 5, 1], np.int64), "pinned_mask")]
    graph = helper.make_graph(
        nodes, "paddle_pinned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                              producer_name="PaddlePaddle")
    model.ir_version = 7
    return save(model, Path(folder) / "paddle_pinned.onnx")


def make_batch_merge(folder: Path) -> Path:
    """Input [1, 6] → Reshape to ``[6]`` (merges the batch into the features) → MatMul: a graph
    that truly runs on a batch of 1 only."""
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["v"], name="merge_batch"),
             helper.make_node("MatMul", ["v", "w"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "batch_merge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.array([6], np.int64), "shape"),
                     numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return save(model, Path(folder) / "batch_merge.onnx")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape  # Shape → Gather → Concat chains in the legacy export
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT for 8×8 digits: 2×2 patches (16 tokens) + class token, ``depth`` blocks."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def make_vit(folder: Path) -> Path:
    """TinyViT (width 32, 2 blocks) via ``torch.onnx.export(dynamo=False, opset_version=17,
    dynamic_axes={'x': {0: 'batch'}})``: class-token Expand to (batch, 1, D) + Concat, attention
    reshapes from Shape→Gather→Concat chains."""
    torch.manual_seed(10)
    path = Path(folder) / "vit.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyViT().eval(), (torch.randn(1, 1, 8, 8),), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def write_tiny(path: Path, *, w=None, dims=(1, 1, 8, 8), extra_nodes=(), domain_op=None,
          external=None, opset=17) -> Path:
    """input[dims] → Conv(4, 3x3, pad 1) → Relu → GlobalAveragePool → Flatten → Gemm(10), written
    to ``path`` WITHOUT the checker (bad-input cases: ``w`` may hold NaN or have zero size, ``dims``
    a zero, ``domain_op`` adds a com.acme custom op, ``external`` points the conv weight at an
    external file)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32) if w is None else w
    fc = rng.standard_normal((10, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    last = "r"
    if domain_op:
        nodes.append(helper.make_node(domain_op, ["r"], ["r2"], name="custom", domain="com.acme"))
        last = "r2"
    nodes += [helper.make_node("GlobalAveragePool", [last], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
              *extra_nodes]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0] if isinstance(dims[0], int) else "N", 10])],
                              inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.acme", 1)] if domain_op else [])
    model = helper.make_model(graph, opset_imports=imports)
    if external is not None:  # point the conv weight at an external file
        t = model.graph.initializer[0]
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=external)
        t.external_data.add(key="length", value=str(4 * 36))
        onnx.save(model, path)
        return path
    onnx.save(model, path)
    return path

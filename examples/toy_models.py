"""Small searchable models built by hand (tests, benches, and a stand-in for the prepare passes).

``make_searchable(model, example, formats)`` wraps every ``nn.Conv2d``/``nn.Linear`` of a float
model so that its input activation and its weight go through ``SearchableQuantizer``s, traces it
with ``torch.fx`` (quantizers as leaf ``call_module`` nodes, weights as ``get_attr``), and returns
a ``Graph`` with ``LayerInfo``s (MACs, params, shapes) and a ``SearchSpace`` (tied: one decision
per layer; untied: one per tensor) — the same interfaces ``passes.prepare`` produces, so the
search code does not care which built the graph. Also: ``TinyCNN`` (digits), ``ResNet8``
(Fashion-MNIST, BatchNorm folded by ``fuse_bn``) and ``train_float``.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as Fn
from torch import fx, nn

from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo
from fliqs_compiler.numerics.quantizers import SearchableQuantizer
from fliqs_compiler.ir.space import Decision, SearchSpace

__all__ = ["QuantWrap", "make_searchable", "TinyCNN", "ResNet8", "ViT", "fuse_bn", "train_float"]


class QuantWrap(nn.Module):
    """A conv2d / linear whose input and weight pass through searchable quantizers."""

    def __init__(self, layer: nn.Module, candidates: Sequence[str], unsigned: bool):
        super().__init__()
        self.layer = layer
        self.aq = SearchableQuantizer(candidates, "activation", unsigned=unsigned, block_axis=1)
        self.wq = SearchableQuantizer(candidates, "weight", channels=layer.weight.shape[0], axis=0,
                                      block_axis=1)

    def forward(self, x):
        w = self.wq(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            return Fn.conv2d(self.aq(x), w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return Fn.linear(self.aq(x), w, self.layer.bias)


class _LeafQuantizers(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, SearchableQuantizer) or super().is_leaf_module(m, qualname)


def _set(root: nn.Module, path: str, module: nn.Module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def make_searchable(model: nn.Module, example: torch.Tensor, formats: Sequence[str], tied: bool = True,
                    keep_float: Sequence[str] = (), name: str = "toy") -> Graph:
    """Searchable ``Graph`` of a float ``model`` (conv2d/linear layers searched over ``formats``).

    Requires: ``model`` traceable by ``torch.fx`` once its layers are wrapped; ``example`` one
    input batch (its batch size is the one MACs are counted for). Layers named in ``keep_float``
    stay float and outside the space. A layer's activation quantizer is unsigned when its input
    was non-negative on ``example`` (after a ReLU). Guarantees: each searched layer has
    quantizers ``<path>.aq`` / ``<path>.wq`` listed in ``graph.space.quantizers``.
    """
    model = copy.deepcopy(model).eval()  # the caller's model is left as it was
    shapes: dict = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, (i[0], o)))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    layers, decisions, quantizers = {}, [], {}
    for path, (inp, out) in shapes.items():
        mod = model.get_submodule(path)
        if isinstance(mod, nn.Conv2d):
            op = "conv2d"
            macs = out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            attrs = {"stride": tuple(mod.stride), "padding": tuple(mod.padding), "groups": mod.groups}
        else:
            op, macs, attrs = "linear", out.numel() * mod.in_features, {}
        params = sum(p.numel() for p in mod.parameters())
        info = LayerInfo(name=path, op=op, node="", macs=int(macs), params=int(params),
                         group=path, weight_shape=tuple(mod.weight.shape), input_shape=tuple(inp.shape),
                         output_shape=tuple(out.shape), keep_float=path in keep_float, attrs=attrs)
        layers[path] = info
        if info.keep_float:
            continue
        _set(model, path, QuantWrap(mod, formats, unsigned=bool(inp.min() >= 0)))
        quantizers[(path, "activation")] = f"{path}.aq"
        quantizers[(path, "weight")] = f"{path}.wq"
        cands = model.get_submodule(f"{path}.aq").candidates
        if tied:
            decisions.append(Decision(path, cands, [(path, "weight"), (path, "activation")]))
        else:
            decisions.append(Decision(f"{path}:weight", cands, [(path, "weight")]))
            decisions.append(Decision(f"{path}:activation", cands, [(path, "activation")]))
    gm = fx.GraphModule(model, _LeafQuantizers().trace(model), class_name=type(model).__name__)
    for node in gm.graph.nodes:  # the fx node computing each layer: the op fed by its weight quantizer
        if node.op == "call_module" and node.target.endswith(".wq"):
            layers[node.target[:-3]].node = next(iter(node.users)).name
    graph = Graph(gm, [InputSpec("input", tuple(example.shape))], name=name, source="torch")
    graph.layers = layers
    graph.space = SearchSpace(decisions, quantizers)
    return graph


class TinyCNN(nn.Module):
    """conv(3×3) → ReLU → conv(3×3, stride 2) → ReLU → linear: trains to ~95 % on digits in seconds."""

    def __init__(self, in_ch: int = 1, size: int = 8, widths: Sequence[int] = (8, 16), classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1)
        self.fc = nn.Linear(widths[1] * ((size + 1) // 2) ** 2, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class _ConvBN(nn.Module):
    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """The ResNet basic block: conv-BN-ReLU, conv-BN, plus an identity or 1×1 conv-BN shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = _ConvBN(cin, cout, 3, stride)
        self.c2 = _ConvBN(cout, cout, 3, 1)
        self.short = _ConvBN(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.c1(x))) + self.short(x))


class ResNet8(nn.Module):
    """ResNet-8 for 28×28 grey images (~78k parameters at width 16): stem + 3 basic blocks + fc."""

    def __init__(self, in_ch: int = 1, classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = _ConvBN(in_ch, w, 3, 1)
        self.b1 = BasicBlock(w, w, 1)
        self.b2 = BasicBlock(w, 2 * w, 2)
        self.b3 = BasicBlock(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(torch.relu(self.stem(x)))))
        return self.fc(torch.flatten(Fn.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand-BN-ReLU6, 3×3 depthwise-BN-ReLU6 (stride 1 or 2), 1×1
    project-BN, plus the input when the shape is kept."""

    def __init__(self, cin, cout, stride, expand: int = 6):
        super().__init__()
        mid = cin * expand
        self.expand = _ConvBN(cin, mid, 1, 1)
        self.dw = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.dw_bn = nn.BatchNorm2d(mid)
        self.project = _ConvBN(mid, cout, 1, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = Fn.relu6(self.expand(x))
        y = self.project(Fn.relu6(self.dw_bn(self.dw(y))))
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-shaped network (depthwise convs between 1×1s) for benchmarks: stem 3×3/2 to
    16 channels, inverted residual blocks to 96 channels, 1×1 to 320, pool, classifier."""

    def __init__(self, in_ch: int = 3, classes: int = 1000):
        super().__init__()
        blocks, cin = [], 16
        for cout, stride, repeat in ((16, 1, 1), (24, 2, 2), (32, 2, 3), (64, 2, 2), (96, 1, 2)):
            for i in range(repeat):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, 1 if cout == 16 else 6))
                cin = cout
        self.stem = _ConvBN(in_ch, 16, 3, 2)
        self.blocks = nn.Sequential(*blocks)
        self.head = _ConvBN(cin, 320, 1, 1)
        self.fc = nn.Linear(320, classes)

    def forward(self, x):
        x = Fn.relu6(self.head(self.blocks(Fn.relu6(self.stem(x)))))
        return self.fc(torch.flatten(Fn.adaptive_avg_pool2d(x, 1), 1))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small pre-norm vision transformer for 1×28×28 images: 4×4 patches (49 tokens) + a class
    token, learned position embedding, ``depth`` blocks of ``heads``-head attention and a GELU
    MLP (explicit MatMuls, as legacy ONNX exports write them), LayerNorm, linear head."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128,
                 classes: int = 10, patch: int = 4, image: int = 28):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every ``_ConvBN``'s BatchNorm into its conv (eval statistics), in place; returns model."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    model.eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, _ConvBN) and isinstance(m.bn, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            m.bn = nn.Identity()
    return model


def train_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int = 128,
                lr: float = 3e-3, seed: int = 0, progress: bool = False) -> nn.Module:
    """Train a float model with Adam + cosine LR on (x, y) for ``steps`` batches (seeded)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="float training", unit="step")
    model.train()
    perm, pos = torch.randperm(len(x), generator=g), 0
    for _ in it:
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        loss = Fn.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def evaluate_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    with torch.no_grad():
        model.eval()
        pred = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())

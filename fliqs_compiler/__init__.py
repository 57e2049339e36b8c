"""fliqs: a compiler toolchain for mixed-precision integer + floating-point quantization search.

Public API (see docs and README):
    fq.formats.get(name) / fq.formats.names()
    fq.fake_quant(x, fmt, scale, axis=None)
    fq.load(path_or_module, example_inputs=None, input_shapes=None) -> Graph
    fq.compile(model, *, target, data=None, formats=..., budget=..., steps=..., out=None) -> Result
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import formats  # noqa: E402
from .quant import fake_quant  # noqa: E402
from .errors import FliqsError  # noqa: E402


def __getattr__(name):  # lazy: keep `import fliqs_compiler` light (no onnx/tvm import)
    if name == "load":
        from .graph import load
        return load
    if name == "compile":
        from .api import compile
        return compile
    if name == "Graph":
        from .graph import Graph
        return Graph
    raise AttributeError(f"module 'fliqs_compiler' has no attribute {name!r}")


__all__ = ["formats", "fake_quant", "load", "compile", "FliqsError", "Graph", "__version__"]

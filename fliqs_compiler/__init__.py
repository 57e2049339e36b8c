"""fliqs: a compiler toolchain for mixed-precision integer + floating-point quantization search.

Public API (docs/design.md, README):
    fq.formats.get(name) / fq.formats.names()
    fq.fake_quant(x, fmt, scale, axis=None)
    fq.load(path_or_module, example_inputs=None, input_shapes=None) -> Graph
    fq.compile(model, *, target, data=None, formats=..., budget=..., steps=..., out=None) -> Result

Every name is loaded on first use, so ``import fliqs_compiler`` (or any one layer of it) loads
nothing else of the package.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name → (module, attribute or None for the module itself)
_PUBLIC = {
    "formats": ("fliqs_compiler.numerics.formats", None),
    "quant": ("fliqs_compiler.numerics.quant", None),
    "fake_quant": ("fliqs_compiler.numerics.quant", "fake_quant"),
    "FliqsError": ("fliqs_compiler.base.errors", "FliqsError"),
    "load": ("fliqs_compiler.frontends.load", "load"),
    "compile": ("fliqs_compiler.driver.api", "compile"),
    "Graph": ("fliqs_compiler.ir.graph", "Graph"),
}


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fliqs_compiler' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


__all__ = ["formats", "fake_quant", "load", "compile", "FliqsError", "Graph", "__version__"]

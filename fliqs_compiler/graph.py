"""Old import path ``fliqs_compiler.graph``, kept for users: ``Graph``, ``InputSpec`` and
``LayerInfo`` live in ``fliqs_compiler.ir.graph``, ``load`` in ``fliqs_compiler.frontends.load``."""
from fliqs_compiler.frontends.load import load  # noqa: F401
from fliqs_compiler.ir.graph import Graph, InputSpec, LayerInfo  # noqa: F401

__all__ = ["Graph", "InputSpec", "LayerInfo", "load"]

"""``load``: a model file or module → ``Graph`` (the frontends' one entry point)."""
from __future__ import annotations

from pathlib import Path

import torch

from fliqs_compiler.ir.graph import Graph

__all__ = ["load"]

def load(path_or_module, example_inputs=None, input_shapes=None) -> Graph:
    """Import an ONNX file (path) or a torch ``nn.Module`` into a ``Graph``.

    ``input_shapes``: ``{input name: shape}`` pinning dynamic ONNX dimensions.
    ``example_inputs``: a tuple of tensors (required for modules).
    """
    if isinstance(path_or_module, torch.nn.Module):
        from fliqs_compiler.frontends.torch_import import import_module
        return import_module(path_or_module, example_inputs)
    from fliqs_compiler.frontends.onnx_import import import_onnx
    return import_onnx(Path(path_or_module), input_shapes=input_shapes)

"""The float model inside a searchable graph: its quantizers replaced by identities, in place for
a block (``bypass_quantizers``) or in a copy (``float_copy``). Running a searchable graph
initializes the scales of its active candidates from whatever it sees first; anything that only
looks at the model (its output shapes, the float reference) runs through these instead."""
from __future__ import annotations

import contextlib
import copy

from torch import nn

from fliqs_compiler.numerics.quantizers import SearchableQuantizer

__all__ = ["bypass_quantizers", "float_copy"]


def _quantizer_paths(gm: nn.Module) -> list:
    return [name for name, m in gm.named_modules() if isinstance(m, SearchableQuantizer)]


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextlib.contextmanager
def bypass_quantizers(gm: nn.Module):
    """Run ``gm`` in float: every ``SearchableQuantizer`` is an identity inside the block."""
    saved = {p: gm.get_submodule(p) for p in _quantizer_paths(gm)}
    try:
        for p in saved:
            _set_submodule(gm, p, nn.Identity())
        yield gm
    finally:
        for p, m in saved.items():
            _set_submodule(gm, p, m)


def float_copy(gm: nn.Module) -> nn.Module:
    """A deep copy of ``gm`` with its quantizers replaced by identities (the float model)."""
    model = copy.deepcopy(gm)
    for p in _quantizer_paths(model):
        _set_submodule(model, p, nn.Identity())
    return model.eval()

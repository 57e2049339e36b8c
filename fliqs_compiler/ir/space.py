"""The search space: decisions (groups of quantizers that must agree) and their candidates.

A *decision* picks one format for all its members; a member is ``(layer name, role)`` with role
``'weight'`` or ``'activation'``. By default a layer's weight and activation are tied into one
decision (one format per layer); untied, each gets its own. A *choice* is a list of candidate
indices, one per decision. ``SearchSpace.apply(gm, choice)`` sets every member quantizer's active
format. A layer with ``attrs['input_only']`` (a LayerNorm / softmax / GELU whose input is searched
on request) has no weight: its one role is ``'activation'`` (``roles_of``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import fx

from fliqs_compiler.numerics import formats as F

__all__ = ["Decision", "SearchSpace", "ROLES", "roles_of"]

ROLES = ("weight", "activation")


def roles_of(layer) -> tuple:
    """The quantized operands of a ``LayerInfo``: weight and activation, or only the activation
    of an input-only layer (it has no weight)."""
    return ("activation",) if layer.attrs.get("input_only") else ROLES


@dataclass
class Decision:
    name: str
    candidates: tuple
    members: list = field(default_factory=list)  # [(layer name, role)]


def _nearest(decision: Decision, fmt: str) -> int:
    bits = [F.get(c).cost_bits for c in decision.candidates]
    wide = [k for k, b in enumerate(bits) if b >= F.get(fmt).cost_bits]
    return min(wide, key=bits.__getitem__) if wide else max(range(len(bits)), key=bits.__getitem__)


@dataclass
class SearchSpace:
    decisions: list  # [Decision]
    quantizers: dict  # (layer name, role) -> submodule path in the GraphModule

    @property
    def num_decisions(self) -> int:
        return len(self.decisions)

    @property
    def max_candidates(self) -> int:
        return max((len(d.candidates) for d in self.decisions), default=0)

    def formats_of(self, choice: Sequence[int]) -> dict:
        """``{layer: {"weight": fmt, "activation": fmt}}`` for a choice (config.json shape); an
        input-only layer's weight is ``"float"`` (it has none)."""
        out: dict = {}
        for decision, index in zip(self.decisions, choice):
            fmt = decision.candidates[int(index)]
            for layer, role in decision.members:
                out.setdefault(layer, {})[role] = fmt
        for entry in out.values():
            entry.setdefault("weight", "float")
        return out

    def choice_of(self, formats: dict) -> list:
        """Inverse of ``formats_of`` (missing members default to the first candidate)."""
        choice = []
        for d in self.decisions:
            index = 0
            for layer, role in d.members:
                fmt = formats.get(layer, {}).get(role)
                if fmt is not None:
                    index = d.candidates.index(F.get(fmt).name)
                    break
            choice.append(index)
        return choice

    def uniform_choice(self, fmt: str, nearest: bool = False) -> list:
        """``fmt`` in every decision. A decision whose candidates lack it (an operand rule
        restricted them) raises, or with ``nearest`` takes its cheapest candidate at least as
        wide as ``fmt`` (else its widest)."""
        fmt = F.get(fmt).name
        missing = [d.name for d in self.decisions if fmt not in d.candidates]
        if missing and not nearest:
            raise ValueError(f"format {fmt} is not a candidate of decisions {missing[:3]}")
        return [d.candidates.index(fmt) if fmt in d.candidates else _nearest(d, fmt)
                for d in self.decisions]

    def substitutes(self, fmt: str) -> dict:
        """``{decision name: candidate}`` that ``uniform_choice(fmt, nearest=True)`` puts where
        ``fmt`` is not a candidate."""
        fmt = F.get(fmt).name
        return {d.name: d.candidates[_nearest(d, fmt)] for d in self.decisions
                if fmt not in d.candidates}

    def apply(self, gm: fx.GraphModule, choice: Sequence[int]) -> None:
        """Set the active candidate of every member quantizer."""
        for decision, index in zip(self.decisions, choice):
            fmt = decision.candidates[int(index)]
            for layer, role in decision.members:
                gm.get_submodule(self.quantizers[(layer, role)]).set_format(fmt)

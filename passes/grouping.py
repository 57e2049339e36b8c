"""Decision grouping: which quantizers must pick the same format → ``graph.space``.

Members are ``(layer name, role)``, role ``'weight' | 'activation'`` (for an activation ×
activation MatMul, ``'weight'`` is its second operand; an input-only layer — a LayerNorm,
softmax or GELU input searched on request — has only ``'activation'``, ``ir.space.roles_of``).
Members are merged (union-find) by:
- ``tie_weight_activation`` (default): a layer's weight and activation are one decision;
- ``group_patterns``: all layers whose public name matches one regex (``re.search``) share one
  decision, named by the pattern;
- ``tie_add_concat_inputs``: the activation quantizers reading an Add/Concat's inputs or output
  (seen through reshapes, pooling and ReLUs) share one decision — for backends that need one
  scale on both sides of an Add/Concat.
Layers kept in float have no members. Decision names: the pattern (``group_patterns``), else the
first layer's name, suffixed ``.weight`` / ``.activation`` when a decision holds only that role
(untied).

Operand rules (``OPERAND_RULES``, data; on unless ``operand_rules=False``): an operand produced by
an op a rule covers (seen through shape ops and pooling), or read by an input-only layer of an op
a rule covers, restricts its decision's candidates to the formats the rule admits:
- a softmax output (attention probabilities, the first operand of A·V) takes only formats of
  ≥ 8 bits per element (int8/uint8, fp8, MX-8, bf16, fp16). Why: the probabilities lie in
  [0, 1] and most are near 1/T (T keys); a uniform grid of 2^b - 1 steps over [0, 1] rounds
  everything below half a step to zero — with 4 bits that is every probability under 1/30, the
  whole tail of a 17-token attention row;
- a softmax input (attention scores) also takes only ≥ 8 bits: softmax exponentiates it, so an
  error of half a step Δ/2 multiplies a probability by up to e^(Δ/2); scores spanning ±8 on a
  4-bit grid (Δ ≈ 1.07) put probabilities up to 1.7× off, on an 8-bit grid (Δ ≈ 0.063) 3 %;
- a LayerNorm or GELU input takes ≥ 4 bits (no 2-/3-bit grid): with 3 or 7 levels LayerNorm's
  mean and deviation are computed from a handful of values (a 2-bit row normalises to a sign
  pattern), and GELU's bend around 0 falls inside one step.
Measured (a 2-block ViT trained on digits, post-training scales, only that op's inputs
quantized, relative error of the logits int2 / int3 / int4 / int8): softmax 0.63 / 0.46 / 0.28 /
0.020 (top-1 agreement with float 72 / 83 / 93 / 99.4 %), LayerNorm 0.61 / 0.35 / 0.18 / 0.015,
GELU 0.33 / 0.15 / 0.078 / 0.006.
A decision left with no admitted candidate is kept in float (``graph.meta['keep_float_reasons']``
says why).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import fx

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.ir import ops as ir
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph
from fliqs_compiler.ir.space import ROLES, Decision, SearchSpace, roles_of

from fliqs_compiler.passes.discover import input_operand, layers_discovered
from fliqs_compiler.passes.manager import contract

__all__ = ["group_decisions", "decisions_cover_searched_layers",
           "quantizers_belong_to_decisions", "OperandRule", "OPERAND_RULES"]

_SEE_THROUGH = ir.TRANSPARENT_KINDS + ("relu", "relu6")


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass(frozen=True)
class OperandRule:
    """Formats an operand may take, chosen by the op that produces it (module docstring)."""

    name: str
    producers: tuple  # ir kinds whose output the rule covers (seen through shape ops / pooling)
    admits: Callable  # Format -> bool
    why: str
    readers: tuple = ()  # ops (LayerInfo.op) of input-only layers whose input the rule covers


def _at_least(bits: int) -> Callable:
    return lambda f: f.kind == "float" or f.bits >= bits


OPERAND_RULES = (
    OperandRule("probability", ("softmax",), _at_least(8),
                "a softmax output (probabilities in [0, 1], most near 1/T) needs >= 8 bits per "
                "element"),
    OperandRule("logits", (), _at_least(8),
                "a softmax input is exponentiated (a step of error e^(step/2) in each "
                "probability) and needs >= 8 bits per element", readers=("softmax",)),
    OperandRule("normalised", (), _at_least(4),
                "a LayerNorm or GELU input needs >= 4 bits per element (a 2-/3-bit row "
                "normalises to a few levels; GELU bends inside one step)",
                readers=("layer_norm", "gelu")),
)
_ROLE_ARG = {"weight": "weight", "activation": "input"}


def _operand(graph: Graph, layer_name: str, role: str):
    """The tensor (layer, role) quantizes."""
    layer = graph.layers[layer_name]
    node = graph.fx_node(layer.node)
    return input_operand(node)[0] if layer.attrs.get("input_only") \
        else ir.get_arg(node, _ROLE_ARG[role])


def _operand_rule(graph: Graph, layer_name: str, role: str):
    """The rule covering (layer, role)'s operand, or None."""
    src = _source(_operand(graph, layer_name, role), ir.TRANSPARENT_KINDS)
    kind = ir.kind_of(src) if isinstance(src, fx.Node) else None
    layer = graph.layers[layer_name]
    reader = layer.op if layer.attrs.get("input_only") else None
    return next((r for r in OPERAND_RULES if kind in r.producers or reader in r.readers), None)


def _rules_of(graph: Graph, members) -> set:
    return {r for r in (_operand_rule(graph, *m) for m in members) if r is not None}


def _admitted(graph: Graph, members, candidates) -> tuple:
    """The candidates every operand rule covering ``members`` admits (all when none covers)."""
    rules = _rules_of(graph, members)
    return tuple(c for c in candidates if all(r.admits(F.get(c)) for r in rules))


def _source(node, through: tuple = _SEE_THROUGH):
    """The tensor a layer input really comes from, looking through ``through`` (default: shape
    ops, pools and ReLUs)."""
    while isinstance(node, fx.Node) and ir.kind_of(node) in through and node.args:
        node = node.args[0]
    return node


# ---- contract conditions --------------------------------------------------------------------
def decisions_cover_searched_layers(graph: Graph):
    """``graph.space`` exists; each (searched layer, role) is a member of exactly one decision,
    decisions hold nothing else, and each layer's ``group`` names the decision holding its
    weight ('' for layers kept in float)."""
    if graph.space is None:
        return "graph.space is None (group_decisions has not run)"
    owner = {}
    for d in graph.space.decisions:
        for member in d.members:
            if member in owner:
                return f"{member} is in decisions {owner[member]!r} and {d.name!r}"
            owner[member] = d.name
    searched = {layer.name for layer in graph.searched_layers()}
    stray = next((m for m in owner if m[0] not in searched
                  or m[1] not in roles_of(graph.layers[m[0]])), None)
    if stray is not None:
        return f"decision {owner[stray]!r} holds {stray}, not a (searched layer, role)"
    for layer in graph.layers.values():
        if layer.keep_float:
            if layer.group:
                return f"layer {layer.name} is kept in float but in group {layer.group!r}"
            continue
        roles = roles_of(layer)
        missing = next((r for r in roles if (layer.name, r) not in owner), None)
        if missing is not None:
            return f"layer {layer.name}: its {missing} is in no decision"
        if layer.group != owner[(layer.name, roles[0])]:
            return (f"layer {layer.name}: group {layer.group!r}, but its {roles[0]} is in "
                    f"decision {owner[(layer.name, roles[0])]!r}")
    return None


def quantizers_belong_to_decisions(graph: Graph):
    """Every recorded quantizer (``graph.space.quantizers``) is a member of a decision and
    names a submodule of the graph module."""
    if graph.space is None:
        return None
    members = {m for d in graph.space.decisions for m in d.members}
    for member, path in graph.space.quantizers.items():
        if member not in members:
            return f"quantizer {path!r} of {member} belongs to no decision"
        try:
            graph.gm.get_submodule(path)
        except AttributeError:
            return f"quantizer {path!r} of {member} is not a submodule"
    return None


@contract(requires=[layers_discovered],
          ensures=[decisions_cover_searched_layers, quantizers_belong_to_decisions])
def group_decisions(graph: Graph, formats: Sequence[str] = ("int4", "int8"),
                    tie_weight_activation: bool = True, group_patterns: Sequence[str] = (),
                    tie_add_concat_inputs: bool = False, operand_rules: bool = True) -> Graph:
    """Requires: ``layers_discovered`` (run ``discover_quantizable``). Ensures:
    ``decisions_cover_searched_layers``, ``quantizers_belong_to_decisions``.

    ``graph.space`` is a SearchSpace whose decisions cover every (searched layer, role) exactly
    once, candidates = ``formats`` (canonical names); ``LayerInfo.group`` = the name of the
    decision holding the layer's weight ('' for layers kept in float); ``space.quantizers`` is
    filled later by ``insert_quantizers`` (kept if already present)."""
    candidates = F.check_searchable(formats)
    try:
        regexes = [(p, re.compile(p)) for p in group_patterns]
    except re.error as e:
        raise FliqsError(f"group pattern: not a valid regular expression ({e})") from None
    searched = [layer for layer in graph.layers.values() if not layer.keep_float]
    uf = _UnionFind()
    roles = {layer.name: roles_of(layer) for layer in searched}
    for layer in searched:
        for role in roles[layer.name]:
            uf.find((layer.name, role))
        if tie_weight_activation and len(roles[layer.name]) == 2:
            uf.union((layer.name, "weight"), (layer.name, "activation"))
    heads = []
    for pattern, rx in regexes:
        hit = [layer.name for layer in searched if rx.search(layer.name)]
        for name in hit[1:]:
            for role in set(roles[hit[0]]) & set(roles[name]):
                uf.union((hit[0], role), (name, role))
        if hit:
            heads.append((pattern, hit[0]))
    if tie_add_concat_inputs:
        by_source = {}
        for layer in searched:
            x = _operand(graph, layer.name, "activation")
            by_source.setdefault(_source(x), []).append(layer.name)
        for node in graph.gm.graph.nodes:
            kind = ir.kind_of(node)
            if kind not in ("add", "cat"):
                continue
            ins = ir.get_arg(node, "tensors") if kind == "cat" else node.args[:2]
            tied = [name for t in [*ins, node] for name in by_source.get(_source(t), [])]
            for name in tied[1:]:
                uf.union((tied[0], "activation"), (name, "activation"))
    label = {}
    for pattern, head in heads:  # label after all unions: roots are final now
        root_w, root_a = uf.find((head, roles[head][0])), uf.find((head, "activation"))
        label.setdefault(root_w, pattern)
        if root_a != root_w:
            label.setdefault(root_a, pattern + ".activation")
    components: dict = {}
    for layer in searched:
        for role in roles[layer.name]:
            components.setdefault(uf.find((layer.name, role)), []).append((layer.name, role))
    allowed = {root: _admitted(graph, members, candidates) if operand_rules else candidates
               for root, members in components.items()}
    reasons = graph.meta["keep_float_reasons"] = {}
    for root, members in components.items():
        if not allowed[root]:  # no candidate fits: the decision's layers stay float
            why = "; ".join(sorted({r.why for r in _rules_of(graph, members)}))
            for layer_name in {m[0] for m in members}:
                graph.layers[layer_name].keep_float = True
                reasons[layer_name] = f"{why}, and no candidate of {', '.join(candidates)} has that"
    decisions, seen_names = [], set()
    for root, members in components.items():
        members = [m for m in members if not graph.layers[m[0]].keep_float]
        if not members:
            continue
        name = label.get(root)
        if name is None:
            roles = {m[1] for m in members}
            name = members[0][0] if len(roles) > 1 else f"{members[0][0]}.{members[0][1]}"
        while name in seen_names:
            name += "_"
        seen_names.add(name)
        decisions.append(Decision(name=name, candidates=allowed[root], members=members))
    owner = {m: d.name for d in decisions for m in d.members}
    for layer in graph.layers.values():
        layer.group = "" if layer.keep_float else owner[(layer.name, roles_of(layer)[0])]
    old = graph.space.quantizers if graph.space is not None else {}
    graph.space = SearchSpace(decisions, dict(old))
    graph.meta["formats"] = list(candidates)
    return graph

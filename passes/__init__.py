"""Graph passes (``fliqs_compiler.passes``): fx.GraphModule → fx.GraphModule, wrapped in ``Graph``.

Public API:
- ``PrepareOptions``: what to search and how (formats, tying, keep-float rules, BN form, scales);
- ``analyze(graph, options)``: shapes, BN fold, fusion, discovery, grouping, costs — no
  quantizers (what ``fliqs inspect`` shows);
- ``prepare(graph, options)``: ``analyze`` + searchable quantizers → the searchable graph;
- ``materialize(graph, formats)``: a new Graph with fixed formats (FormatQuantizers).

The pipeline is the list in :func:`pipeline`. Each pass declares its contract as code
(``manager.contract``): ``requires`` / ``ensures`` conditions, named predicates on the Graph
that :func:`run_passes` checks before / after the pass, raising ``PassContractError`` (pass,
condition, offending node) when one fails. In pipeline order (pass: requires → ensures):

- functionalize_modules: submodules_resolve → no_functionalizable_module;
- propagate_shapes: inputs_have_static_shapes → tensor_nodes_have_shape;
- fold_batchnorm / fold_batchnorm_qat: no_functionalizable_module → no_foldable_batch_norm;
- annotate_fusion: no_foldable_batch_norm → nonneg_annotated, fusion_on_layers;
- discover_quantizable: tensor_nodes_have_shape → layers_discovered;
- group_decisions: layers_discovered → decisions_cover_searched_layers,
  quantizers_belong_to_decisions;
- annotate_costs: decisions_cover_searched_layers → costs_for_every_layer;
- insert_quantizers: layers_discovered, decisions_cover_searched_layers, nonneg_annotated →
  searched_layers_quantized, quantizers_belong_to_decisions;
- materialize: searched_layers_quantized → no_searchable_quantizer, quantizers_fixed,
  no_qat_bn_modules (finalize_qat_bn alone: → no_qat_bn_modules).

Each condition is defined next to the pass that ensures it (its docstring states it).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fliqs_compiler.numerics import formats as F
from fliqs_compiler.base.errors import FliqsError
from fliqs_compiler.ir.graph import Graph

from fliqs_compiler.passes.bn_fold import finalize_qat_bn, fold_batchnorm, fold_batchnorm_qat
from fliqs_compiler.passes.cost_annotate import annotate_costs
from fliqs_compiler.passes.discover import INPUT_OPS, discover_quantizable
from fliqs_compiler.passes.functionalize import functionalize_modules
from fliqs_compiler.passes.fusion import annotate_fusion
from fliqs_compiler.passes.grouping import group_decisions
from fliqs_compiler.passes.insert_quant import insert_quantizers
from fliqs_compiler.passes.manager import (PassContractError, bind, check_graph, contract,
                                           enable_train_eval, numeric, run_passes, set_training)
from fliqs_compiler.passes.materialize import materialize
from fliqs_compiler.passes.shape_prop import propagate_shapes

__all__ = ["PrepareOptions", "analyze", "prepare", "materialize", "pipeline", "run_passes",
           "propagate_shapes", "fold_batchnorm", "fold_batchnorm_qat", "finalize_qat_bn",
           "functionalize_modules", "annotate_fusion", "discover_quantizable", "group_decisions",
           "annotate_costs", "insert_quantizers", "numeric", "check_graph", "set_training",
           "enable_train_eval", "contract", "PassContractError", "DEFAULT_FORMATS",
           "parse_quantize_inputs", "INPUT_OPS"]

DEFAULT_FORMATS = ("int4", "int8", "fp8_e4m3", "fp4_e2m1", "bf16")
_BN_PASSES = {"fold": fold_batchnorm, "qat": fold_batchnorm_qat}


@dataclass
class PrepareOptions:
    """How to build the searchable graph.

    formats: candidate formats of every decision. tie_weight_activation: one decision per layer
    (else weight and activation separately). keep_float_first / _last / _patterns: layers left
    in float (outside search and budget). group_patterns: regexes; layers matching one share a
    decision. quantize_act_matmul (default): also search activation × activation MatMuls (the
    attention MatMuls Q·Kᵀ and A·V); False keeps them float. operand_rules (default): restrict
    the candidates of operands whose producer or reader a rule covers
    (``grouping.OPERAND_RULES``: softmax inputs and outputs take only formats of ≥ 8 bits,
    LayerNorm / GELU inputs ≥ 4 bits); False: every candidate everywhere (an explicit config).
    quantize_inputs: ops whose input activation is searched too (``discover.INPUT_OPS`` keys:
    ``layernorm``, ``softmax``, ``gelu``; default none: those ops read float inputs).
    tie_add_concat_inputs: one activation decision across an Add/Concat. bn: "fold" (eval fold,
    default, BN frozen) or "qat" (Jacob et al. 2018 fold with batch statistics in training).
    scale_mode: "learned" (LSQ) or "calibrated". check_numerics: compare outputs after each
    numerics-preserving pass (slower; tests and --debug).
    """

    formats: Sequence[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    tie_weight_activation: bool = True
    keep_float_first: bool = True
    keep_float_last: bool = True
    keep_float_patterns: Sequence[str] = ()
    group_patterns: Sequence[str] = ()
    quantize_act_matmul: bool = True
    quantize_inputs: Sequence[str] = ()
    operand_rules: bool = True
    tie_add_concat_inputs: bool = False
    bn: str = "fold"
    scale_mode: str = "learned"
    check_numerics: bool = False

    def validate(self) -> "PrepareOptions":
        """Normalise format names; bad options → FliqsError naming the option."""
        if self.bn not in _BN_PASSES:
            raise FliqsError(f"bn option {self.bn!r}: use one of {', '.join(_BN_PASSES)}")
        if self.scale_mode not in ("learned", "calibrated"):
            raise FliqsError(f"scale mode {self.scale_mode!r}: use 'learned' or 'calibrated'")
        if isinstance(self.formats, str):
            self.formats = [f for f in self.formats.split(",") if f.strip()]
        self.formats = list(F.check_searchable(self.formats))
        for name in ("keep_float_patterns", "group_patterns"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.quantize_inputs = parse_quantize_inputs(self.quantize_inputs)
        return self


def parse_quantize_inputs(value, option: str = "quantize_inputs") -> tuple:
    """``"layernorm,softmax"`` (or a list) → the ``discover.INPUT_OPS`` keys, order kept, no
    repeats; ``"none"`` / empty → (). An unknown name → FliqsError naming ``option``."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    items = [str(i).strip().lower() for i in items if str(i).strip()]
    if items == ["none"]:
        return ()
    unknown = [i for i in items if i not in INPUT_OPS]
    if unknown:
        raise FliqsError(f"{option} {unknown[0]!r}: unknown op; use a comma-separated list of "
                         f"{', '.join(INPUT_OPS)} (or none)")
    return tuple(dict.fromkeys(items))


def pipeline(options: PrepareOptions, quantize: bool = True) -> list:
    """The compilation passes in order (``quantize=False``: the ``analyze`` subset)."""
    o = options
    passes = [
        functionalize_modules,
        propagate_shapes,
        _BN_PASSES[o.bn],
        bind(propagate_shapes, "propagate_shapes_after_bn"),
        annotate_fusion,
        bind(discover_quantizable, keep_float_first=o.keep_float_first,
             keep_float_last=o.keep_float_last, keep_float_patterns=o.keep_float_patterns,
             quantize_act_matmul=o.quantize_act_matmul, quantize_inputs=o.quantize_inputs),
        bind(group_decisions, formats=o.formats, tie_weight_activation=o.tie_weight_activation,
             group_patterns=o.group_patterns, tie_add_concat_inputs=o.tie_add_concat_inputs,
             operand_rules=o.operand_rules),
        annotate_costs,
    ]
    if quantize:
        passes.append(bind(insert_quantizers, scale_mode=o.scale_mode))
    return passes


def _run(graph: Graph, options: Optional[PrepareOptions], quantize: bool) -> Graph:
    options = (options or PrepareOptions()).validate()
    if graph.space is not None and graph.space.quantizers:
        raise FliqsError(f"model {graph.name!r} already has quantizers; prepare the imported "
                         "graph, not a prepared one")
    graph = copy.deepcopy(graph)
    enable_train_eval(graph.gm)
    graph = run_passes(graph, pipeline(options, quantize), check_numerics=options.check_numerics)
    graph.meta["options"] = options
    return graph


def analyze(graph: Graph, options: Optional[PrepareOptions] = None) -> Graph:
    """Shape propagation, BN folding, fusion, discovery, grouping and costs, without quantizers.
    Returns a new Graph (the input is untouched) with ``layers`` and ``space`` (decisions;
    ``space.quantizers`` empty)."""
    return _run(graph, options, quantize=False)


def prepare(graph: Graph, options: Optional[PrepareOptions] = None) -> Graph:
    """The full pipeline (:func:`pipeline`): returns a new, searchable Graph whose
    ``space.apply(gm, choice)`` switches formats; it runs forward and backward and supports
    ``.train()`` / ``.eval()`` (even when it came from ``ExportedProgram.module()``)."""
    return _run(graph, options, quantize=True)

"""The FLIQS one-shot search and its baselines.

``run_search(graph, data, budget, options)`` → ``SearchResult`` (``oneshot.py``); the policy is
``controller.py``, weight training/evaluation ``trainer.py``, crash-safe checkpoints and the step
log ``checkpoint.py``, the comparison methods ``baselines.py``, hand-built searchable models for
tests and benches ``toy.py``.
"""
from fliqs_compiler.search.controller import Controller, ControllerOptions, entropy_weight, tunas_reward  # noqa: F401
from fliqs_compiler.search.oneshot import OneShotSearch, SearchOptions, SearchResult, config_id, run_search  # noqa: F401
from fliqs_compiler.search.trainer import QUALITY, TrainOptions, WeightTrainer, bypass_quantizers, float_copy  # noqa: F401

__all__ = ["run_search", "OneShotSearch", "SearchOptions", "SearchResult", "Controller", "ControllerOptions",
           "TrainOptions", "WeightTrainer", "QUALITY", "entropy_weight", "tunas_reward",
           "float_copy", "bypass_quantizers", "config_id"]

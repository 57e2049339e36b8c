"""Cost: BOPs / size / latency of a format assignment (``model``) and budgets (``budget``).
Imports ``base``, ``numerics``, ``ir``."""
from fliqs_compiler.cost.model import *  # noqa: F401,F403 — `fq.cost.config_cost` keeps working

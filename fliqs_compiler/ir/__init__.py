"""The graph IR: ``Graph`` (an ``fx.GraphModule`` plus what frontends and passes learned),
``InputSpec``/``LayerInfo`` (``graph``), op-kind tables (``ops``), the search space of decisions
(``space``) and the config.json format assignment (``config``). Imports ``base`` and ``numerics``."""

"""The driver: option checks (``options``), the output folder (``outdir``), the pipelines as
lists of stages and their runner, and the public verbs (``api``: compile, search, lower,
profile). The only layer that imports every other one."""

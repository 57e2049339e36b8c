"""Search data: digits, Fashion-MNIST, ``.npz`` and image folders → a ``Dataset`` split into
train / held-out (``sources``). Imports ``base`` and ``ir``."""
from fliqs_compiler.data.sources import *  # noqa: F401,F403 — `fliqs_compiler.data.load_data` keeps working

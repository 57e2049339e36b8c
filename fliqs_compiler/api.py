"""Old import path ``fliqs_compiler.api``, kept for users: the module is
``fliqs_compiler.driver.api`` (this name is an alias of it, not a copy)."""
import sys

from fliqs_compiler.driver import api as _module

sys.modules[__name__] = _module

"""Old import path ``fliqs_compiler.errors``, kept for users: the module is
``fliqs_compiler.base.errors`` (this name is an alias of it, not a copy)."""
import sys

from fliqs_compiler.base import errors as _module

sys.modules[__name__] = _module

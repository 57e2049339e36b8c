"""Old import path ``fliqs_compiler.formats``, kept for users: the module is
``fliqs_compiler.numerics.formats`` (this name is an alias of it, not a copy)."""
import sys

from fliqs_compiler.numerics import formats as _module

sys.modules[__name__] = _module

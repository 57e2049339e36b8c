"""Old import path ``fliqs_compiler.quant``, kept for users: the module is
``fliqs_compiler.numerics.quant`` (this name is an alias of it, not a copy)."""
import sys

from fliqs_compiler.numerics import quant as _module

sys.modules[__name__] = _module

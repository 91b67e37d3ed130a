"""`adadecode_fx.training` is `adadecode_fx.heads.training`: this name stays for code that imports it."""
import sys

from .heads import training as _module

sys.modules[__name__] = _module

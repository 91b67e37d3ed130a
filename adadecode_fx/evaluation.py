"""`adadecode_fx.evaluation` is `adadecode_fx.heads.evaluation`: this name stays for code that imports it."""
import sys

from .heads import evaluation as _module

sys.modules[__name__] = _module

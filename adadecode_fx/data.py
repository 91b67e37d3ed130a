"""`adadecode_fx.data` is `adadecode_fx.zoo.data`: this name stays for code that imports it."""
import sys

from .zoo import data as _module

sys.modules[__name__] = _module

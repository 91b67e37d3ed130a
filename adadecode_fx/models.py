"""`adadecode_fx.models` is `adadecode_fx.zoo.models`: this name stays for code that imports it."""
import sys

from .zoo import models as _module

sys.modules[__name__] = _module

"""Graph rewrites: one module per method or transformation.

Every module here is imported, so a method's file registers itself (`@register_method`); `METHODS` is the
registry of PEFT methods peftc implements, keyed by PEFT's `peft_type` (peftc.method.METHODS).
"""

import importlib
import pkgutil

from peftc.method import METHODS

from .adapt import InsertAdapters

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _peft_type in sorted(METHODS):  # by name, whatever order the modules import each other in
    METHODS[_peft_type] = METHODS.pop(_peft_type)

__all__ = ["METHODS", "InsertAdapters"]

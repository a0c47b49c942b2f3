"""Graph rewrites: one module per method or transformation.

`METHODS` is the registry of PEFT methods peftc implements, keyed by PEFT's `peft_type`.
"""

from peftc.method import Method

from .adapt import insert_adapters
from .lora import Lora

METHODS: dict[str, Method] = {m.peft_type: m for m in (Lora(),)}

__all__ = ["METHODS", "insert_adapters"]

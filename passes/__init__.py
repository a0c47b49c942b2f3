"""Graph rewrites: one module per method or transformation.

`METHODS` is the registry of PEFT methods peftc implements, keyed by PEFT's `peft_type`.
"""

from peftc.method import Method

from .adapt import InsertAdapters
from .boft import BOFT
from .hra import HRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import Lora
from .oft import OFT
from .vera import Vera

METHODS: dict[str, Method] = {m.peft_type: m for m in (Lora(), IA3(), LoHa(), LoKr(), OFT(), Vera(), BOFT(), HRA())}

__all__ = ["METHODS", "InsertAdapters"]

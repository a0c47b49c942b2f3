"""peftc: parameter-efficient fine-tuning as a graph-rewriting compiler.

    import peftc
    am = peftc.apply(model, {"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                             "target_modules": ["q_proj", "v_proj"]})
    am.save_adapter("out/")            # PEFT's format
    am2 = peftc.load(model, "out/")    # also loads adapters saved by PEFT
"""

from .api import apply, load
from .arrow import create_arrow_model
from .backends.onnx import export_onnx, save_onnx_adapter
from .backends.onnx_decoder import export_genai, export_onnx_decoder
from .config import AdapterConfig, LoraConfig, load_config
from .errors import CaptureError, CheckpointError, ConfigError, PeftcError, TargetError
from .model import AdaptedModel
from .optim import create_loraplus_optimizer
from .passes.lora_corda import preprocess_corda
from .passes.lora_eva import get_eva_state_dict, initialize_lora_eva_weights
from .passes.lora_ga import preprocess_loraga
from .passes.lora_monteclora import MontecloraTrainerMixin

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "LoraConfig",
    "MontecloraTrainerMixin",
    "PeftcError",
    "TargetError",
    "apply",
    "create_arrow_model",
    "create_loraplus_optimizer",
    "export_genai",
    "export_onnx",
    "export_onnx_decoder",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "load",
    "load_config",
    "preprocess_corda",
    "preprocess_loraga",
    "save_onnx_adapter",
]
__version__ = "0.1.0"

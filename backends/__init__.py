"""Lowerings of an adapted graph: eager PyTorch now; torch.compile and ONNX Runtime build on it."""

from .eager import EagerProgram

__all__ = ["EagerProgram"]

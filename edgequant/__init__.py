"""edgequant: quantize a language model to fit an edge device, export GGUF/ONNX, measure it."""

__version__ = "0.1.0"

"""Qwen2 (q/k/v with biases) and Qwen3 (an RMSNorm per q/k head): Llama's layout, and llama.cpp
keeps Hugging Face's rotary order for both."""

import gguf

from .base import Adapter


class Qwen2(Adapter):
    model_types = ("qwen2",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2

    def config_from_gguf(self, settings: dict, meta: dict, tensors: dict) -> dict:
        return {k: v for k, v in settings.items() if k != "head_dim"}  # Qwen2's config has none


class Qwen3(Adapter):
    model_types = ("qwen3",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3

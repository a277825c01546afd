"""Llama and Mistral: the base layout. llama.cpp's ``llama`` architecture interleaves the halves
of each q/k head for its rotary kernel, and its ``deci`` architecture (Llama with per-block sizes)
holds pruned models."""

import gguf

from .base import Adapter


class Llama(Adapter):
    model_types = ("llama", "mistral")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    reads_gguf = ("deci",)
    permute_qk = True
    per_block_sizes_arch = "deci"

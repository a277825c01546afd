"""Phi-3 and Phi-3.5 (mini): Llama's block, with q/k/v stored as one matrix and gate/up as another.

- Inside edgequant the fused matrices are split into q, k, v and gate, up (:meth:`Adapter.split_fused`),
  so calibration, the plans and the methods see a Llama block. The checkpoint's ``qkv_proj`` and
  ``gate_up_proj`` (or a phi3 GGUF's ``attn_qkv`` and ``ffn_up``) are read as rows of the whole.
- llama.cpp's phi3 graph takes gate and up as one ``ffn_up`` of twice the FFN's rows (gate first)
  and q/k/v as one ``attn_qkv``; the file is written so (:func:`exporters.gguf.write_gguf`), which is
  why the planners give the parts of a fused matrix one type (:meth:`LoadedModel.ties`).
- Rotary: Hugging Face's half-split order (no permutation), possibly on a part of each head
  (``partial_rotary_factor``), with su/longrope scaling: two tables of per-frequency factors, the
  long one used when the context exceeds ``original_max_position_embeddings`` (llama.cpp decides
  once per context, transformers per forward pass: they agree when the evaluation window is the
  context), and an attention factor.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ..errors import EdgequantError
from .base import Adapter, head_dim

QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"


class Phi3(Adapter):
    model_types = ("phi3",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    names_arch = gguf.MODEL_ARCH.LLAMA  # the parts' names: attn_q/k/v, ffn_gate/up
    fused = {QKV: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             GATE_UP: ("mlp.gate_proj", "mlp.up_proj")}
    onnx_refusal = "phi3 has no ONNX export yet (longrope scaling, fused matrices); use --formats gguf"

    def part_rows(self, config, whole: str) -> tuple[int, ...]:
        if whole == GATE_UP:
            return config.intermediate_size, config.intermediate_size
        dim = head_dim(config)
        return config.num_attention_heads * dim, config.num_key_value_heads * dim, config.num_key_value_heads * dim

    def rope_dimensions(self, config) -> int:
        return int(head_dim(config) * self.rope_parameters(config).get("partial_rotary_factor", 1.0))

    def gguf_metadata(self, w: gguf.GGUFWriter, config) -> None:
        rope = self.rope_parameters(config)
        original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        w.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
        w.add_sliding_window(config.sliding_window or 0)  # llama.cpp's phi3 ignores it; 0 marks "none"
        if rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(_attention_factor(rope, config, original))

    def gguf_tensors(self, config) -> list[tuple[str, np.ndarray]]:
        rope = self.rope_parameters(config)
        if not rope.get("long_factor"):
            return []
        if rope.get("rope_type") not in ("longrope", "su"):
            raise EdgequantError(f"phi3 with {rope.get('rope_type')} rope scaling has no GGUF form here")
        names = gguf.TENSOR_NAMES
        return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(rope["long_factor"], np.float32)),
                (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(rope["short_factor"], np.float32))]

    def config_from_gguf(self, settings: dict, meta: dict, tensors: dict) -> dict:
        """Phi-3's settings from llama.cpp's keys: rotary dimensions, the original context and the
        longrope factor tables (tensors of the file)."""
        key = f"{self.gguf_name}."
        dim = settings.get("head_dim") or settings["hidden_size"] // settings["num_attention_heads"]
        rotated = meta.get(key + "rope.dimension_count", dim)
        original = meta.get(key + "rope.scaling.original_context_length")
        rope = {"rope_type": "default", "rope_theta": settings.pop("rope_theta"), "partial_rotary_factor": rotated / dim}
        long, short = (tensors.get(gguf.TENSOR_NAMES[t] + ".weight")
                       for t in (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT))
        if long is not None and short is not None:
            rope |= {"rope_type": "longrope", "long_factor": np.asarray(long.data, float).tolist(),
                     "short_factor": np.asarray(short.data, float).tolist(), "original_max_position_embeddings": original}
        settings = {**settings, "rope_parameters": rope, "sliding_window": meta.get(key + "attention.sliding_window") or None}
        if original:
            settings["original_max_position_embeddings"] = original
        return settings


def _attention_factor(rope: dict, config, original) -> float:
    """longrope's scale of the attention logits, as transformers and llama.cpp's converter compute it."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = config.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0

"""Gemma 3 (text): Llama's matrices, with what makes Gemma differ.

- Every RMSNorm multiplies by ``1 + w``. llama.cpp stores ``1 + w`` (the converter's shift), so
  norms gain 1 on the way to the file and lose it on the way back; a scale folded into a norm
  becomes ``(1 + w) / s - 1``.
- Norms after attention and after the MLP, before each residual add: a rotation of the residual
  stream would not pass through them, so the rotating methods are refused.
- The embedding is multiplied by sqrt(hidden) (a buffer transformers computes, llama.cpp in its
  graph); the MLP is GELU (tanh) of gate times up.
- Sliding-window layers (local, their own rope base) between global ones, listed in
  ``config.layer_types``; llama.cpp reads the window, the pattern and both rope bases.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from ..errors import EdgequantError
from .base import Adapter, head_dim

SLIDING, FULL = "sliding_attention", "full_attention"
LLAMA_CPP_PERIOD = 6  # llama.cpp's default pattern: every 6th layer global


class Gemma3(Adapter):
    model_types = ("gemma3_text",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    rotations = False
    onnx_refusal = "gemma3 has no ONNX export yet (sliding-window layers and post-norms); use --formats gguf"
    activation_sensitive = True  # gemma3-270m: KLD 0.004 from llama.cpp's activation rounding alone
    roles = {**Adapter.roles, "ffn_norm": "pre_feedforward_layernorm"}

    def computed_buffers(self, model) -> None:
        super().computed_buffers(model)
        embedding = model.model.embed_tokens
        embedding.register_buffer("embed_scale", torch.tensor(embedding.scalar_embed_scale), persistent=False)

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(model, hidden)
        cap = model.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def scale_norm(self, norm, s: torch.Tensor) -> None:
        norm.weight.copy_((1 + norm.weight) / s - 1)

    # --- GGUF ---------------------------------------------------------------------------------------

    def to_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        return w + 1 if gguf_tensor_name.endswith("norm.weight") else w

    def from_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        return w - 1 if gguf_tensor_name.endswith("norm.weight") else w

    def config_from_gguf(self, settings: dict, meta: dict, tensors: dict) -> dict:
        """Gemma 3's settings from llama.cpp's keys: the window and which layers have it (an array
        per layer, or llama.cpp's period), the two rope bases, attention scaled by 1/sqrt(head_dim)."""
        key = f"{self.gguf_name}."
        n, window = settings["num_hidden_layers"], meta.get(key + "attention.sliding_window")
        pattern = meta.get(key + "attention.sliding_window_pattern", LLAMA_CPP_PERIOD)
        sliding = [bool(p) for p in pattern] if isinstance(pattern, list) else [i % pattern < pattern - 1 for i in range(n)]
        if not window:
            sliding = [False] * n
        if len(sliding) != n:
            raise EdgequantError(f"the GGUF's sliding-window pattern has {len(sliding)} entries for {n} layers")
        theta = settings.pop("rope_theta")
        return {**settings, "sliding_window": window or 4096, "layer_types": [SLIDING if s else FULL for s in sliding],
                "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": theta},
                                    SLIDING: {"rope_type": "default", "rope_theta": float(meta.get(key + "rope.freq_base_swa", 10000.0))}},
                "query_pre_attn_scalar": settings["head_dim"], "final_logit_softcapping": meta.get(key + "final_logit_softcapping")}

    def rope_parameters(self, config) -> dict:
        return dict(config.rope_parameters[FULL])

    def gguf_metadata(self, w: gguf.GGUFWriter, config) -> None:
        if config.query_pre_attn_scalar != head_dim(config):
            raise EdgequantError(f"gemma3 with query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
                                 f"{head_dim(config)} has no GGUF form (llama.cpp scales attention by 1/sqrt(head_dim))")
        w.add_rope_freq_base_swa(float(config.rope_parameters[SLIDING]["rope_theta"]))
        sliding = [t == SLIDING for t in config.layer_types]
        if any(sliding):
            w.add_sliding_window(config.sliding_window)
            if sliding != [i % LLAMA_CPP_PERIOD < LLAMA_CPP_PERIOD - 1 for i in range(len(sliding))]:
                w.add_sliding_window_pattern(sliding)
        if config.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(float(config.final_logit_softcapping))

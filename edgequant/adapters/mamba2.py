"""Mamba-2: a state-space model. Each block is an RMSNorm, then a mixer: one input projection
(``in_proj``: the gate z, the SSM's input x with its B and C, and the time steps), a short causal
convolution, the selective scan, a gated RMSNorm and one output projection (``out_proj``).

- The two projections are the block's matrices: they are what gets quantized and planned (one
  part per block, ``ssm``). A scale of ``out_proj``'s input folds into the gated norm's weight,
  one of ``in_proj``'s into the block's norm, as for a transformer's readers of a norm.
- The convolution, A, D, the time-step bias and the norms stay float32 in the file, in llama.cpp's
  layouts: the convolution as (channels, kernel), A stored as -exp(A_log), A and D as columns,
  the gated norm's weight split per group.
- There is no attention, so no KV cache: a decoded token reads the weights and a fixed recurrent
  state (the convolution's last inputs and the SSM's state per block).
- No rotation passes through a block (the gate multiplies inside it), and ONNX Runtime has no
  selective-scan operator: both are refused with one line.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import torch

from ..errors import EdgequantError
from .base import Adapter, BlockShape, Group


class Mamba2(Adapter):
    model_types = ("mamba2",)
    gguf_arch = gguf.MODEL_ARCH.MAMBA2
    recurrent = True
    rotations = False
    onnx_refusal = "mamba2 has no ONNX export (ONNX Runtime has no selective-scan operator); use --formats gguf"
    layers_path = "backbone.layers"
    roles = {"attn_norm": "norm", "in": "mixer.in_proj", "ssm_norm": "mixer.norm", "out": "mixer.out_proj"}
    groups = (Group("ssm_in", ("in",), into="attn_norm"), Group("ssm_out", ("out",), into="ssm_norm"))
    renames = {".mixer.dt_bias": ".mixer.dt_proj.bias"}  # the name gguf-py maps to ssm_dt.bias

    def final_norm(self, model) -> torch.nn.Module:
        return model.backbone.norm_f

    def computed_buffers(self, model) -> None:
        """Nothing is computed: no rotary tables."""

    def writers(self, layer) -> list[torch.nn.Linear]:
        return [self.module(layer, "out")]

    def block_shape(self, layer, config) -> BlockShape:
        return BlockShape(config.expand * config.hidden_size, config.num_heads, 0)

    def state_bytes(self, config) -> int:
        """llama.cpp's recurrent state for one sequence, float32: per block the convolution's last
        ``kernel - 1`` inputs and the SSM state (heads x head_dim x state size)."""
        inner = config.expand * config.hidden_size
        conv = (config.conv_kernel - 1) * (inner + 2 * config.n_groups * config.state_size)
        return 4 * config.num_hidden_layers * (conv + inner * config.state_size)

    # --- GGUF ---------------------------------------------------------------------------------------

    def to_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        role = _role(gguf_tensor_name)
        if role == "ssm_conv1d" and w.ndim == 3:
            return w.reshape(w.shape[0], w.shape[2])
        if role == "ssm_a":
            return -np.exp(w).reshape(-1, 1)
        if role == "ssm_d":
            return w.reshape(-1, 1)
        if role == "ssm_norm":
            return w.reshape(config.n_groups, -1)
        return w

    def from_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        role = _role(gguf_tensor_name)
        if role == "ssm_conv1d" and w.ndim == 2:
            return w.reshape(w.shape[0], 1, w.shape[1])
        if role == "ssm_a":
            return np.log(-w.reshape(-1))
        if role in ("ssm_d", "ssm_norm"):
            return w.reshape(-1)
        return w

    def gguf_metadata(self, w: gguf.GGUFWriter, config) -> None:
        inner = config.expand * config.hidden_size
        if inner % config.head_dim or inner // config.head_dim != config.num_heads:
            raise EdgequantError(f"mamba2 with {config.num_heads} heads of {config.head_dim} for an inner size of {inner} "
                                 "has no GGUF form (llama.cpp counts heads as inner size / head_dim)")
        w.add_context_length(2**20)  # no positions: any context
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(config.conv_kernel)
        w.add_ssm_inner_size(inner)
        w.add_ssm_state_size(config.state_size)
        w.add_ssm_time_step_rank(config.num_heads)
        w.add_ssm_group_count(config.n_groups)
        w.add_layer_norm_rms_eps(config.layer_norm_epsilon)
        w.add_vocab_size(config.vocab_size)

    def config_from_gguf(self, settings: dict, meta: dict, tensors: dict) -> dict:
        key = f"{self.gguf_name}."

        def get(name: str) -> int:
            value = meta.get(key + name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EdgequantError(f"the GGUF file has a bad or no {key}{name} ({value!r:.40})")
            return value

        hidden, inner, heads = get("embedding_length"), get("ssm.inner_size"), get("ssm.time_step_rank")
        if inner % hidden or inner % heads:
            raise EdgequantError(f"the GGUF file's mamba2 sizes disagree: inner size {inner}, hidden {hidden}, {heads} heads")
        embd = tensors.get("token_embd.weight")
        eps = meta.get(key + "attention.layer_norm_rms_epsilon", 1e-5)
        return {"vocab_size": int(embd.data.shape[0]) if embd is not None else get("vocab_size"), "hidden_size": hidden,
                "num_hidden_layers": get("block_count"), "expand": inner // hidden, "num_heads": heads,
                "head_dim": inner // heads, "state_size": get("ssm.state_size"), "conv_kernel": get("ssm.conv_kernel"),
                "n_groups": get("ssm.group_count"), "layer_norm_epsilon": float(eps) if math.isfinite(eps) else 1e-5,
                "tie_word_embeddings": "output.weight" not in tensors,
                "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}


def _role(gguf_tensor_name: str) -> str:
    """``blk.3.ssm_a`` -> ``ssm_a``, ``blk.3.ssm_conv1d.weight`` -> ``ssm_conv1d``."""
    parts = gguf_tensor_name.split(".")
    return parts[2] if len(parts) > 2 and parts[0] == "blk" else ""

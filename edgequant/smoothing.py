"""Activation scaling maps: shrink activation outliers, folded into the weights (SmoothQuant-style).

Runtimes quantize activations too (llama.cpp turns them into 8-bit blocks before every
quantized matmul), and a few outlier channels make those blocks coarse. For a linear layer
fed by ``x``, dividing channel j of ``x`` by ``s_j`` and multiplying column j of the weight by
``s_j`` leaves the output unchanged; the division is folded into whatever produces ``x``:

* the RMSNorm weight before q/k/v (``attn_norm``) and before gate/up (``ffn_norm``);
* the rows of ``v_proj`` before ``o_proj`` (each value channel feeds one column per query head
  of its group);
* the rows of ``up_proj`` before ``down_proj`` (SiLU(gate) * up is linear in up).

So the exported model keeps the standard architecture: no extra ops in llama.cpp or ONNX.
``s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)`` balances the two ranges.
"""

from __future__ import annotations

import torch

from .models import LoadedModel


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-2, max=1e2)


@torch.no_grad()
def smooth(loaded: LoadedModel, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
    """Fold scaling maps into ``loaded.model`` in place. ``act_absmax`` maps GGUF names of the
    consuming matrices (e.g. ``blk.0.attn_q.weight``) to max |x| per input column."""
    config = loaded.config
    group = config.num_attention_heads // config.num_key_value_heads
    for i, layer in enumerate(loaded.model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp

        qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        s = smoothing_scales(act_absmax[f"blk.{i}.attn_q.weight"], qkv, alpha)
        layer.input_layernorm.weight.div_(s)
        for w in qkv:
            w.mul_(s)

        gate_up = [mlp.gate_proj.weight, mlp.up_proj.weight]
        s = smoothing_scales(act_absmax[f"blk.{i}.ffn_gate.weight"], gate_up, alpha)
        layer.post_attention_layernorm.weight.div_(s)
        for w in gate_up:
            w.mul_(s)

        s = smoothing_scales(act_absmax[f"blk.{i}.ffn_down.weight"], [mlp.down_proj.weight], alpha)
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)

        # o_proj's input is, per query head h, the value channels of kv head h // group
        head_dim = attn.o_proj.weight.shape[1] // config.num_attention_heads
        o_by_kv = lambda t: t.reshape(config.num_key_value_heads, group, head_dim)  # noqa: E731
        act = o_by_kv(act_absmax[f"blk.{i}.attn_output.weight"]).amax(1).reshape(-1)
        w_cols = o_by_kv(attn.o_proj.weight.abs().amax(0)).amax(1).reshape(-1)
        s = smoothing_scales(act, [w_cols[None]], alpha)
        attn.v_proj.weight.div_(s[:, None])
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.div_(s)
        s_per_head = s.reshape(config.num_key_value_heads, 1, head_dim).expand(-1, group, -1).reshape(-1)
        attn.o_proj.weight.mul_(s_per_head)

"""Weight-and-activation quantization (W4A4, W6A6, W8A8...) simulated exactly in torch.

No runtime here executes 4-bit activations (llama.cpp rounds them to 8-bit blocks, ONNX
Runtime's MatMulNBits to int8 or none), so WxAy settings are measured in a simulation:

* weights of the seven matrices of every block (q, k, v, o, gate, up, down): asymmetric,
  one scale and zero point per output row (or, with ``w_group``, per run of that many weights
  of a row, as ggml's and MatMulNBits' blocks are), the clipping ratio searched per row or group
  (least squared error over 1.0, 0.95 ... 0.5);
* their inputs: asymmetric, one scale per token (dynamic), clipped to ``a_clip`` of the range;
* optionally the KV cache: keys after RoPE and values, one scale per token and head;
* the embedding, norms, attention softmax and the output head stay in float32 (as in the
  papers being reproduced).

A method may leave a transform *online* (``online``: module path -> orthogonal matrix): the
simulated matrix then computes ``Q(x @ M) @ Q(W @ M)^T``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .adapters import adapter_of
from .errors import EdgequantError
from .ggml_quants import Grid

CLIPS = torch.linspace(1.0, 0.5, 11)
KV_ATTENTION = "edgequant_kv_quant"


@dataclass(frozen=True)
class Setting:
    """Bits of weights / activations / KV cache; ``None`` keeps float32."""

    wbits: int | None = 4
    abits: int | None = 4
    kv_bits: int | None = None
    gptq: bool = False  # weights rounded by GPTQ on the same grids (sequential, on calibration text)
    a_clip: float | None = None  # None: 0.9 at 4 bits or fewer (RUQuant's choice), else 1.0 (no clipping)
    w_group: int | None = None  # weights: one grid per this many weights of a row (None: one per row)

    @property
    def act_clip(self) -> float:
        if self.a_clip is not None:
            return self.a_clip
        return 0.9 if (self.abits or 16) <= 4 else 1.0

    @property
    def label(self) -> str:
        w = f"W{self.wbits or 16}A{self.abits or 16}"
        return (w + (f"KV{self.kv_bits}" if self.kv_bits else "") + (" GPTQ" if self.gptq and self.wbits else "")
                + (f" g{self.w_group}" if self.w_group and self.wbits else ""))


@dataclass
class Transformed:
    """A method's transformed copy of the model: ``work`` computes what the original does (up to
    a lossy method's own changes); ``online`` maps module paths to input transforms that could
    not be folded (simulated, not exported); ``details`` goes into the report."""

    work: object  # LoadedModel
    online: dict[str, torch.Tensor] = field(default_factory=dict)
    details: dict = field(default_factory=dict)


def quantize(x: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Asymmetric round to nearest along the last dimension (range widened to include 0)."""
    hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
    lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def quantize_ste(x: torch.Tensor, bits: int, clip: float = 1.0) -> torch.Tensor:
    """:func:`quantize` with straight-through rounding: gradients reach ``x`` and the scale."""
    hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
    lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-8)
    zero = torch.round(-lo / scale).detach()
    y = x / scale
    y = y + (torch.round(y) - y).detach()
    return (torch.clamp(y + zero, 0, 2**bits - 1) - zero) * scale


def _best_clips(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row (along the last dimension), the clipping ratio (of ``CLIPS``) whose rounding has
    the least squared error."""
    best_clip, best_err = torch.ones(*w.shape[:-1], 1), torch.full((*w.shape[:-1], 1), float("inf"))
    for clip in CLIPS:
        err = (quantize(w, bits, float(clip)) - w).pow(2).sum(-1, keepdim=True)
        better = err < best_err
        best_clip, best_err = torch.where(better, clip, best_clip), torch.where(better, err, best_err)
    return best_clip


def _groups(w: torch.Tensor, group: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, cols // group, group): the runs of weights that share a grid."""
    group = group or w.shape[-1]
    if w.shape[-1] % group:
        raise EdgequantError(f"weight groups of {group} do not divide rows of {w.shape[-1]} weights")
    return w.reshape(w.shape[0], -1, group)


@torch.no_grad()
def quantize_rows(w: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Each row (or run of ``group`` weights of a row) on its own grid, with the clipping ratio
    of least squared error."""
    runs = _groups(w, group)
    return quantize(runs, bits, _best_clips(runs, bits)).reshape(w.shape)


class RowGrid:
    """:func:`quantize_rows`'s grids as an :class:`edgequant.ggml_quants.Grid`, so that GPTQ
    (:func:`edgequant.methods.gptq.gptq`) can choose the codes on them."""

    joint_columns = 1  # GPTQ rounds its codes one column at a time

    def __init__(self, bits: int, group: int | None = None):
        self.bits, self.group = bits, group

    def fit(self, w, importance=None) -> Grid:
        runs = _groups(torch.as_tensor(w).float(), self.group)
        clip = _best_clips(runs, self.bits)
        hi, lo = runs.amax(-1, keepdim=True).clamp(min=0) * clip, runs.amin(-1, keepdim=True).clamp(max=0) * clip
        scale = ((hi - lo) / (2**self.bits - 1)).clamp(min=1e-8)
        offset = -torch.round(-lo / scale) * scale
        return Grid(scale[..., 0].numpy(), offset[..., 0].numpy(), runs.shape[-1], 0, 2**self.bits - 1, None, {})


class QuantLinear(torch.nn.Module):
    """A linear layer with fake-quantized weights and per-token fake-quantized inputs."""

    def __init__(self, linear: torch.nn.Linear, setting: Setting, online: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach()
        if online is not None:
            w = (w.double() @ online.double()).float()
            online = online.float()
        self.register_buffer("weight", quantize_rows(w, setting.wbits, setting.w_group) if setting.wbits else w.clone())
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.online = online
        self.abits, self.a_clip = setting.abits, setting.act_clip

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the matrix sees it: transformed online, then rounded."""
        if self.online is not None:
            x = x @ self.online
        if self.abits:
            x = quantize(x, self.abits, self.a_clip)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.prepare(x), self.weight, self.bias)


def _kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention on keys (after RoPE) and values quantized per token and head."""
    bits = module.config.edgequant_kv_bits
    return sdpa_attention_forward(module, query, quantize(key, bits), quantize(value, bits), attention_mask, **kwargs)


AttentionInterface.register(KV_ATTENTION, _kv_quant_attention)


def fake_quantize(model: torch.nn.Module, setting: Setting, online: dict[str, torch.Tensor] | None = None):
    """A copy of ``model`` computing every block's matrices at ``setting`` (the original is untouched).
    With ``setting.gptq`` the weights are left in float here; :func:`edgequant.activation_quant.gptq_weights` rounds them."""
    sim = copy.deepcopy(model)
    online, family = online or {}, adapter_of(sim)
    for i, layer in enumerate(family.layers(sim)):
        for path, module in list(layer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, attr = path.rpartition(".")
                quant = QuantLinear(module, replace(setting, wbits=None) if setting.gptq else setting,
                                    online.get(family.in_block(i, path)))
                setattr(layer.get_submodule(parent) if parent else layer, attr, quant)
    if setting.kv_bits:
        sim.config.edgequant_kv_bits = setting.kv_bits
        sim.set_attn_implementation(KV_ATTENTION)
    return sim

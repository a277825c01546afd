"""Activation scaling maps: per-channel scales folded into the weights, the model's function unchanged.

For a linear layer fed by ``x``, dividing channel j of ``x`` by ``s_j`` and multiplying column j of
the weight by ``s_j`` leaves the output as it was; the division is folded into whatever produces
``x``. Four groups of matrices per block share an input, each with a place to fold into:

* ``attn_in``: q/k/v, after the RMSNorm ``attn_norm`` (its weight is divided);
* ``attn_out``: o, fed by the value channels (the rows of v are divided; each value channel
  feeds one column per query head of its group, so those columns share the scale);
* ``ffn_in``: gate/up, after the RMSNorm ``ffn_norm``;
* ``ffn_out``: down, fed by SiLU(gate) * up, which is linear in up (the rows of up are divided).

So the exported model keeps the standard architecture: no extra ops in llama.cpp or ONNX.

Two ways to choose ``s``:

* :func:`smooth` (``build --smooth ALPHA``): SmoothQuant's balance of ranges,
  ``s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)``, one alpha everywhere;
* :func:`search_scales` (QuBLAST): ``s_j = rms(x_j)^alpha`` with alpha searched per group and
  block to minimise the error of the layer outputs as llama.cpp computes them: weights rounded
  to the ggml type the plan gave them, activations rounded to llama.cpp's 8-bit blocks. alpha = 0
  (no scaling) is a candidate, so a group is only rescaled where that lowers its measured error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .walker import Walk, run_block
from .ggml_quants import get_type
from .adapters import Adapter, Group, head_dim
from .models import LoadedModel


# Tried in this order until the error rises, taking it to fall to one least alpha and rise after it
# (on the 1.5B at the IQ1_M size, 1 group of 112 had a second, 0.5% lower, dip). A group that is best
# unscaled, as most are, so costs two roundings, not four. 0.75 and 1 were never chosen on the
# default model.
ALPHAS = (0.0, 0.125, 0.25, 0.5)


def kv_grouping(config) -> tuple[int, int]:
    """(query heads per kv head, head dim): o's columns are value channels repeated per query head."""
    return config.num_attention_heads // config.num_key_value_heads, head_dim(config)


def per_value_channel(config, per_o_column: torch.Tensor) -> torch.Tensor:
    """Reduce a statistic over o's input columns to one per value channel (max over query heads)."""
    group, head_dim = kv_grouping(config)
    return per_o_column.reshape(-1, group, head_dim).amax(1).reshape(-1)  # -1: a pruned block has fewer KV heads


def per_o_column(config, per_value: torch.Tensor) -> torch.Tensor:
    group, head_dim = kv_grouping(config)
    return per_value.reshape(-1, 1, head_dim).expand(-1, group, -1).reshape(-1)


@dataclass
class Folded:
    """The scales folded into a model, per consuming matrix (GGUF name): its input columns were
    multiplied by ``columns[name]`` and its input divided by them. Statistics of the inputs follow
    without running the model again: E[(x/s)^2] = E[x^2] / s^2."""

    columns: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, loaded: LoadedModel, block: int, group: Group, s: torch.Tensor) -> None:
        for c in group.consumers:
            name = loaded.gguf_name(loaded.adapter.weight_name(block, c))
            self.columns[name] = self.columns.get(name, 1.0) * s.detach().double()

    def importance(self, before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """E[x^2] per input column of every matrix after the fold, from the one before it."""
        return {name: (imp / (self.columns[name].numpy() ** 2)).astype(imp.dtype) if name in self.columns else imp
                for name, imp in before.items()}


def weights(family: Adapter, layer, group: Group) -> list[torch.Tensor]:
    return [family.module(layer, c).weight for c in group.consumers]


@torch.no_grad()
def fold(family: Adapter, layer, config, group: Group, s: torch.Tensor) -> torch.Tensor:
    """Divide ``group``'s input channels by ``s`` and multiply the consumers' columns by it;
    returns the scale of each consumer column.

    For a group fed by the value channels (``attn_out``), ``s`` has one entry per value channel."""
    into = family.module(layer, group.into)
    if isinstance(into, torch.nn.Linear):  # its output rows are the group's input channels
        into.weight.div_(s[:, None])
        if into.bias is not None:
            into.bias.div_(s)
    else:  # a norm: its weight scales the channels
        family.scale_norm(into, s)
    if group.into == "v":
        s = per_o_column(config, s)
    for w in weights(family, layer, group):
        w.mul_(s)
    return s


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-2, max=1e2)


@torch.no_grad()
def smooth(loaded: LoadedModel, act_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> Folded:
    """SmoothQuant maps folded into ``loaded.model`` in place. ``act_absmax`` maps GGUF names of the
    consuming matrices (e.g. ``blk.0.attn_q.weight``) to max |x| per input column."""
    config, family = loaded.config, loaded.adapter
    folded = Folded()
    for i in range(config.num_hidden_layers):
        with loaded.block(i):
            layer = family.layers(loaded.model)[i]
            for g in family.groups:
                act = act_absmax[loaded.gguf_name(family.weight_name(i, g.consumers[0]))]
                ws = weights(family, layer, g)
                if g.into == "v":
                    act = per_value_channel(config, act)
                    ws = [per_value_channel(config, ws[0].abs().amax(0))[None]]
                folded.add(loaded, i, g, fold(family, layer, config, g, smoothing_scales(act, ws, alpha)))
    return folded


# --- QuBLAST: scales searched against the error llama.cpp will make -------------------------------

ACTIVATION_BLOCK = {"Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}  # Q8_K; else Q8_0/Q8_1: 32


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """llama.cpp's 8-bit activation blocks (Q8_0 / Q8_K): symmetric, scale amax / 127."""
    xb = x.reshape(x.shape[0], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d.clamp(min=1e-30)), 0.0)
    return (q * d).reshape(x.shape)


@contextmanager
def llama_cpp_activations(model: torch.nn.Module, types: dict[str, str]) -> Iterator[None]:
    """While inside, every linear layer at a path in ``types`` rounds its input to the 8-bit
    blocks llama.cpp's CPU dot products use for that weight type (Q8_K for K-quants, else Q8_0)."""

    def hook_for(block):
        return lambda _m, args: (quantize_activations(args[0].reshape(-1, args[0].shape[-1]), block).reshape(args[0].shape),)

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(ACTIVATION_BLOCK.get(t, 32)))
               for path, t in types.items() if t not in ("F32", "F16", "BF16")]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def outlier_ratio(x: torch.Tensor) -> float:
    """max |x| / std(x) over all tokens and channels of one activation."""
    return float(x.abs().max() / x.std())


@dataclass
class ScaleChoice:
    block: int
    group: str
    alpha: float
    error_ratio: float  # output error with the chosen scales / without
    outlier_before: float
    outlier_after: float


def _output_error(x, weights, types, s, outputs) -> float:
    """Squared error of the group's outputs when weights (columns * s) are rounded to their
    types and activations (/ s) to 8-bit blocks, against the float ``outputs`` (x @ w.T)."""
    err = 0.0
    xs = x / s
    importance = (xs * xs).mean(0).numpy()
    rounded = {}  # the activations in each block size (a group's matrices share their input)
    for w, t, y in zip(weights, types, outputs):
        qt = get_type(t)
        wq = torch.from_numpy(qt.dequantized((w * s).numpy(), importance))
        block = ACTIVATION_BLOCK.get(t, 32)
        if block not in rounded:
            rounded[block] = quantize_activations(xs, block)
        err += float(((rounded[block] @ wq.T) - y).pow(2).sum())
    return err


# A group whose largest matrix has more weights than this is compared on every k-th row of each
# matrix, k the least that leaves at most this many. A scale acts on the columns, the same on every
# row, so evenly spaced rows rank the alphas as the whole matrices do, at a fraction of the rounding
# (Qwen2.5-1.5B's 8960 x 1536 gate/up and 1536 x 8960 down: a fifth).
SEARCH_WEIGHTS = 3_000_000


def _choose(config, g: Group, x: torch.Tensor, weights: list[torch.Tensor], types: list[str]):
    """The alpha of least output error for group ``g`` fed by ``x``; returns the ScaleChoice
    fields after ``block`` and the scales to fold (one per value channel for attn_out)."""
    rms = x.pow(2).mean(0).sqrt().clamp(min=1e-5)
    if g.into == "v":
        rms = per_value_channel(config, rms)

    def on_columns(s):
        return per_o_column(config, s) if g.into == "v" else s

    stride = -(-max(w.numel() for w in weights) // SEARCH_WEIGHTS)  # one for the group: its errors are summed
    weights = [w.detach().float()[::stride] for w in weights]
    candidates = {a: rms**a / (rms.max() * rms.min()) ** (a / 2) for a in ALPHAS}
    outputs = [x @ w.T for w in weights]  # the float outputs, the same for every alpha
    errors: dict[float, float] = {}
    for a, s in candidates.items():
        errors[a] = _output_error(x, weights, types, on_columns(s), outputs)
        if errors[a] > min(errors.values()):  # past the least
            break
    best = min(errors, key=errors.get)
    after = outlier_ratio(x / on_columns(candidates[best]))
    return (g.key, best, errors[best] / errors[0.0], outlier_ratio(x), after), candidates[best]


def _group_inputs(family: Adapter, layer, hidden: list[torch.Tensor], kwargs: dict,
                  max_tokens: int) -> dict[str, torch.Tensor]:
    """Inputs of each group's first consumer over (up to ``max_tokens`` of) the windows."""
    seen: dict[str, list[torch.Tensor]] = {g.key: [] for g in family.groups}
    hooks = [
        family.module(layer, g.consumers[0]).register_forward_hook(
            lambda _m, inputs, _o, key=g.key: seen[key].append(inputs[0].reshape(-1, inputs[0].shape[-1]))
        )
        for g in family.groups
    ]
    try:
        n = 0
        for h in hidden:
            if n >= max_tokens:
                break
            run_block(layer, h, kwargs)
            n += h.shape[0] * h.shape[1]
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v)[:max_tokens].float() for k, v in seen.items()}


@torch.inference_mode()
def search_scales(
    loaded: LoadedModel,
    windows: np.ndarray,
    types: dict[str, str],
    max_tokens: int = 2048,
    progress: Callable[[], None] | None = None,
) -> tuple[list[ScaleChoice], Folded]:
    """Choose and fold the scaling maps of every block of ``loaded.model`` in place.

    ``types`` maps GGUF matrix names to the ggml type each will be stored in. The search reads
    the first ``max_tokens`` of the windows, and only those windows are carried through the blocks.
    One block's activations are held at a time; folding leaves each block's outputs unchanged, so
    the folded block, run on its inputs, hands the next block the inputs it had before."""
    config, family = loaded.config, loaded.adapter
    choices, folded = [], Folded()
    for stop in Walk(loaded, windows[: -(-max_tokens // windows.shape[1])], progress):
        i, layer = stop.index, stop.block
        inputs = _group_inputs(family, layer, stop.inputs, stop.kwargs, max_tokens)
        for g in family.groups:
            names = [types[loaded.gguf_name(family.weight_name(i, c))] for c in g.consumers]
            choice, s = _choose(config, g, inputs[g.key], weights(family, layer, g), names)
            choices.append(ScaleChoice(i, *choice))
            if choice[1]:
                folded.add(loaded, i, g, fold(family, layer, config, g, s))
    return choices, folded

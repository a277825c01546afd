"""Structural pruning: narrower FFNs, fewer KV groups, fewer blocks, in the matrices themselves.

A :class:`Pruning` says what each block keeps. :func:`prune` returns a copy of the model whose
matrices are that much smaller (a Hugging Face model whose blocks differ in size, which it runs
as is), with each pruned block's output projection refitted by least squares on calibration
text so that it best reproduces the block's original output from what is left:

    W' = W G[:, kept] G[kept, kept]^-1,   G = E[z z^T] over the projection's inputs z

(``down_proj`` for FFN channels, ``o_proj`` for attention heads). Blocks are done in order, and
each one's statistics are taken on the outputs of the blocks already pruned, so the refits see
the errors of earlier choices.

Attention heads go by whole KV groups (a key/value head and the query heads that read it), so
every block keeps the model's query-per-KV ratio, and every kept block keeps at least one group
(llama.cpp needs heads in the first block, and empty parts of a block trip its FFN-free path):
to drop a block's attention or FFN entirely, remove the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .calibration import block_input_grams, block_inputs, run_block
from .errors import EdgequantError
from .models import LoadedModel
from .smoothing import kv_grouping

DAMP = 1e-2  # ridge on the Gram diagonal, relative to its mean


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one block: FFN width, query heads, KV heads."""

    ffn: int
    heads: int
    kv_heads: int


@dataclass
class Pruning:
    """What to keep. ``ffn``: block -> FFN channel indices kept; ``kv_groups``: block -> KV group
    indices kept; ``removed``: blocks dropped whole. Blocks not named keep everything."""

    ffn: dict[int, list[int]] = field(default_factory=dict)
    kv_groups: dict[int, list[int]] = field(default_factory=dict)
    removed: tuple[int, ...] = ()

    def check(self, config) -> None:
        """EdgequantError unless every index exists and no kept block would be left empty."""
        n = config.num_hidden_layers
        blocks = set(self.ffn) | set(self.kv_groups) | set(self.removed)
        if any(not 0 <= b < n for b in blocks):
            raise EdgequantError(f"pruning names a block outside 0..{n - 1}")
        if len(set(self.removed)) >= n:
            raise EdgequantError("pruning would remove every block")
        for block, keep in self.ffn.items():
            if not keep or not set(keep) <= set(range(config.intermediate_size)) or len(set(keep)) != len(keep):
                raise EdgequantError(f"block {block}: FFN channels kept must be distinct, in range and not none")
        for block, keep in self.kv_groups.items():
            if not keep or not set(keep) <= set(range(config.num_key_value_heads)) or len(set(keep)) != len(keep):
                raise EdgequantError(f"block {block}: KV groups kept must be distinct, in range and not none")

    def as_dict(self) -> dict:
        return {"ffn_kept": {str(b): len(k) for b, k in sorted(self.ffn.items())},
                "kv_groups_kept": {str(b): sorted(k) for b, k in sorted(self.kv_groups.items())},
                "removed": sorted(self.removed)}


def shapes(model) -> list[BlockShape]:
    """Each block's sizes, read from its matrices."""
    _, head_dim = kv_grouping(model.config)
    return [BlockShape(layer.mlp.gate_proj.out_features, layer.self_attn.q_proj.out_features // head_dim,
                       layer.self_attn.k_proj.out_features // head_dim) for layer in model.model.layers]


def is_pruned(model) -> bool:
    """Whether any block's sizes differ from the config's (the model needs per-block metadata)."""
    c = model.config
    full = BlockShape(c.intermediate_size, c.num_attention_heads, c.num_key_value_heads)
    return any(s != full for s in shapes(model))


@torch.no_grad()
def prune(loaded: LoadedModel, pruning: Pruning, windows: np.ndarray, refitted: bool = True) -> LoadedModel:
    """A pruned copy of ``loaded`` (the original is untouched), refitted on ``windows``
    (``refitted=False``: the kept columns of o/down as they were, for comparison)."""
    pruning.check(loaded.config)
    work = loaded.copy()
    model = work.model
    hidden, kwargs = block_inputs(model, windows)
    for i, layer in enumerate(model.model.layers):
        if i in pruning.ffn or i in pruning.kv_groups:
            grams = _input_grams(layer, hidden, kwargs) if refitted else {"o": None, "down": None}
            if i in pruning.ffn:
                _prune_ffn(layer.mlp, sorted(pruning.ffn[i]), grams["down"])
            if i in pruning.kv_groups:
                _prune_heads(layer.self_attn, model.config, sorted(pruning.kv_groups[i]), grams["o"])
        if i not in pruning.removed:
            hidden = [run_block(layer, h, kwargs) for h in hidden]
    _remove_blocks(model, set(pruning.removed))
    return work


def _input_grams(layer, hidden, kwargs) -> dict[str, torch.Tensor]:
    """E[z z^T] of the inputs of the block's o_proj and down_proj."""
    return block_input_grams(layer, hidden, kwargs, {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj})


def refit(w: torch.Tensor, gram: torch.Tensor | None, kept: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The columns for inputs ``kept`` that best reproduce ``w @ z`` (least squares over z with
    second moments ``gram``): ``w G[:, kept] G[kept, kept]^-1``, ridge-damped. Without a
    ``gram``, the kept columns as they are."""
    if gram is None:
        return w[:, kept].clone()
    g_kk = gram[kept][:, kept]
    g_kk = g_kk + damp * g_kk.diagonal().mean() * torch.eye(len(kept), dtype=gram.dtype)
    rhs = w.double() @ gram[:, kept]
    return torch.linalg.solve(g_kk, rhs.T).T.to(w.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = weight.contiguous()
    if bias is not None:
        lin.bias.data = bias.contiguous()
    return lin


def _rows(lin: torch.nn.Linear, rows: torch.Tensor) -> torch.nn.Linear:
    return _linear(lin.weight[rows], None if lin.bias is None else lin.bias[rows])


def _prune_ffn(mlp, keep: list[int], gram: torch.Tensor) -> None:
    kept = torch.tensor(keep)
    mlp.down_proj = _linear(refit(mlp.down_proj.weight, gram, kept), mlp.down_proj.bias)
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, kept), _rows(mlp.up_proj, kept)


def _prune_heads(attn, config, groups: list[int], gram: torch.Tensor) -> None:
    per_group, head_dim = kv_grouping(config)
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
    q_rows = torch.cat([torch.arange(g * per_group * head_dim, (g + 1) * per_group * head_dim) for g in groups])
    attn.o_proj = _linear(refit(attn.o_proj.weight, gram, q_rows), attn.o_proj.bias)
    attn.q_proj = _rows(attn.q_proj, q_rows)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows), _rows(attn.v_proj, kv_rows)


def resize_blocks(model, sizes: list[BlockShape]) -> None:
    """Give each block fresh (uninitialised) matrices of the sizes ``sizes`` (a pruned model's
    skeleton, to load its weights into)."""
    c, (_, dim) = model.config, kv_grouping(model.config)
    for layer, size in zip(model.model.layers, sizes):
        a, m = layer.self_attn, layer.mlp
        device, bias = a.q_proj.weight.device, a.q_proj.bias is not None

        def new(n_in, n_out, has_bias=False):
            return torch.nn.Linear(n_in, n_out, bias=has_bias, device=device, dtype=a.q_proj.weight.dtype)

        a.q_proj, a.k_proj = new(c.hidden_size, size.heads * dim, bias), new(c.hidden_size, size.kv_heads * dim, bias)
        a.v_proj = new(c.hidden_size, size.kv_heads * dim, bias)
        a.o_proj = new(size.heads * dim, c.hidden_size, a.o_proj.bias is not None)
        m.gate_proj, m.up_proj = new(c.hidden_size, size.ffn), new(c.hidden_size, size.ffn)
        m.down_proj = new(size.ffn, c.hidden_size)


def _remove_blocks(model, removed: set[int]) -> None:
    if not removed:
        return
    kept = [layer for i, layer in enumerate(model.model.layers) if i not in removed]
    model.model.layers = torch.nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    c = model.config
    if getattr(c, "layer_types", None):
        c.layer_types = [t for i, t in enumerate(c.layer_types) if i not in removed]
    c.num_hidden_layers = len(kept)

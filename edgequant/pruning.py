"""Structural pruning: narrower FFNs, fewer KV groups, fewer blocks, in the matrices themselves.

A :class:`Pruning` says what each block keeps. :func:`prune` returns a copy of the model whose
matrices are that much smaller (a Hugging Face model whose blocks differ in size, which it runs
as is). Each pruned block's output projection is refitted by least squares on calibration text,
so that from what is left it best reproduces what the unpruned projection computed from the
same inputs:

    W' = W G[:, kept] G[kept, kept]^-1,   G = E[z z^T] over the projection's inputs z

(``o_proj`` for attention heads, then ``down_proj`` for FFN channels, whose inputs are measured
after the block's heads are pruned). Blocks are done in order and measured on the outputs of the
blocks already pruned: each refit fits the activations the pruned model really produces (the
errors of earlier blocks are in its statistics, not undone by it).

Attention heads go by whole KV groups (a key/value head and the query heads that read it), so
every block keeps the model's query-per-KV ratio, and every kept block keeps at least one group
and one FFN channel (llama.cpp needs heads in the first block, and its FFN-free path drops the
block's attention output too): to drop a block's attention or FFN entirely, remove the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import Adapter, adapter_of
from .calibration import block_input_grams
from .errors import EdgequantError
from .models import LoadedModel, block_shapes
from .smoothing import kv_grouping
from .walker import Walk

DAMP = 1e-2  # ridge on the Gram diagonal, relative to its mean


@dataclass
class Pruning:
    """What to keep. ``ffn``: block -> FFN channel indices kept; ``kv_groups``: block -> KV group
    indices kept; ``removed``: blocks dropped whole. Blocks not named keep everything."""

    ffn: dict[int, list[int]] = field(default_factory=dict)
    kv_groups: dict[int, list[int]] = field(default_factory=dict)
    removed: tuple[int, ...] = ()

    def check(self, model) -> None:
        """EdgequantError unless every index exists in ``model`` (whose blocks may already be
        pruned) and no kept block would be left empty."""
        sizes = block_shapes(model)
        n = len(sizes)
        if not all(_is_index(b) for b in (*self.ffn, *self.kv_groups, *self.removed)):
            raise EdgequantError("pruning: blocks are given by their integer index")
        if any(not 0 <= b < n for b in (*self.ffn, *self.kv_groups, *self.removed)):
            raise EdgequantError(f"pruning names a block outside 0..{n - 1}")
        if len(set(self.removed)) >= n:
            raise EdgequantError("pruning would remove every block")
        for what, kept, limit in (("FFN channels", self.ffn, lambda b: sizes[b].ffn),
                                  ("KV groups", self.kv_groups, lambda b: sizes[b].kv_heads)):
            for block, keep in kept.items():
                if not keep or not all(_is_index(k) and 0 <= k < limit(block) for k in keep) or len(set(keep)) != len(keep):
                    raise EdgequantError(f"block {block}: the {what} kept must be distinct indices below "
                                         f"{limit(block)}, and at least one")

    def __bool__(self) -> bool:
        """Whether anything is pruned at all."""
        return bool(self.ffn or self.kv_groups or self.removed)

    def as_dict(self) -> dict:
        return {"ffn_channels_kept": {str(b): len(k) for b, k in sorted(self.ffn.items())},
                "kv_groups_kept": {str(b): sorted(k) for b, k in sorted(self.kv_groups.items())},
                "removed": sorted(self.removed)}


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@torch.no_grad()
def prune(loaded: LoadedModel, pruning: Pruning, windows: np.ndarray, refitted: bool = True) -> LoadedModel:
    """A pruned copy of ``loaded`` (the original is untouched), refitted on ``windows``
    (``refitted=False``: the kept columns of o/down as they were, for comparison)."""
    pruning.check(loaded.model)
    work = loaded.copy()
    model, family = work.model, work.adapter
    for stop in Walk(work, windows):
        i = stop.index
        if i in pruning.removed:
            stop.outputs = stop.inputs  # its input goes on to the next block unchanged
            continue
        prune_block(family, stop.block, model.config, pruning.kv_groups.get(i), pruning.ffn.get(i), stop.inputs,
                    stop.kwargs, refitted)
    _remove_blocks(model, set(pruning.removed))
    return work


def prune_block(family: Adapter, layer, config, kv_groups: list[int] | None, ffn: list[int] | None, hidden: list[torch.Tensor],
                kwargs: dict, refitted: bool = True) -> None:
    """Prune one block in place to the KV groups and FFN channels kept (None: all), refitting
    ``o_proj`` then ``down_proj`` on the block's inputs ``hidden``."""
    if kv_groups is not None:
        gram = _input_gram(layer, family.module(layer, "o"), hidden, kwargs) if refitted else None
        prune_heads(family, layer, config, sorted(kv_groups), gram)
    if ffn is not None:
        gram = _input_gram(layer, family.module(layer, "down"), hidden, kwargs) if refitted else None
        prune_ffn(family, layer, sorted(ffn), gram)


def _input_gram(layer, module, hidden, kwargs) -> torch.Tensor:
    """E[z z^T] of ``module``'s inputs while ``layer`` runs on ``hidden``."""
    return block_input_grams(layer, hidden, kwargs, {"m": module})["m"]


def refit(w: torch.Tensor, gram: torch.Tensor | None, kept: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """The columns for inputs ``kept`` that best reproduce ``w @ z`` (least squares over z with
    second moments ``gram``): ``w G[:, kept] G[kept, kept]^-1``, ridge-damped. Without a
    ``gram``, the kept columns as they are."""
    if gram is None:
        return w[:, kept].clone()
    gram = gram.double()
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


def prune_ffn(family: Adapter, layer, keep: list[int], gram: torch.Tensor | None) -> None:
    """Keep FFN channels ``keep``; ``down`` refitted on input moments ``gram`` (None: sliced)."""
    _keep(family, layer, torch.tensor(keep), rows=("gate", "up"), refitted="down", gram=gram)


def prune_heads(family: Adapter, layer, config, groups: list[int], gram: torch.Tensor | None) -> None:
    """Keep KV groups ``groups`` and their query heads; ``o`` refitted as in :func:`prune_ffn`."""
    per_group, head_dim = kv_grouping(config)
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
    q_rows = torch.cat([torch.arange(g * per_group * head_dim, (g + 1) * per_group * head_dim) for g in groups])
    _keep(family, layer, q_rows, rows=("q",), refitted="o", gram=gram)
    _keep(family, layer, kv_rows, rows=("k", "v"))


def _keep(family: Adapter, layer, kept: torch.Tensor, rows: tuple[str, ...], refitted: str | None = None,
          gram: torch.Tensor | None = None) -> None:
    """Keep output rows ``kept`` of the matrices ``rows``, and refit the columns of ``refitted``
    (the matrix that reads them) to those rows."""
    if refitted:
        lin = family.module(layer, refitted)
        family.set_module(layer, refitted, _linear(refit(lin.weight, gram, kept), lin.bias))
    for role in rows:
        family.set_module(layer, role, _rows(family.module(layer, role), kept))


def _remove_blocks(model, removed: set[int]) -> None:
    if not removed:
        return
    family = adapter_of(model)
    kept = [layer for i, layer in enumerate(family.layers(model)) if i not in removed]
    parent, _, name = family.layers_path.rpartition(".")
    setattr(model.get_submodule(parent), name, torch.nn.ModuleList(kept))
    for i, layer in enumerate(kept):
        family.module(layer, "attn").layer_idx = i
    c = model.config
    if getattr(c, "layer_types", None):
        c.layer_types = [t for i, t in enumerate(c.layer_types) if i not in removed]
    c.num_hidden_layers = len(kept)

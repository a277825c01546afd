"""RUQuant: block rotations that make activations uniform, then one tuned global Householder.

Stage 1 (per site, from calibration activations). Split each activation row into blocks of B
channels; one B x B orthogonal matrix R serves every block. R is grown greedily: the block
holding the largest value is reflected (Householder) onto a random vector with uniform entries
and the same length, then, ``ROUNDS`` times, the blocks' channels are shuffled and each pair of
channels of the new largest block is turned (Givens) toward a uniform target. Spreading an
outlier over the block this way makes the values closer to uniform, for which a uniform grid
is the best quantizer (Lloyd-Max). After ``STEPS`` such steps the channels are dealt to the
blocks in zig-zag order of their ranges (so every block gets big and small ones), a second R is
grown, and a Householder reflection over the whole row sends the largest token toward a
uniform target.

Stage 2 tunes that global Householder vector with AdamW to minimise the error of the layer
outputs after quantization (straight-through rounding), keeping the best vector seen.

Two placements:

* :func:`transform` is RUQuant as its authors' code runs it (the simulation's ``ruquant``):
  SmoothQuant's migration (alpha 0.6) folded in, then every input site of every block (q/k/v,
  o, gate/up, down) gets its own stage-1 transform (B = 64; 128 on the down input) and its own
  tuned reflection, all applied online: 4 transforms per block that stock llama.cpp cannot run.
* :func:`folded_transform` is what ships (``ruquant-folded`` in the simulation, ``build --method
  ruquant``): ONE transform (B = 64) for the residual stream, computed from the pooled q/k/v and
  gate/up inputs of every block, and each block's value heads turned per KV group (B = head_dim),
  all folded into the weights (:mod:`edgequant.rotations`). A model whose output head is tied to
  the embedding keeps only the value-head turns (``residual=False``): folding the residual
  transform would need a second vocab x hidden matrix in the file.
"""

from __future__ import annotations

import math
import time

import torch

from ..adapters import adapter_of
from ..calibration import Calibration, activation_stats, linear_inputs
from ..fakequant import Setting, Transformed, quantize_ste
from ..errors import EdgequantError
from ..models import LoadedModel
from ..progress import Progress
from ..rotations import (block_diagonal, householder, pair_angles, prepare, reflect, reflection_onto, rotate_residual,
                         rotate_value_heads, turn_pairs)
from ..smoothing import kv_grouping, smooth, weights

STEPS = 16
ROUNDS = 3
RESIDUAL_BLOCK = 64
CALIB_TOKENS = 2048  # per site
POOLED_TOKENS = 8192  # for the residual transform, over all blocks
TUNE_TOKENS = 256
TUNE_STEPS = 20
TUNE_LR = 1e-2
SEED = 444
SMOOTH_ALPHA = 0.6  # the reference scripts' setting at W6A6; used at every setting here
MIN_BLOCK = 16
SITE_BLOCK = {"attn_in": 64, "attn_out": 64, "ffn_in": 64, "ffn_out": 128}  # B per input site (the adapter's groups)


def _uniform_like(u: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A target for ``u``: entries drawn from U[0, 1), as in the reference code."""
    return torch.rand(u.shape[0], generator=gen, dtype=torch.float64)


def block_rotation(columns: torch.Tensor, gen: torch.Generator, steps: int = STEPS,
                   rounds: int = ROUNDS) -> torch.Tensor:
    """R (B x B, orthogonal) for blocks given as the columns of ``columns`` (B x N): ``R @ block``."""
    xc = columns.double()
    size = xc.shape[0]
    r = torch.eye(size, dtype=torch.float64)

    def largest():
        return xc[:, xc.abs().amax(0).argmax()]

    for _ in range(steps):
        u = largest()
        w = reflection_onto(u, _uniform_like(u, gen))
        xc, r = reflect(xc, w), reflect(r, w)
        for _ in range(rounds):
            perm = torch.randperm(size, generator=gen)
            xc, r = xc[perm], r[perm]
            u = largest()
            angle = pair_angles(u, _uniform_like(u, gen))
            xc, r = turn_pairs(xc, angle), turn_pairs(r, angle)
    return r


def zigzag(absmax: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order dealing channels, largest range first, to the blocks in zig-zag order."""
    n_blocks = len(absmax) // block
    order = torch.argsort(absmax, descending=True)
    slots = [[] for _ in range(n_blocks)]
    for rank, channel in enumerate(order.tolist()):
        pos = rank % n_blocks
        slots[pos if (rank // n_blocks) % 2 == 0 else n_blocks - 1 - pos].append(channel)
    return torch.tensor([c for s in slots for c in s])


def _blockwise(x: torch.Tensor, block: int, gen) -> torch.Tensor:
    """Row-convention transform ``x -> x @ M`` applying one stage-1 R to every block of ``x``."""
    r = block_rotation(x.double().reshape(-1, block).T, gen)
    return block_diagonal(r.T, x.shape[1] // block)


def base_transform(x: torch.Tensor, block: int, gen) -> torch.Tensor:
    """R_a on blocks, zig-zag permutation, R_b on blocks: ``x -> x @ M`` (d x d, orthogonal)."""
    m = _blockwise(x, block, gen)
    y = x.double() @ m
    perm = torch.eye(x.shape[1], dtype=torch.float64)[:, zigzag(y.abs().amax(0), block)]
    m = m @ perm
    return m @ _blockwise(x.double() @ m, block, gen)


def initial_reflection(x: torch.Tensor, gen) -> torch.Tensor:
    """Householder vector sending the token of largest value toward a uniform target."""
    u = x[x.abs().amax(1).argmax()].double()
    return reflection_onto(u, _uniform_like(u, gen))


def _reflect(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ householder(w)`` as a rank-1 update."""
    return x - 2 * torch.outer(x @ w, w) / w.dot(w)


def tune_reflection(w0: torch.Tensor, sites: list[tuple[torch.Tensor, torch.Tensor]], setting: Setting,
                    steps: int = TUNE_STEPS, lr: float = TUNE_LR) -> tuple[torch.Tensor, list[float]]:
    """Stage 2: the Householder vector (start ``w0``) minimising the summed relative error of
    ``Q(x H) Q(W H)^T`` against ``x W^T`` over ``sites`` = [(x, W)]; returns it and the losses."""
    targets = [x @ w.T for x, w in sites]
    vec = torch.nn.Parameter(w0.float().clone())
    opt = torch.optim.AdamW([vec], lr=lr, weight_decay=0)
    wbits, abits = setting.wbits or 8, setting.abits or 8

    def loss_of(v):
        total = 0.0
        for (x, w), target in zip(sites, targets):
            out = quantize_ste(_reflect(x, v), abits, setting.act_clip) @ quantize_ste(_reflect(w, v), wbits).T
            total = total + (out - target).pow(2).sum() / target.pow(2).sum()
        return total / len(sites)

    best, best_loss, losses = vec.detach().clone(), float("inf"), []
    for _ in range(steps + 1):
        with torch.enable_grad():
            loss = loss_of(vec)
        losses.append(loss.item())
        if losses[-1] < best_loss:
            best, best_loss = vec.detach().clone(), losses[-1]
        opt.zero_grad()
        with torch.enable_grad():
            loss.backward()
        opt.step()
    return best.double(), losses


def tuned_site_transform(x: torch.Tensor, w: torch.Tensor, block: int, setting: Setting,
                         gen) -> tuple[torch.Tensor, list[float]]:
    """One site's ``x -> x @ M``: stage 1 on its inputs ``x``, then the global reflection tuned
    (stage 2) on the first tokens against the weights ``w`` that read it; also stage 2's losses."""
    base = base_transform(x, block, gen)
    start = initial_reflection(x.double() @ base, gen)
    tuned, losses = tune_reflection(start, [((x[:TUNE_TOKENS].double() @ base).float(), (w.double() @ base).float())],
                                    setting)
    return base @ householder(tuned), losses


def site_block(width: int, preferred: int) -> int:
    """The block size B for a ``width``-wide input: ``preferred`` if it divides the width, else
    their largest common divisor, which must still be at least ``MIN_BLOCK``."""
    block = math.gcd(preferred, width)
    if block < MIN_BLOCK:
        raise EdgequantError(f"ruquant: a {width}-wide input splits into no blocks of {MIN_BLOCK} or more channels")
    return block


def _paths(family, n_layers: int, role: str) -> list[str]:
    return [family.path(i, role) for i in range(n_layers)]


def transform(loaded: LoadedModel, calibration: Calibration, setting: Setting, progress: Progress) -> Transformed:
    """RUQuant as published: a smoothed copy of the model (FP-equivalent) and, for every input site
    of every block, its stage-1 transform with a reflection tuned for ``setting``, left online."""
    started = time.time()
    gen = torch.Generator().manual_seed(SEED)
    work = loaded.copy()
    with progress.step("ruquant: smoothing (alpha %.1f)" % SMOOTH_ALPHA, work.config.num_hidden_layers) as tick:
        smooth(work, activation_stats(work, calibration.windows, tick).absmax, SMOOTH_ALPHA)
    family = work.adapter
    layers = family.layers(work.model)
    with progress.step("ruquant: collect activations"):
        paths = [p for g in family.groups for p in _paths(family, len(layers), g.consumers[0])]
        acts = linear_inputs(work.model, calibration.windows, paths, CALIB_TOKENS)
    online, start_loss, best_loss = {}, [], []
    with progress.step("ruquant: per-site transforms, tuned", len(layers)) as tick:
        for i, layer in enumerate(layers):
            for g in family.groups:  # the site is the consumers' shared input
                x = acts[family.path(i, g.consumers[0])]
                w = torch.cat([t.detach() for t in weights(family, layer, g)])
                m, losses = tuned_site_transform(x, w, site_block(x.shape[1], SITE_BLOCK[g.key]), setting, gen)
                online |= {family.path(i, c): m for c in g.consumers}
                start_loss.append(losses[0])
                best_loss.append(min(losses))
            tick()
    return Transformed(work, online, {
        "placement": "reference: smoothing folded, every site's transform online", "smoothing_alpha": SMOOTH_ALPHA,
        "stage2_loss_start": sum(start_loss) / len(start_loss), "stage2_loss_best": sum(best_loss) / len(best_loss),
        "tuned_for": setting.label, "seconds": time.time() - started,
        "online": f"{len(family.groups)} per block, on the q/k/v, o, gate/up and down inputs (7 matrices)"})


def folded_transform(loaded: LoadedModel, calibration: Calibration, setting: Setting, progress: Progress,
                     residual: bool = True) -> Transformed:
    """The deployable RUQuant: a rotated copy of the model computing what the original does, with
    nothing left online. Without ``residual`` the residual stream is left alone (and a tied output
    head stays tied)."""
    started = time.time()
    gen = torch.Generator().manual_seed(SEED)
    work = loaded.copy()
    model, family = work.model, work.adapter
    config, n = model.config, model.config.num_hidden_layers
    attn_in, ffn_in, o_in = (_paths(family, n, role) for role in ("q", "gate", "o"))
    if residual:
        prepare(model)  # the residual sites' inputs are then the plain x / rms(x) the rotation sees
    with progress.step("ruquant: collect activations"):
        acts = linear_inputs(model, calibration.windows, (attn_in + ffn_in if residual else []) + o_in, CALIB_TOKENS)
    details = {"residual": residual}
    if residual:
        details |= _rotate_residual(model, acts, attn_in, ffn_in, setting, gen, progress)
    group, head_dim = kv_grouping(config)
    with progress.step("ruquant: value-head transforms", n) as tick:
        for i, layer in enumerate(family.layers(model)):
            kv_heads = family.module(layer, "k").out_features // head_dim  # fewer in a pruned block
            heads = acts[o_in[i]].double().reshape(-1, kv_heads, group, head_dim)
            per_group = [block_rotation(heads[:, g].reshape(-1, head_dim).T, gen).T for g in range(kv_heads)]
            rotate_value_heads(layer, config, per_group)
            tick()
    return Transformed(work, {}, details | {"seconds": time.time() - started, "online": "none"})


def _rotate_residual(model, acts, attn_in, ffn_in, setting, gen, progress) -> dict:
    """Stage 1 on the pooled residual-stream inputs, stage 2's tuned reflection, folded in."""
    n = len(attn_in)
    with progress.step("ruquant: residual rotation (stage 1)"):
        per_site = max(1, POOLED_TOKENS // (2 * n))  # the same number of tokens from every block's two sites
        pooled = torch.cat([acts[p][:per_site] for p in attn_in + ffn_in])
        base = base_transform(pooled, site_block(pooled.shape[1], RESIDUAL_BLOCK), gen)
        w0 = initial_reflection(pooled.double() @ base, gen)
    with progress.step("ruquant: tune the global Householder (stage 2)"):
        sites, family = [], adapter_of(model)
        for i, layer in enumerate(family.layers(model)):
            for path, g in zip((attn_in[i], ffn_in[i]), family.residual_groups):
                w = torch.cat([t.detach() for t in weights(family, layer, g)]).double() @ base
                sites.append(((acts[path][:TUNE_TOKENS].double() @ base).float(), w.float()))
        tuned, losses = tune_reflection(w0, sites, setting)
    rotate_residual(model, base @ householder(tuned))
    return {"stage2_loss_start": losses[0], "stage2_loss_best": min(losses), "stage2_steps": len(losses) - 1,
            "tuned_for": setting.label}

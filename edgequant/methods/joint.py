"""Joint structural pruning + mixed precision (``--method joint``), chosen by the error at the
model's output.

Each block becomes one *option*: removed, or kept with an FFN width (a multiple of 256, so that
``ffn_down``'s rows still take K-quants), a number of KV groups (each with the query heads that
read it), and a ggml type for its attention part and one for its MLP part (QuBLAST's candidates).
The embedding is one more item, with its type options. The search picks one option per item so
that the KL divergence of the model's output from the full-precision model on calibration text
is least, within the planner's bytes (multiple-choice knapsack, :func:`edgequant.planning.knapsack`).

1. **Estimate** every change of every block cheaply, in KL units: a Fisher estimate
   ``KL ~ 1/2 sum F (dy)^2 / T`` of the change ``dy`` it makes to the block's output, with ``F``
   the diagonal Fisher information of the output distribution at that block's output
   (squared gradients of the log-likelihood of labels sampled from the model itself, one
   backward pass). Which FFN channels and KV groups go is decided by a Taylor-style score,
   ``E[z_j^2] ||W[:, j]||^2`` at the output projection's inputs z (the output energy each
   carries), and the projection is refitted by least squares (:mod:`edgequant.pruning`). The
   types' costs are not estimated but measured: QuBLAST's sensitivity table (each part rounded
   alone, KL at the output; :mod:`edgequant.sensitivity`), scaled by the share of the part's
   weights a pruned shape keeps. A kept block's estimate is the sum of its changes' costs, so
   where pruning does not pay the search starts from QuBLAST's own allocation.
2. **Walk** the blocks in order. The blocks before b are committed (pruned, refitted and rounded
   with RTN on the importance grid to their picks), so their errors are in b's inputs. The
   knapsack over b, the later blocks and the embedding, with the bytes left, points at one of b's
   options; that option and its neighbours in size are built and *measured*: the model's output
   KL with b's prefix committed, run to the end, minus that with b left as it is. The knapsack
   then picks among the measured ones, and b is committed. How far the pruning estimates were
   off so far (a pruned option's measured KL less its types' cost, over its estimate) rescales
   the later blocks' pruning estimates.

The embedding's options come from the same table. The build then
prunes with the full calibration text, plans the types picked here, and runs QuBLAST's scaling
maps and GPTQ (see :mod:`.qublast`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from itertools import product

import numpy as np
import torch

from ..calibration import Calibration, block_input_grams
from ..errors import EdgequantError
from ..ggml_quants import get_type
from ..adapters import BlockShape, adapter_of
from ..models import LoadedModel, sizes_differ
from ..planning import Matrix, Speed, knapsack_curve, byte_price, knapsack
from ..progress import Progress
from ..pruning import Pruning, prune_ffn, prune_heads
from ..evaluation import Reference
from ..sensitivity import CANDIDATES, Part, Sensitivity, Tail, split_parts, stand_in
from ..smoothing import kv_grouping
from ..walker import Walk, run_block
from .qublast import measure_table

WIDTH_STEP = 256
FIT_TOKENS = 4096  # calibration tokens the search's refits and channel scores are measured on
PROBE_TOKENS = 512  # further calibration tokens every KL is measured (or estimated) on (held out of the refits)
NEIGHBOURS = 2  # options measured on each side (in size) of the one the estimates point at
FISHER_SAMPLES = 2  # label samples per window for the Fisher estimate
HEADER_MARGIN = 4096  # bytes kept back for the per-block arrays of a pruned GGUF's header
ATTENTION = ("q", "k", "v", "o")  # the roles whose type is the block's attention type; the rest take the MLP's


@dataclass(frozen=True)
class Option:
    """What one block becomes, its bytes (with its norms) and its KL (estimated or measured)."""

    removed: bool
    shape: BlockShape | None = None  # sizes kept (None when removed)
    attn: str | None = None  # candidate type of the attention part, e.g. "Q4_K" (stand-ins per matrix)
    mlp: str | None = None
    bytes: int = 0
    kl: float = 0.0
    measured: bool = False
    estimated: float = 0.0  # the share of ``kl`` that is a Fisher estimate (the pruning's), not measured
    charge: float = 0.0  # the share of a measured ``kl`` that is its kernels' slowdown, priced

    def scaled(self, ratio: float) -> float:
        """``kl`` with its estimated share multiplied by ``ratio``."""
        return self.kl + (ratio - 1.0) * self.estimated

    def label(self) -> str:
        if self.removed:
            return "removed"
        return f"ffn {self.shape.ffn}, kv {self.shape.kv_heads}, attn {self.attn}, mlp {self.mlp}"


@dataclass
class Changes:
    """The estimated KL each change of one block adds at the output (nats/token), and which
    inputs of its output projections go first."""

    ffn: dict[int, float]  # width kept -> KL
    kv: dict[int, float]  # KV groups kept -> KL
    removed: float
    attn: dict[str, float]  # candidate type -> KL of rounding the attention part to it
    mlp: dict[str, float]
    ffn_order: list[int]  # FFN channels, most important first
    kv_order: list[int]  # KV groups, most important first
    grams: dict[str, torch.Tensor]  # E[z z^T] at the inputs of o_proj ("o") and down_proj ("down"), for refits


@dataclass
class Choice:
    """The search's answer: what to prune, and the types of what is left."""

    pruning: Pruning
    options: dict[int, Option]  # original block -> its option
    embd: dict[str, str]  # types of the matrices outside the blocks
    details: dict = field(default_factory=dict)

    def types(self, matrices: list[Matrix]) -> dict[str, str]:
        """Each matrix's type in the pruned model (whose blocks are renumbered past removed ones)."""
        kept = [b for b in sorted(self.options) if not self.options[b].removed]
        out = {}
        for m in matrices:
            fields = m.name.split(".")
            if fields[0] != "blk":
                out[m.name] = self.embd[m.name]
                continue
            option = self.options[kept[int(fields[1])]]
            out[m.name] = stand_in(option.attn if fields[2].startswith("attn") else option.mlp, m.cols)
        return out


@torch.no_grad()
def search(loaded: LoadedModel, matrices: list[Matrix], other_params: int, max_bytes: int,
           calibration: Calibration, progress: Progress, speed: Speed = Speed()) -> Choice:
    """The pruning and types of least output KL within ``max_bytes`` of tensors, the types'
    kernel slowdown priced in as QuBLAST prices it (``speed``; the decode floor is not searched)."""
    started = time.time()
    model = loaded.model
    if not loaded.adapter.per_block_sizes_arch:
        raise EdgequantError(f"--method joint prunes llama-family models only, not {loaded.adapter.model_type}")
    if sizes_differ(model):
        raise EdgequantError("--method joint starts from an unpruned model; this one is pruned already")
    budget = max_bytes - HEADER_MARGIN
    parts = split_parts(matrices)
    embd = next(p for p in parts if p.block < 0)
    space = _Space(loaded, parts)
    fixed = 4 * other_params - space.norm_bytes * space.n  # the final norm
    kept_block = min(o.bytes for b in range(space.n) for o in space.options(b) if not o.removed)
    smallest = kept_block + embd.nbytes(embd.options()[0]) + fixed  # one block is all pruning may leave
    if smallest > budget:
        raise EdgequantError(f"the budget of {max_bytes / 1e6:.1f} MB of tensors is below what pruning can reach, "
                             f"{smallest / 1e6:.1f} MB")
    ctx = calibration.windows.shape[1]
    table = measure_table(loaded, parts, calibration, progress)
    price = _byte_price(parts, table, speed, budget - 4 * other_params)
    costs = _type_costs(parts, table, speed, price)
    embd_kl = [e.kl for e in table.by_part()[embd.key]]  # in embd.options() order
    embd_options = [(e.bytes, e.kl + price * speed.slowdown(e.types, embd.sizes(e.types)))
                    for e in table.by_part()[embd.key]]
    windows = calibration.windows[: max(1, (FIT_TOKENS + PROBE_TOKENS) // ctx)]
    n_probe = max(1, min(PROBE_TOKENS // ctx, len(windows) // 2))
    probe = _Probe(loaded, windows[len(windows) - n_probe:], disjoint=len(windows) > 1)
    with progress.step("joint search: estimate every change", space.n) as tick:
        first = [probe.estimate(s.index, s.block, s.inputs, s.kwargs, costs[s.index]) for s in Walk(loaded, windows, tick)]

    picked: dict[int, Option] = {}
    kept: dict[int, tuple[list[int] | None, list[int] | None]] = {}
    scale = _Ratio()
    used = fixed
    with progress.step("joint search: walk the blocks", space.n) as tick:
        walk = Walk(loaded, windows, tick)
        for stop in walk:  # each block on what the blocks before it, as chosen, hand over
            b, layer, states, kwargs = stop.index, stop.block, stop.inputs, stop.kwargs
            now = probe.estimate(b, layer, states, kwargs, costs[b])
            none_kept = all(o.removed for o in picked.values())  # then the last block stays, and is planned so
            later = [[(o.bytes, o.scaled(scale.value)) for o in space.options(c, first[c], none_kept and c + 1 == space.n)]
                     for c in range(b + 1, space.n)]
            mine = space.options(b, now, none_kept and b + 1 == space.n)
            at = _solve([[(o.bytes, o.scaled(scale.value)) for o in mine], *later, embd_options], budget - used)[0]
            base = probe.kl(stop.run(inputs=probe.of(states)), b + 1, walk.kwargs)
            built, measured = [], []
            for o in dict.fromkeys([mine[0], *mine[max(0, at - NEIGHBOURS): at + NEIGHBOURS + 1]]):
                variant, keep = _realise(loaded, b, layer, o, now, calibration.importance)
                out = stop.run(variant, probe.of(states)) if variant else probe.of(states)
                charge = price * space.slowdown(b, o, speed)  # the types' kernels, priced as in the estimates
                measured.append(replace(o, kl=max(0.0, probe.kl(out, b + 1, walk.kwargs) - base) + charge, measured=True,
                                        estimated=0.0, charge=charge))
                built.append((variant, keep))
                if o.estimated > 0:  # what the pruning cost beyond its types' measured cost, against its estimate
                    scale.add(measured[-1].kl - (o.kl - o.estimated), o.estimated)
            chosen = _solve([[(o.bytes, o.kl) for o in measured], *later, embd_options], budget - used)
            picked[b], (variant, kept[b]) = measured[chosen[0]], built[chosen[0]]
            used += picked[b].bytes
            stop.outputs = states if variant is None else stop.run(variant)  # a removed block passes its inputs on
    embd_types = embd.options()[chosen[-1]]
    pruning = Pruning(ffn={b: f for b, (_, f) in kept.items() if f is not None},
                      kv_groups={b: g for b, (g, _) in kept.items() if g is not None},
                      removed=tuple(b for b, o in picked.items() if o.removed))
    details = {
        "seconds": time.time() - started,
        "measurements": probe.runs,
        "probe_tokens": int(probe.tokens),
        "fit_tokens": int(sum(w.size for w in probe.fit(list(windows)))),
        "measured_kl": sum(o.kl - o.charge for o in picked.values()) + embd_kl[chosen[-1]],
        "byte_price": price,
        "estimate_scale": scale.value,
        "planned_bytes": used + embd_options[chosen[-1]][0],
        "blocks": [{"index": b, "option": o.label(), "bytes": o.bytes, "kl": o.kl - o.charge} for b, o in picked.items()],
        "embedding": Part.label(embd_types),
    }
    return Choice(pruning, picked, embd_types, details)


def _type_costs(parts: list[Part], table: Sensitivity, speed: Speed = Speed(), price: float = 0.0
                ) -> dict[int, dict[str, dict[str, float]]]:
    """Block -> part kind ("attn" / "ffn") -> candidate type -> the table's KL of that part at it,
    plus its kernels' slowdown bytes at ``price`` a byte."""
    entries = table.by_part()
    out: dict[int, dict[str, dict[str, float]]] = {}
    for p in parts:
        if p.block < 0:
            continue
        kl = {tuple(e.types.values()): e.kl for e in entries[p.key]}
        out.setdefault(p.block, {})[p.kind] = {
            c: kl[tuple(p.types_for(c).values())] + price * speed.slowdown(p.types_for(c), p.sizes(p.types_for(c)))
            for c in _distinct_candidates(p)}
    return out


def _byte_price(parts: list[Part], table: Sensitivity, speed: Speed, budget: int) -> float:
    """The KL a byte buys at the budget's margin in the unpruned parts' knapsack (at the smallest
    unpruned mix, 2% up, when the budget is below it): the price of a slowdown byte."""
    entries = table.by_part()
    options = [[(e.bytes, e.kl) for e in entries[p.key]] for p in parts]
    if not any(speed.slowdown(e.types, p.sizes(e.types)) for p in parts for e in entries[p.key]):
        return 0.0
    smallest = sum(min(o[0] for o in opts) for opts in options)
    _, best, unit = knapsack_curve(options, max(budget, int(smallest * 1.02)))
    return byte_price(best, unit)


def _solve(items: list[list[tuple[int, float]]], budget: int) -> list[int]:
    chosen = knapsack(items, budget)
    if chosen is None:
        raise EdgequantError(f"joint search: nothing fits the {budget / 1e6:.2f} MB left")
    return chosen


def widths(full: int) -> list[int]:
    """FFN widths a block can keep: all, or a multiple of 256 below it."""
    return [full, *range((full - 1) // WIDTH_STEP * WIDTH_STEP, 0, -WIDTH_STEP)]


class _Space:
    """Every option of every block: its exact bytes, and its estimated KL from its changes'."""

    def __init__(self, loaded: LoadedModel, parts: list[Part]):
        config = loaded.config
        self.full = BlockShape.of_config(config)
        self.per_group, self.dim = kv_grouping(config)
        self.matrices: dict[int, list[Matrix]] = {}
        for p in parts:
            if p.block >= 0:
                self.matrices.setdefault(p.block, []).extend(p.matrices)
        self.n = len(self.matrices)
        self.norm_bytes = 4 * sum(t.numel() for t in loaded.adapter.layers(loaded.model)[0].parameters() if t.ndim == 1)

    def options(self, b: int, changes: Changes | None = None, keep: bool = False) -> list[Option]:
        """Block ``b``'s options that no smaller one matches, smallest first (without
        ``changes``: every shape at its smallest types, for sizes only); ``keep``: not removed."""
        removal = changes.removed if changes else 0.0
        options = [] if keep else [Option(True, kl=removal, estimated=removal)]
        full_attn, full_mlp = self._parts(b, self.full)
        for width, kv in product(widths(self.full.ffn), range(self.full.kv_heads, 0, -1)):
            shape = BlockShape(width, kv * self.per_group, kv)
            attn, mlp = self._parts(b, shape)
            if changes is None:
                size = attn.nbytes(attn.types_for(CANDIDATES[0])) + mlp.nbytes(mlp.types_for(CANDIDATES[0]))
                options.append(Option(False, shape, CANDIDATES[0], CANDIDATES[0], size + self.norm_bytes))
                continue
            for a, m in product(changes.attn, changes.mlp):
                pruned = changes.ffn[width] + changes.kv[kv]
                kl = pruned + changes.attn[a] * attn.params / full_attn.params + changes.mlp[m] * mlp.params / full_mlp.params
                size = attn.nbytes(attn.types_for(a)) + mlp.nbytes(mlp.types_for(m)) + self.norm_bytes
                options.append(Option(False, shape, a, m, size, kl, estimated=pruned))
        return _pareto(options) if changes else options

    def slowdown(self, b: int, option: Option, speed: Speed) -> float:
        """Slowdown bytes of block ``b`` made into ``option`` (:class:`edgequant.planning.Speed`)."""
        if option.removed:
            return 0.0
        attn, mlp = self._parts(b, option.shape)
        return sum(speed.slowdown(p.types_for(t), p.sizes(p.types_for(t))) for p, t in ((attn, option.attn), (mlp, option.mlp)))

    def _parts(self, b: int, s: BlockShape) -> tuple[Part, Part]:
        """Block ``b``'s attention and MLP parts at sizes ``s``."""
        d = self.dim
        sized = {"attn_q": lambda m: (s.heads * d, m.cols), "attn_k": lambda m: (s.kv_heads * d, m.cols),
                 "attn_v": lambda m: (s.kv_heads * d, m.cols), "attn_output": lambda m: (m.rows, s.heads * d),
                 "ffn_gate": lambda m: (s.ffn, m.cols), "ffn_up": lambda m: (s.ffn, m.cols),
                 "ffn_down": lambda m: (m.rows, s.ffn)}
        ms = [Matrix(m.name, *sized[m.role](m)) for m in self.matrices[b]]
        return (Part(b, "attn", tuple(m for m in ms if m.role.startswith("attn"))),
                Part(b, "ffn", tuple(m for m in ms if m.role.startswith("ffn"))))


def _pareto(options: list[Option]) -> list[Option]:
    """Smallest first, keeping an option only when its KL is below every smaller one's."""
    kept, best = [], np.inf
    for o in sorted(options, key=lambda o: (o.bytes, o.kl)):
        if o.kl < best or not kept:
            kept.append(o)
            best = o.kl
    return kept


class _Ratio:
    """How far the Fisher estimates of pruning are off: summed over every pruned option measured
    so far, its measured KL less its types' (measured) cost, over its estimate (1 before any)."""

    def __init__(self):
        self.measured = self.estimated = 0.0

    def add(self, measured: float, estimated: float) -> None:
        self.measured += measured
        self.estimated += estimated

    @property
    def value(self) -> float:
        if self.measured <= 0 or self.estimated <= 0:
            return 1.0
        return float(np.clip(self.measured / self.estimated, 0.1, 10.0))


class _Probe:
    """KL at the model's output on a few calibration windows: measured by running the rest of
    the model from cached states, or estimated with the Fisher information at a block's output."""

    def __init__(self, loaded: LoadedModel, windows: np.ndarray, disjoint: bool):
        """``windows`` are the last of the search's windows; ``disjoint``: the others are the fit
        windows (else, with a single window, it is both)."""
        self.loaded, self.disjoint = loaded, disjoint
        self.tokens, self.n = windows.size, len(windows)
        model = loaded.model
        ids = torch.from_numpy(windows)
        self.ref = [Reference.of_logits(model(t[None], use_cache=False).logits[0]) for t in ids]
        self.fisher = _fisher(model, ids)
        self.runs = 0

    def of(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The probe windows' states among all the search's."""
        return states[len(states) - self.n:]

    def fit(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The states the refits and channel scores are measured on."""
        return states[: len(states) - self.n] if self.disjoint else states

    def kl(self, hidden: list[torch.Tensor], start: int, kwargs: list[dict]) -> float:
        """Measured: the output KL when blocks ``start``.. run on ``hidden``."""
        self.runs += 1
        tail = Tail(self.loaded.model, kwargs)
        return float(np.mean([r.mean_kl(tail.logits(h, start)) for r, h in zip(self.ref, hidden)]))

    def estimate(self, b: int, layer, states: list[torch.Tensor], kwargs: dict,
                 types: dict[str, dict[str, float]]) -> Changes:
        """Estimated: what each pruning of block ``b`` (``layer``, on inputs ``states``) adds;
        ``types``: the measured costs of its parts' types (see :func:`_type_costs`)."""
        config = self.loaded.config
        inputs = self.of(states)
        outputs = [run_block(layer, x, kwargs) for x in inputs]

        def cost(variant) -> float:
            new = inputs if variant is None else [run_block(variant, x, kwargs) for x in inputs]
            return float(sum(0.5 * (f * (y - z)[0] ** 2).sum() for f, y, z in zip(self.fisher[b], new, outputs))
                         / self.tokens)

        family = self.loaded.adapter
        o, down = family.module(layer, "o"), family.module(layer, "down")
        grams = block_input_grams(layer, self.fit(states), kwargs, {"o": o, "down": down})
        ffn_order = _order(grams["down"], down.weight)
        per_group, dim = kv_grouping(config)
        group_scores = _scores(grams["o"], o.weight).reshape(-1, per_group * dim).sum(1)
        kv_order = torch.argsort(group_scores, descending=True).tolist()
        shape = family.block_shape(layer, config)

        def narrowed(width: int):
            variant = copy.deepcopy(layer)
            prune_ffn(family, variant, sorted(ffn_order[:width]), grams["down"])
            return variant

        def fewer_groups(kv: int):
            variant = copy.deepcopy(layer)
            prune_heads(family, variant, config, sorted(kv_order[:kv]), grams["o"])
            return variant

        return Changes(ffn={shape.ffn: 0.0} | {w: cost(narrowed(w)) for w in widths(shape.ffn)[1:]},
                       kv={shape.kv_heads: 0.0} | {g: cost(fewer_groups(g)) for g in range(shape.kv_heads - 1, 0, -1)},
                       removed=cost(None), attn=types["attn"], mlp=types["ffn"],
                       ffn_order=ffn_order, kv_order=kv_order, grams=grams)


def _fisher(model, ids: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per block and window, the diagonal Fisher information of the output distribution with
    respect to the block's output, (tokens, hidden): mean squared gradient of the log-likelihood
    of labels sampled from the model's own next-token distribution."""
    gen = torch.Generator().manual_seed(0)
    layers = adapter_of(model).layers(model)
    per_block: list[list[torch.Tensor]] = [[] for _ in layers]
    for window in ids:
        outputs = []
        hooks = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
                 for layer in layers]
        try:
            with torch.enable_grad():
                logp = torch.log_softmax(model(window[None], use_cache=False).logits[0].float(), -1)
                squares = [torch.zeros(o.shape[1:]) for o in outputs]
                for s in range(FISHER_SAMPLES):
                    labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                    grads = torch.autograd.grad(logp.gather(1, labels).sum(), outputs, retain_graph=s + 1 < FISHER_SAMPLES)
                    for sq, g in zip(squares, grads):
                        sq += g[0] ** 2 / FISHER_SAMPLES
        finally:
            for h in hooks:
                h.remove()
        for block, sq in zip(per_block, squares):
            block.append(sq)
    return per_block


def _distinct_candidates(part: Part) -> list[str]:
    """One candidate type name per distinct assignment of the part's matrices."""
    seen = {}
    for candidate in CANDIDATES:
        seen.setdefault(tuple(part.types_for(candidate).values()), candidate)
    return list(seen.values())


def _scores(gram: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Output energy each input column carries: E[z_j^2] ||W[:, j]||^2."""
    return gram.diagonal().float() * (w.float() ** 2).sum(0)


def _order(gram: torch.Tensor, w: torch.Tensor) -> list[int]:
    return torch.argsort(_scores(gram, w), descending=True).tolist()


def _round(family, layer, types: dict[str, str], importance: dict[str, np.ndarray | None]) -> None:
    """Round the layer's matrices at ``types`` (by role) in place, RTN on the importance grid."""
    for role, t in types.items():
        lin = family.module(layer, role)
        q = get_type(t).dequantized(lin.weight.detach().numpy(), importance.get(role))
        lin.weight.data = torch.from_numpy(q)


def _realise(loaded: LoadedModel, b: int, layer, option: Option, changes: Changes,
             importance: dict[str, np.ndarray]):
    """(block ``layer`` made into ``option``: a pruned, refitted and rounded copy, or None when
    removed; (KV groups, FFN channels) kept, None where all are)."""
    if option.removed:
        return None, (None, None)
    config, family = loaded.config, loaded.adapter
    per_group, dim = kv_grouping(config)
    full = family.block_shape(layer, config)
    groups = sorted(changes.kv_order[: option.shape.kv_heads]) if option.shape.kv_heads < full.kv_heads else None
    channels = sorted(changes.ffn_order[: option.shape.ffn]) if option.shape.ffn < full.ffn else None
    variant = copy.deepcopy(layer)  # refitted on the moments of the block as it is (the build refits exactly)
    if groups is not None:
        prune_heads(family, variant, config, groups, changes.grams["o"])
    if channels is not None:
        prune_ffn(family, variant, channels, changes.grams["down"])
    columns = {"o": _query_columns(groups, per_group, dim), "down": channels}
    types, weights = {}, {}
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        types[role] = stand_in(option.attn if role in ATTENTION else option.mlp, family.module(variant, role).in_features)
        imp, kept = importance.get(loaded.gguf_name(family.weight_name(b, role))), columns.get(role)
        weights[role] = imp[kept] if imp is not None and kept is not None else imp
    _round(family, variant, types, weights)
    return variant, (groups, channels)


def _query_columns(groups: list[int] | None, per_group: int, dim: int) -> list[int] | None:
    """o_proj's input columns that belong to the query heads of KV ``groups``."""
    if groups is None:
        return None
    return [g * per_group * dim + i for g in groups for i in range(per_group * dim)]

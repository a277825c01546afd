"""Which ggml type each weight matrix gets: uniform, or mixed to hit a bits-per-weight target.

K-quants pack 256 weights per block, so they only fit matrices whose rows are a multiple of
256; elsewhere a 32-block type stands in (``FALLBACK``). For Q4_K, Q5_K and Q6_K it is the one
llama.cpp's quantizer picks (Q5_0, Q5_1, Q8_0). For Q2_K and Q3_K llama.cpp (0.3.36,
``tensor_type_fallback``) picks Q4_0; we pick IQ4_NL instead: the same 4.5 bits per weight, and
its non-linear codebook fits the bell-shaped weights better (on the default model's 576-wide
matrices, 0.63x Q4_0's importance-weighted squared error; ``tests/test_ggml_quants.py`` checks it).
The i-quants (IQ4_XS, IQ3_S ... IQ1_S) need rows of 256 too and fall back to IQ4_NL, as in llama.cpp.

The greedy mix here is the prior used by ``--method rtn/gptq`` (QuBLAST measures instead, see
:mod:`edgequant.sensitivity` and :func:`knapsack`): every matrix starts on its cheapest rung, then the upgrade with the largest expected error
reduction per extra bit is taken, again and again, while the budget allows. Expected error
of a matrix at b bits is taken as ``priority * params * 4**-b``; attention values, the FFN
down projection and the (tied) embedding/output matrix get higher priority, as in llama.cpp's
mixes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from .errors import EdgequantError
from . import ort_quants
from .ggml_quants import TYPES, get_type
from .kernels import UNMEASURED, KernelCosts

FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            **dict.fromkeys(("IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"), "IQ4_NL"),
            **ort_quants.FALLBACK}  # ONNX Runtime's blocks: the next smaller one
LADDER = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K",
          "IQ4_NL", "Q4_0", "Q5_K", "Q5_0", "Q6_K", "Q8_0"]  # of equal size, the first is tried first
# The embedding / output matrix takes no 256-block i-quant. The output matmul (output.weight, or a
# tied embedding) reads the whole matrix for every token, and these types decode 1.6x (IQ4_XS) to
# 6.8x (IQ1_S) slower per byte than the fastest on the measured host (device_profiles/kernels/);
# llama.cpp's own i-quant mixes give it Q5_K or more. An untied token_embd, only looked up, gets
# Q2_K or IQ3_S there; Q3_K, of IQ3_S's size, stands in for the latter.
NOT_FOR_EMBEDDING = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")
PRIORITY = {"attn_v": 2.0, "ffn_down": 2.0, "token_embd": 2.0, "output": 2.0, "attn_k": 0.5}


@dataclass(frozen=True)
class Matrix:
    name: str  # GGUF name
    rows: int
    cols: int

    @property
    def params(self) -> int:
        return self.rows * self.cols

    @property
    def role(self) -> str:
        return self.name.split(".")[-2]


@dataclass
class Plan:
    """One ggml type per matrix; other tensors (norms) are stored as float32."""

    types: dict[str, str]
    matrices: list[Matrix]
    other_params: int
    rule: str
    pricing: dict | None = None  # how the allocation priced the kernels' slowdown (QuBLAST)

    def matrix_bytes(self, m: Matrix) -> int:
        return get_type(self.types[m.name]).tensor_bytes(m.rows, m.cols)

    @property
    def total_bytes(self) -> int:
        return sum(self.matrix_bytes(m) for m in self.matrices) + 4 * self.other_params

    @property
    def total_params(self) -> int:
        return sum(m.params for m in self.matrices) + self.other_params

    @property
    def bpw(self) -> float:
        return self.total_bytes * 8 / self.total_params

    def as_dict(self) -> dict:
        return {
            "rule": self.rule,
            "pricing": self.pricing,
            "bytes": self.total_bytes,
            "bpw": self.bpw,
            "tensors": [
                {**asdict(m), "ggml_type": self.types[m.name], "bpw": get_type(self.types[m.name]).bpw}
                for m in self.matrices
            ],
        }


def fitting_type(name: str, cols: int) -> str:
    """``name`` if its blocks fit rows of ``cols`` weights, else its 32-block stand-in (``FALLBACK``)."""
    t = get_type(name).name
    while not get_type(t).fits(cols):
        if t not in FALLBACK:
            raise EdgequantError(f"no ggml type in the {name} family fits rows of {cols} weights")
        t = FALLBACK[t]
    return t


def _ladder(m: Matrix, ladder: list[str] | tuple[str, ...] = LADDER) -> list[str]:
    """The types of ``ladder`` that fit ``m``'s rows, smallest first (``ladder``'s order among equal sizes)."""
    # ONNX Runtime's configurations fall back to a smaller block (MNB8_B128 is MNB8_B64 on 576-wide rows), as
    # the ONNX plan's parts do; ggml's ladder lists its stand-ins itself (and leaves the affine ones out)
    ladder = dict.fromkeys(fitting_type(t, m.cols) if ort_quants.is_ort_type(t) else t for t in ladder)
    fit = [t for t in ladder if get_type(t).fits(m.cols) and not (m.name in EMBEDDING_NAMES and t in NOT_FOR_EMBEDDING)]
    if not fit:
        raise EdgequantError(f"no type of the plan's menu fits {m.name}'s rows of {m.cols} weights")
    return sorted(fit, key=lambda t: get_type(t).bpw)


def smallest_plan(matrices: list[Matrix], other_params: int, ladder: list[str] | tuple[str, ...] = LADDER) -> Plan:
    """The smallest mix: every matrix on its cheapest rung."""
    return Plan({m.name: _ladder(m, ladder)[0] for m in matrices}, matrices, other_params, "smallest")


def smallest_bytes(matrices: list[Matrix], other_params: int, ladder: list[str] | tuple[str, ...] = LADDER) -> int:
    return smallest_plan(matrices, other_params, ladder).total_bytes


def check_type_name(ggml_type: str) -> None:
    """A one-line error for a type name we cannot write."""
    if ggml_type.upper() not in TYPES and ggml_type.upper() not in ort_quants.TYPES:
        raise EdgequantError(f"unknown ggml type {ggml_type!r}; known: {', '.join(TYPES)} "
                             f"(and ONNX Runtime's {ort_quants.PREFIX}{{4,8}}_B{{16..256}}_{{SYM,ZP}} for --formats onnx)")


def uniform(matrices: list[Matrix], other_params: int, ggml_type: str) -> Plan:
    check_type_name(ggml_type)
    types = {m.name: fitting_type(ggml_type, m.cols) for m in matrices}
    return Plan(types, matrices, other_params, f"uniform {ggml_type.upper()}")


@dataclass(frozen=True)
class StockSpeed:
    """What llama.cpp's own file of the build's size costs the kernels, in :class:`Speed`'s
    measures over its matrices: the decode floor and the prefill ceiling a plan is held to."""

    label: str  # "llama.cpp Q3_K_M + imatrix"
    decode_bytes: float  # bandwidth-equivalent bytes its matrices cost a decoded token
    prefill_work: float  # its matrices' weights times their prefill factors

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Speed:
    """What the types cost the kernels (:mod:`edgequant.kernels`), and the decode floor.

    A type that decodes slower than its bytes costs ``bytes * (factor - 1)`` more bandwidth per
    token; one that prefills slower than the fastest costs ``weights * (factor - 1)`` more prefill
    work, worth ``prefill_weight_bytes`` decode bytes a weight (set by the device, for a turn of as
    many prompt tokens as decoded ones: :func:`edgequant.budget.prefill_weight_bytes`). Together
    they are the *slowdown bytes*. The allocators price them like bytes (a plan 2% smaller but 15%
    slower is no bargain) and, under ``--min-tok-s``, keep the bandwidth-equivalent bytes a decoded
    token reads (all tensors) within ``max_decode_bytes``.

    The embedding/output matrix has no prefill excess: prefill looks up rows of the embedding and
    computes the output only for the last prompt token. An untied embedding (``unread``) is not
    read when decoding either."""

    costs: KernelCosts = UNMEASURED
    unread: tuple[str, ...] = ()  # matrices a decoded token does not read (an untied input embedding)
    max_decode_bytes: float | None = None  # of all tensors: matrices at their factors, float32 ones at face value
    prefill_weight_bytes: float = 0.0  # decode bytes that one weight's prefill work on a token is worth
    stock: StockSpeed | None = None  # llama.cpp's own file at this size: held to its speed instead of pricing

    def slowdown(self, types: dict[str, str], nbytes: dict[str, int]) -> float:
        """Slowdown bytes of matrices ``nbytes`` (name -> bytes) at ``types``."""
        decode = sum(n * (self.costs.decode_factor(types[k]) - 1) for k, n in nbytes.items() if k not in self.unread)
        prefill = sum(_weights(types[k], n) * (self.costs.prefill_factor(types[k]) - 1)
                      for k, n in nbytes.items() if k not in EMBEDDING_NAMES)
        return decode + self.prefill_weight_bytes * prefill

    def prefill_work(self, types: dict[str, str], nbytes: dict[str, int]) -> float:
        """Prefill work per token of matrices ``nbytes`` at ``types``: weights times their prefill
        factor (the embedding/output left out, as in :meth:`slowdown`)."""
        return sum(_weights(types[k], n) * self.costs.prefill_factor(types[k])
                   for k, n in nbytes.items() if k not in EMBEDDING_NAMES)

    def of_stock(self, tensors: dict[str, tuple[str, int]], label: str) -> StockSpeed:
        """The speed of llama.cpp's file of ``tensors`` (name -> (type, bytes), its matrices), ``label``."""
        types, nbytes = {k: t for k, (t, _) in tensors.items()}, {k: n for k, (_, n) in tensors.items()}
        return StockSpeed(label, self.decode(types, nbytes), self.prefill_work(types, nbytes))

    def decode(self, types: dict[str, str], nbytes: dict[str, int]) -> float:
        """Bandwidth-equivalent bytes per token of matrices ``nbytes`` at ``types``."""
        return sum(n * self.costs.decode_factor(types[k]) for k, n in nbytes.items() if k not in self.unread)

    def plan_decode_bytes(self, plan: Plan) -> float:
        """Bandwidth-equivalent bytes a token decoded with ``plan`` reads (float32 tensors at face value)."""
        return self.decode(plan.types, {m.name: plan.matrix_bytes(m) for m in plan.matrices}) + 4 * plan.other_params

    def plan_prefill_factor(self, plan: Plan) -> float:
        """The mean prefill cost of ``plan``'s weights, over the fastest type's (the embedding/output at 1)."""
        work = sum(m.params * (1 if m.name in EMBEDDING_NAMES else self.costs.prefill_factor(plan.types[m.name]))
                   for m in plan.matrices)
        return (work + plan.other_params) / plan.total_params

    def check(self, decode_bytes: float, what: str) -> None:
        if self.max_decode_bytes is not None and decode_bytes > self.max_decode_bytes:
            raise EdgequantError(f"--min-tok-s cannot be met: {what} reads {decode_bytes / 1e6:.1f} MB per token "
                                 f"(bandwidth-equivalent), {self.max_decode_bytes / 1e6:.1f} MB allowed")


def _weights(ggml_type: str, nbytes: int) -> int:
    t = get_type(ggml_type)
    return nbytes // t.nbytes * t.block


@dataclass
class _Rungs:
    """One matrix's ladder for the greedy mix: per rung its type, bytes, decode bytes, slowdown
    bytes and expected error (``priority * params * 4**-bpw``)."""

    types: list[str]
    nbytes: np.ndarray
    decode: np.ndarray
    slowdown: np.ndarray
    error: np.ndarray

    @classmethod
    def of(cls, item: tuple[Matrix, ...], speed: Speed, ladder=LADDER) -> _Rungs:
        """The ladder of one matrix, or of matrices stored as one tensor (rows of one width) moving together."""
        types = _ladder(item[0], ladder)
        sizes = [{m.name: get_type(t).tensor_bytes(m.rows, m.cols) for m in item} for t in types]
        return cls(types, np.array([sum(n.values()) for n in sizes], float),
                   np.array([speed.decode(dict.fromkeys(n, t), n) for t, n in zip(types, sizes)]),
                   np.array([speed.slowdown(dict.fromkeys(n, t), n) for t, n in zip(types, sizes)]),
                   sum(PRIORITY.get(m.role, 1.0) * m.params for m in item) * 4.0 ** -np.array([get_type(t).bpw for t in types]))

    def best_step(self, i: int, room: float, decode_room: float) -> tuple[float, int]:
        """(error drop per byte of cost, rung) of the best move up from rung ``i`` that fits ``room``
        bytes and ``decode_room`` decode bytes; cost = extra bytes + extra slowdown bytes, a move
        that costs nothing being worth any other. (0, -1) when none fits or gains."""
        extra, more_decode = self.nbytes[i + 1:] - self.nbytes[i], self.decode[i + 1:] - self.decode[i]
        gain = self.error[i] - self.error[i + 1:]
        cost = extra + self.slowdown[i + 1:] - self.slowdown[i]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(cost > 0, gain / cost, np.where(gain >= 0, np.inf, -np.inf))
        ratio[(extra > room) | (more_decode > decode_room) | ((gain <= 0) & (cost >= 0))] = -np.inf
        if not len(ratio) or ratio.max() <= 0:
            return 0.0, -1
        j = int(ratio.argmax())
        return float(ratio[j]), i + 1 + j


def for_budget(matrices: list[Matrix], other_params: int, max_bytes: int, rule: str, speed: Speed = Speed(),
               ties: list[tuple[str, ...]] = (), ladder: list[str] | tuple[str, ...] = LADDER) -> Plan:
    """The greedy mix of at most ``max_bytes`` (all tensors counted): again and again the move up
    a matrix's ladder (to any larger rung) with the largest expected error drop per byte of cost,
    its extra bytes plus its extra slowdown bytes, within the bytes and the decode floor. The
    matrices of each of ``ties`` (GGUF names of parts the file stores as one tensor) move together.
    ``ladder``: the types to choose from (ONNX Runtime's configurations for an ONNX plan)."""
    by_name = {m.name: m for m in matrices}
    tied = {name: tie for tie in ties for name in tie}
    items = list(dict.fromkeys(tuple(by_name[n] for n in tied.get(m.name, (m.name,))) for m in matrices))
    rungs = {item: _Rungs.of(item, speed, ladder) for item in items}
    level = dict.fromkeys(items, 0)
    plan = Plan({m.name: rungs[item].types[0] for item in items for m in item}, matrices, other_params, rule)
    used = plan.total_bytes
    if used > max_bytes:
        raise EdgequantError(f"{rule} cannot be met: the smallest mix is {plan.bpw:.3f} bpw ({used / 1e6:.1f} MB)")
    decoded = speed.plan_decode_bytes(plan)
    speed.check(decoded, "the smallest mix")
    floor = np.inf if speed.max_decode_bytes is None else speed.max_decode_bytes
    while True:
        steps = {item: r.best_step(level[item], max_bytes - used, floor - decoded) for item, r in rungs.items()}
        item = max(steps, key=lambda k: steps[k][0])
        ratio, j = steps[item]
        if j < 0:
            return plan
        r, i = rungs[item], level[item]
        used += r.nbytes[j] - r.nbytes[i]
        decoded += r.decode[j] - r.decode[i]
        level[item] = j
        plan.types |= dict.fromkeys((m.name for m in item), r.types[j])


def knapsack(options: list[list[tuple[int, float]]], budget: int, resolution: int = 1 << 16) -> list[int] | None:
    """Multiple-choice knapsack: pick one (bytes, cost) option per item, minimising the summed
    cost with the summed bytes <= ``budget``. Exact dynamic programme over byte counts in units
    of ``budget / resolution`` (sizes rounded up, so the answer always fits). Returns the chosen
    option index per item, or None when even the smallest options do not fit."""
    return knapsack_curve(options, budget, resolution)[0]


def knapsack_curve(options, budget: int, resolution: int = 1 << 16) -> tuple[list[int] | None, np.ndarray, int]:
    """(:func:`knapsack`'s choice, the least summed cost within each capacity, the capacity unit in bytes)."""
    unit = max(1, -(-budget // resolution))
    cap = budget // unit
    best = np.zeros(cap + 1)  # least cost of the items so far within capacity c
    picks = []
    for opts in options:
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (size, cost) in enumerate(opts):
            w = -(-size // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + cost
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    if not np.isfinite(best[cap]):
        return None, best, unit
    chosen, c = [], cap
    for opts, pick in zip(reversed(options), reversed(picks)):
        j = int(pick[c])
        chosen.append(j)
        c -= -(-opts[j][0] // unit)
    return chosen[::-1], best, unit


MARGIN = 0.01  # share of the budget the price of a byte is read over


def byte_price(best: np.ndarray, unit: int) -> float:
    """Cost per byte at the budget's margin: what the last ``MARGIN`` of the budget saves."""
    cap = len(best) - 1
    for k in (max(1, int(cap * MARGIN)), 1):
        if np.isfinite(best[cap - k]):
            return max(0.0, float(best[cap - k] - best[cap]) / (k * unit))
    return 0.0


def knapsack_with_speed(options: list[list[tuple]], budget: int, max_decode: float | None = None,
                        stock: tuple[float, float] | None = None) -> tuple[list[int] | None, float, float]:
    """One (bytes, cost, slowdown bytes, decode bytes[, prefill work]) option per item within
    ``budget`` bytes, of least summed cost, the kernels' speed weighed in.

    Given ``stock`` = (decode bytes, prefill work) of llama.cpp's own file of this size, the choice
    is held within both (and within ``max_decode`` decode bytes): :func:`held_to`. Otherwise, or
    when no choice of this size is that fast, the slowdown bytes are charged at the price of a
    byte: the cost the budget's last bytes buy (:func:`byte_price`, from the same programme
    without the slowdown). With ``max_decode``, the decode bytes are then charged too, at the
    least extra price that brings them within. Returns (the choice or None when nothing fits, the
    price of a slowdown byte (held: of the measure that held it), the extra price of a decode byte)."""
    plain, best, unit = knapsack_curve([[o[:2] for o in opts] for opts in options], budget)
    if plain is None:
        return None, 0.0, 0.0
    byte = byte_price(best, unit)
    start = max(byte, 1e-12)  # where the searches for a least price begin
    if not any(o[2] for opts in options for o in opts):
        price, chosen = 0.0, plain
    else:
        if stock is not None:
            held = held_to(options, budget, (stock[0] if max_decode is None else min(stock[0], max_decode), stock[1]), start)
            if held is not None:
                return *held, 0.0
        price, chosen = byte, _priced(options, budget, 2, byte)
    if max_decode is None or summed(options, chosen, 3) <= max_decode:
        return chosen, price, 0.0
    solve = lru_cache(maxsize=None)(lambda q: _priced(options, budget, 2, price, q))  # the search ends on a price it tried
    extra = least_price(lambda q: summed(options, solve(q), 3) <= max_decode, start)
    return (None if extra is None else solve(extra)), price, extra or 0.0


def summed(options: list[list[tuple]], choice: list[int], k: int) -> float:
    """The ``k``-th measure of the chosen options (1 cost, 3 decode bytes, 4 prefill work...), summed over the items."""
    return sum(opts[j][k] for opts, j in zip(options, choice))


def _priced(options: list[list[tuple]], budget: int, k: int, price: float, extra: float = 0.0) -> list[int]:
    """The knapsack with each option's cost raised by ``price`` times its item ``k`` (and ``extra``
    times its decode bytes)."""
    return knapsack([[(o[0], o[1] + price * o[k] + extra * o[3]) for o in opts] for opts in options], budget)


HELD_BY = (2, 3, 4)  # what a price can be put on to hold a choice: slowdown bytes, decode bytes, prefill work


def held_to(options: list[list[tuple]], budget: int, limits: tuple[float, float],
            start: float) -> tuple[list[int], float] | None:
    """The choice of least summed cost found within ``budget`` bytes and ``limits`` = (decode bytes,
    prefill work), and the price that led to it; None when no price gets within.

    A price on the slowdown bytes, on the decode bytes or on the prefill work (each can be the one
    that gets within, when a limit is loose) is raised to the least that brings the choice within;
    :func:`improve` then spends the room that price leaves; the best of the three is taken."""
    def within(c: list[int]) -> bool:
        return all(summed(options, c, k) <= limit for k, limit in zip((3, 4), limits))

    found = []
    for k in HELD_BY:
        price = least_price(lambda q: within(_priced(options, budget, k, q)), start)
        if price is not None:
            chosen = improve(options, _priced(options, budget, k, price), (budget, *limits))
            found.append((summed(options, chosen, 1), chosen, price))
    return min(found, key=lambda f: f[0])[1:] if found else None


def improve(options: list[list[tuple]], chosen: list[int], limits: tuple[float, float, float],
            rounds: int = 10_000) -> list[int]:
    """``chosen`` (within ``limits`` of bytes, decode bytes and prefill work: the options' items 0,
    3 and 4) with its summed cost lowered by changing the options of one or two items at a time,
    the largest saving first, as long as one stays within the limits.

    A single price on the slowdown moves whole groups of alike items at once, so the least price
    that keeps a plan within the limits can leave much of them unused; this spends it."""
    values = np.array([[o[0], o[1], o[3], o[4]] for opts in options for o in opts], float)
    item = np.repeat(np.arange(len(options)), [len(opts) for opts in options])
    first = np.cumsum([0] + [len(opts) for opts in options[:-1]])
    chosen = np.array(chosen)
    other = item[:, None] != item[None, :]
    for _ in range(rounds):
        now = values[first + chosen]
        delta = values - now[item]  # each option against its item's current one
        room = np.array(limits) - now[:, [0, 2, 3]].sum(0)
        fits = other & np.all([delta[:, k, None] + delta[None, :, k] <= r for k, r in zip((0, 2, 3), room)], axis=0)
        saving = np.where(fits, -(delta[:, 1, None] + delta[None, :, 1]), 0.0)
        a, b = np.unravel_index(saving.argmax(), saving.shape)
        if saving[a, b] <= 1e-12 * max(1.0, abs(now[:, 1].sum())):
            break
        chosen[item[a]], chosen[item[b]] = a - first[item[a]], b - first[item[b]]
    return chosen.tolist()


def least_price(enough, start: float, steps: int = 30, reach: float = 1e12) -> float | None:
    """The least price ``q`` >= 0 with ``enough(q)``, by bisection after growing ``start`` fourfold
    until it holds: 0 when ``enough(0)``, None when it does not hold by ``start * reach``."""
    if enough(0.0):
        return 0.0
    low, high = 0.0, start
    while not enough(high):
        if high > start * reach:
            return None
        high *= 4
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if not enough(mid) else (low, mid)
    return high

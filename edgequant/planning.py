"""Which ggml type each weight matrix gets: uniform, or mixed to hit a bits-per-weight target.

K-quants pack 256 weights per block, so they only fit matrices whose rows are a multiple of
256; elsewhere a 32-block type stands in (``FALLBACK``). For Q4_K, Q5_K and Q6_K it is the one
llama.cpp's quantizer picks (Q5_0, Q5_1, Q8_0). For Q2_K and Q3_K llama.cpp (0.3.36,
``tensor_type_fallback``) picks Q4_0; we pick IQ4_NL instead: the same 4.5 bits per weight, and
its non-linear codebook fits the bell-shaped weights better (on the default model's 576-wide
matrices, 0.63x Q4_0's importance-weighted squared error; ``tests/test_ggml_quants.py`` checks it).
The i-quants (IQ4_XS, IQ3_S ... IQ1_S) fall back to IQ4_NL, as in llama.cpp.

The greedy mix here is the prior used by ``--method rtn/gptq`` (QuBLAST measures instead, see
:mod:`edgequant.sensitivity` and :func:`knapsack`): every matrix starts on its cheapest rung, then the upgrade with the largest expected error
reduction per extra bit is taken, again and again, while the budget allows. Expected error
of a matrix at b bits is taken as ``priority * params * 4**-b``; attention values, the FFN
down projection and the (tied) embedding/output matrix get higher priority, as in llama.cpp's
mixes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import EdgequantError
from .ggml_quants import TYPES, get_type

FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
            **dict.fromkeys(("IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"), "IQ4_NL")}
LADDER = ["Q2_K", "Q3_K", "Q4_K", "IQ4_NL", "Q5_K", "Q5_0", "Q6_K", "Q8_0"]  # first of equal size wins
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

    def matrix_bytes(self, m: Matrix) -> int:
        t = get_type(self.types[m.name])
        return m.params // t.block * t.nbytes

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


def _ladder(cols: int) -> list[str]:
    """The rungs that fit rows of ``cols`` weights, one type per size, smallest first."""
    rungs: dict[float, str] = {}
    for t in LADDER:
        if TYPES[t].fits(cols):
            rungs.setdefault(TYPES[t].bpw, t)
    return [rungs[b] for b in sorted(rungs)]


def smallest_bytes(matrices: list[Matrix], other_params: int) -> int:
    """Bytes of the smallest mix: every matrix on its cheapest rung."""
    return Plan({m.name: _ladder(m.cols)[0] for m in matrices}, matrices, other_params, "smallest").total_bytes


def check_type_name(ggml_type: str) -> None:
    """A one-line error for a type name we cannot write."""
    if ggml_type.upper() not in TYPES:
        raise EdgequantError(f"unknown ggml type {ggml_type!r}; known: {', '.join(TYPES)}")


def uniform(matrices: list[Matrix], other_params: int, ggml_type: str) -> Plan:
    check_type_name(ggml_type)
    types = {m.name: fitting_type(ggml_type, m.cols) for m in matrices}
    return Plan(types, matrices, other_params, f"uniform {ggml_type.upper()}")


def for_budget(matrices: list[Matrix], other_params: int, max_bytes: int, rule: str) -> Plan:
    """The greedy mix of at most ``max_bytes`` (all tensors counted)."""
    ladders = {m.name: _ladder(m.cols) for m in matrices}
    level = {m.name: 0 for m in matrices}
    plan = Plan({m.name: ladders[m.name][0] for m in matrices}, matrices, other_params, rule)
    budget, used = max_bytes, plan.total_bytes
    if used > budget:
        raise EdgequantError(f"{rule} cannot be met: the smallest mix is {plan.bpw:.3f} bpw ({used / 1e6:.1f} MB)")
    while True:
        best, best_gain, best_extra = None, 0.0, 0.0
        for m in matrices:
            ladder, i = ladders[m.name], level[m.name]
            if i + 1 == len(ladder):
                continue
            cur, nxt = TYPES[ladder[i]], TYPES[ladder[i + 1]]
            extra = m.params * (nxt.bpw - cur.bpw) / 8
            if used + extra > budget:
                continue
            gain = PRIORITY.get(m.role, 1.0) * m.params * (4.0**-cur.bpw - 4.0**-nxt.bpw) / extra
            if gain > best_gain:
                best, best_gain, best_extra = m, gain, extra
        if best is None:
            return plan
        used += best_extra
        level[best.name] += 1
        plan.types[best.name] = ladders[best.name][level[best.name]]


def knapsack(options: list[list[tuple[int, float]]], budget: int, resolution: int = 1 << 16) -> list[int] | None:
    """Multiple-choice knapsack: pick one (bytes, cost) option per item, minimising the summed
    cost with the summed bytes <= ``budget``. Exact dynamic programme over byte counts in units
    of ``budget / resolution`` (sizes rounded up, so the answer always fits). Returns the chosen
    option index per item, or None when even the smallest options do not fit."""
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
        return None
    chosen, c = [], cap
    for opts, pick in zip(reversed(options), reversed(picks)):
        j = int(pick[c])
        chosen.append(j)
        c -= -(-opts[j][0] // unit)
    return chosen[::-1]

"""Per-block sensitivity: what quantizing one part of the model alone costs in cross-entropy.

A *part* is the attention matrices of one block (q, k, v, o), its MLP matrices (gate, up,
down), or the embedding/output matrices. A part's *options* are the ggml types it can take:
one type per part, each matrix getting that type or, where the type's blocks do not fit its
rows, its 32-block stand-in (see :func:`edgequant.planning.fitting_type`).

For every part and option, the part alone is rounded (RTN on the importance-weighted grid)
and the model is run on calibration text; the sensitivity is the increase in cross-entropy
against the full-precision model's own next-token distribution, i.e. the KL divergence
KL(full precision || quantized) in nats per token. (Against the text's tokens the increase is
noisy and can come out negative for 8-bit types; against the model's distribution it cannot.)
Only one block's input is held at a time: the run starts at the part's block, from the
full-precision hidden states cached for that block.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .atomic import write_text
from .calibration import block_inputs, run_block
from .ggml_quants import get_type
from .measured import cache_path, code_of, tensor_bytes
from .models import LoadedModel
from .planning import Matrix, fitting_type

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
# The default model's reference weights lie on the Q4_1 grid they were shipped in, so the affine
# 32-block types reproduce them exactly (KL 0 at Q5_1): measured, they would win for that reason
# alone. Where the stand-in is one of them, the symmetric type of the same width is used.
AFFINE_TO_SYMMETRIC = {"Q4_1": "Q4_0", "Q5_1": "Q5_0"}


@dataclass(frozen=True)
class Part:
    block: int  # -1 for the embedding / output matrices
    kind: str  # "attn", "ffn" or "embd"
    matrices: tuple[Matrix, ...]

    @property
    def key(self) -> str:
        return self.kind if self.block < 0 else f"{self.block}.{self.kind}"

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matrices)

    def options(self) -> list[dict[str, str]]:
        """Distinct type assignments, one per candidate type, smallest first."""
        seen: dict[tuple, dict[str, str]] = {}
        for t in CANDIDATES:
            types = self.types_for(t)
            seen.setdefault(tuple(types.values()), types)
        return sorted(seen.values(), key=self.nbytes)

    def types_for(self, candidate: str) -> dict[str, str]:
        """Each matrix's type when the part takes ``candidate`` (its stand-in where the blocks do not fit)."""
        return {m.name: stand_in(candidate, m.cols) for m in self.matrices}

    def nbytes(self, types: dict[str, str]) -> int:
        return sum(m.params // get_type(types[m.name]).block * get_type(types[m.name]).nbytes for m in self.matrices)

    @staticmethod
    def label(types: dict[str, str]) -> str:
        return "/".join(dict.fromkeys(types.values()))


def stand_in(t: str, cols: int) -> str:
    """The type a matrix with rows of ``cols`` weights gets for candidate ``t``."""
    t = fitting_type(t, cols)
    return AFFINE_TO_SYMMETRIC.get(t, t)


def split_parts(matrices: list[Matrix]) -> list[Part]:
    groups: dict[tuple[int, str], list[Matrix]] = {}
    for m in matrices:
        fields = m.name.split(".")
        if fields[0] == "blk":
            key = (int(fields[1]), "attn" if fields[2].startswith("attn") else "ffn")
        else:
            key = (-1, "embd")
        groups.setdefault(key, []).append(m)
    return [Part(b, k, tuple(ms)) for (b, k), ms in sorted(groups.items(), key=lambda kv: (kv[0][0] < 0, kv[0]))]


@dataclass
class Entry:
    part: str
    option: str  # e.g. "IQ4_NL/Q3_K"
    types: dict[str, str]
    bytes: int
    kl: float  # nats per token


class Sensitivity:
    """The measured table: for each part, its options' sizes and KL."""

    def __init__(self, entries: list[Entry], tokens: int):
        self.entries, self.tokens = entries, tokens

    def by_part(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.part, []).append(e)
        return out

    def as_dict(self) -> dict:
        return {"measure": "KL(full precision || part quantized) in nats/token", "tokens": self.tokens,
                "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls([Entry(**e) for e in d["entries"]], d["tokens"])


class Reference:
    """Full-precision next-token distributions of one window, kept as what KL needs: the
    probabilities p and their negative entropy sum(p log p)."""

    def __init__(self, logits: torch.Tensor):
        logp = torch.log_softmax(logits.float(), -1)
        self.p = logp.exp()
        self.neg_entropy = (self.p * logp).sum(-1)

    def kl(self, logits: torch.Tensor) -> float:
        """Mean KL(p || softmax(logits)) over the window's positions, in nats."""
        logq = torch.log_softmax(logits.float(), -1)
        return float((self.neg_entropy - (self.p * logq).sum(-1)).mean())


class Tail:
    """Runs the model from block ``start`` to the logits, on cached hidden states."""

    def __init__(self, model, kwargs):
        self.model, self.kwargs = model, kwargs

    def logits(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        for layer in self.model.model.layers[start:]:
            hidden = run_block(layer, hidden, self.kwargs)
        return self.model.lm_head(self.model.model.norm(hidden))[0]


@torch.inference_mode()
def measure(
    loaded: LoadedModel,
    parts: list[Part],
    windows: np.ndarray,
    importance: dict[str, np.ndarray],
    progress: Callable[[], None] | None = None,
) -> Sensitivity:
    """The KL of every option of every part, each part quantized alone (RTN + importance)."""
    model = loaded.model
    tokens = torch.from_numpy(windows)
    ref = [Reference(model(t[None], use_cache=False).logits[0]) for t in tokens]
    hidden, kwargs = block_inputs(model, windows)
    tail = Tail(model, kwargs)
    entries = []

    def kl_of(part: Part) -> float:
        if part.block < 0:
            return float(np.mean([r.kl(model(t[None], use_cache=False).logits[0]) for r, t in zip(ref, tokens)]))
        return float(np.mean([r.kl(tail.logits(h, part.block)) for r, h in zip(ref, hidden_at[part.block])]))

    hidden_at: dict[int, list[torch.Tensor]] = {}
    for part in sorted(parts, key=lambda p: (p.block < 0, p.block)):
        if part.block >= 0 and part.block not in hidden_at:
            hidden_at.clear()  # one block's inputs at a time
            hidden_at[part.block] = hidden
            hidden = [run_block(model.model.layers[part.block], h, kwargs) for h in hidden]
        with loaded.block(part.block):
            weights = {loaded.gguf_name(hf): p for hf, p in model.named_parameters(remove_duplicate=False) if p.ndim == 2}
            originals = {m.name: weights[m.name].detach().clone() for m in part.matrices}
            for types in part.options():
                for m in part.matrices:
                    q = get_type(types[m.name]).dequantized(originals[m.name].numpy(), importance.get(m.name))
                    weights[m.name].data.copy_(torch.from_numpy(q))
                entries.append(Entry(part.key, Part.label(types), types, part.nbytes(types), kl_of(part)))
                if progress:
                    progress()
            for m in part.matrices:
                weights[m.name].data.copy_(originals[m.name])
    return Sensitivity(entries, int(windows.size))


def n_measurements(parts: list[Part]) -> int:
    return sum(len(p.options()) for p in parts)


# the modules whose code decides a measured table: this one, the block runner, the encoders, the fallbacks
MEASURING_CODE = (__name__, "edgequant.calibration", "edgequant.ggml_quants", "edgequant.planning")


def cached_measure(loaded: LoadedModel, parts, windows, importance, progress=None) -> Sensitivity:
    """:func:`measure`, remembered under the cache dir by the model, the text, the importance, the
    parts' options and the measuring code itself."""
    options = json.dumps([[p.key, [o for o in p.options()]] for p in parts]).encode()
    path = cache_path("sensitivity", loaded, code_of(*MEASURING_CODE), windows.tobytes(), tensor_bytes(importance),
                      options, suffix=".json")
    if path.is_file():
        return Sensitivity.from_dict(json.loads(path.read_text()))
    table = measure(loaded, parts, windows, importance, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(table.as_dict()))
    return table

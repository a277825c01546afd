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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .adapters import adapter_of
from .atomic import write_text
from .evaluation import HeldReferences, SpilledReferences, references
from .ggml_quants import get_type
from .measured import cache_path, code_of, tensor_bytes
from .models import LoadedModel
from .ort_quants import is_ort_type
from .planning import NOT_FOR_EMBEDDING, Matrix, fitting_type
from .walker import Walk, run_block

CANDIDATES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS",
              "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")  # smallest first
# Q4_0 is the one 32-block candidate: llama.cpp repacks it for its fastest CPU kernels (AVX2, Arm
# dotprod/i8mm), so with the kernels' costs priced in (:class:`edgequant.planning.Speed`) it can
# beat IQ4_NL (rows of 576) or Q4_K of the same size.
# The default model's reference weights lie on the Q4_1 grid they were shipped in, so the affine
# 32-block types reproduce them exactly (KL 0 at Q5_1): measured, they would win for that reason
# alone. Where the stand-in is one of them, the symmetric type of the same width is used.
AFFINE_TO_SYMMETRIC = {"Q4_1": "Q4_0", "Q5_1": "Q5_0"}


@dataclass(frozen=True)
class Part:
    block: int  # -1 for the embedding / output matrices
    kind: str  # "attn", "ffn", "ssm" (a state-space block's projections) or "embd"
    matrices: tuple[Matrix, ...]
    menu: tuple[str, ...] = CANDIDATES  # the types it may take (ONNX Runtime's for an ONNX plan)

    @property
    def key(self) -> str:
        return self.kind if self.block < 0 else f"{self.block}.{self.kind}"

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matrices)

    def candidates(self) -> tuple[str, ...]:
        """The candidate types of this part (the embedding's without 256-block i-quants, see :mod:`edgequant.planning`)."""
        return self.menu if self.block >= 0 else tuple(t for t in self.menu if t not in NOT_FOR_EMBEDDING)

    def options(self) -> list[dict[str, str]]:
        """Distinct type assignments, one per candidate type, smallest first."""
        seen: dict[tuple, dict[str, str]] = {}
        for t in self.candidates():
            types = self.types_for(t)
            seen.setdefault(tuple(types.values()), types)
        return sorted(seen.values(), key=self.nbytes)

    def types_for(self, candidate: str) -> dict[str, str]:
        """Each matrix's type when the part takes ``candidate`` (its stand-in where the blocks do not fit)."""
        return {m.name: stand_in(candidate, m.cols) for m in self.matrices}

    def sizes(self, types: dict[str, str]) -> dict[str, int]:
        """Each matrix's bytes at ``types``."""
        return {m.name: get_type(types[m.name]).tensor_bytes(m.rows, m.cols) for m in self.matrices}

    def nbytes(self, types: dict[str, str]) -> int:
        return sum(self.sizes(types).values())

    @staticmethod
    def label(types: dict[str, str]) -> str:
        return "/".join(dict.fromkeys(types.values()))


def stand_in(t: str, cols: int) -> str:
    """The type a matrix with rows of ``cols`` weights gets for candidate ``t``."""
    t = fitting_type(t, cols)
    return AFFINE_TO_SYMMETRIC.get(t, t)


def split_parts(matrices: list[Matrix], menu: tuple[str, ...] = CANDIDATES) -> list[Part]:
    groups: dict[tuple[int, str], list[Matrix]] = {}
    for m in matrices:
        fields = m.name.split(".")
        if fields[0] == "blk":
            key = (int(fields[1]), next((k for k in ("attn", "ssm") if fields[2].startswith(k)), "ffn"))
        else:
            key = (-1, "embd")
        groups.setdefault(key, []).append(m)
    return [Part(b, k, tuple(ms), menu) for (b, k), ms in sorted(groups.items(), key=lambda kv: (kv[0][0] < 0, kv[0]))]


@dataclass
class Entry:
    part: str
    option: str  # e.g. "IQ4_NL/Q3_K"
    types: dict[str, str]
    bytes: int
    kl: float  # nats per token


MEASURED = "KL(full precision || part quantized) in nats/token, measured at the output"


class Sensitivity:
    """The measured table: for each part, its options' sizes and KL."""

    def __init__(self, entries: list[Entry], tokens: int, measure: str = MEASURED):
        self.entries, self.tokens, self.measure = entries, tokens, measure

    def by_part(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.part, []).append(e)
        return out

    def as_dict(self) -> dict:
        return {"measure": self.measure, "tokens": self.tokens, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        return cls([Entry(**e) for e in d["entries"]], d["tokens"], d.get("measure", MEASURED))


class Tail:
    """Runs the model from block ``start`` to the logits, on cached hidden states (``kwargs``:
    every block's keyword arguments, :attr:`edgequant.walker.Walk.kwargs`)."""

    def __init__(self, model, kwargs: list[dict]):
        self.model, self.kwargs, self.family = model, kwargs, adapter_of(model)

    def logits(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        for layer, kwargs in zip(self.family.layers(self.model)[start:], self.kwargs[start:]):
            hidden = run_block(layer, hidden, kwargs)
        return self.family.logits(self.model, hidden)[0]


class Kept:
    """The entries measured so far, written to ``path`` after every part, so that a measurement
    stopped on the way (a 1.5B model's options, the i-quants among them, take hours) resumes at
    the part it was on. ``path`` None keeps them in memory only."""

    def __init__(self, path: Path | None = None):
        self.path = path
        done = path is not None and path.is_file()
        self.entries: list[Entry] = Sensitivity.from_dict(json.loads(path.read_text())).entries if done else []

    def has(self, part: Part) -> bool:
        return any(e.part == part.key for e in self.entries)

    def add(self, found: list[Entry]) -> None:
        """One part's entries, kept."""
        self.entries += found
        if self.path is not None:
            write_text(self.path, json.dumps(Sensitivity(self.entries, 0).as_dict()))

    def skip(self, part: Part, progress) -> bool:
        """Whether ``part`` was measured before (its options then count as done)."""
        if not self.has(part):
            return False
        for _ in part.options() if progress else ():
            progress()
        return True

    def measure(self, loaded: LoadedModel, part: Part, importance, block_kl, ref, tokens, progress) -> None:
        """Every option of ``part`` (through :func:`option_kls`), unless kept from before."""
        if self.skip(part, progress):
            return
        found = []
        for types, kl in option_kls(loaded, part, importance, block_kl, ref, tokens):
            found.append(Entry(part.key, Part.label(types), types, part.nbytes(types), kl))
            if progress:
                progress()
        self.add(found)


@torch.inference_mode()
def measure(
    loaded: LoadedModel,
    parts: list[Part],
    windows: np.ndarray,
    importance: dict[str, np.ndarray],
    progress: Callable[[], None] | None = None,
    kept: Kept | None = None,
) -> Sensitivity:
    """The KL of every option of every part, each part quantized alone (RTN + importance)."""
    model = loaded.model
    tokens = torch.from_numpy(windows)
    ref = references((model(t[None], use_cache=False).logits[0] for t in tokens), _nbytes(loaded, windows))
    kept = kept or Kept()

    def add(part: Part, block_kl: Callable[[], float] | None) -> None:
        kept.measure(loaded, part, importance, block_kl, ref, tokens, progress)

    walk = Walk(loaded, windows)
    for stop in walk:
        tail = Tail(model, walk.kwargs)
        for part in (p for p in parts if p.block == stop.index):
            add(part, lambda tail=tail, stop=stop: float(np.mean([r.mean_kl(tail.logits(h, stop.index))
                                                                  for r, h in zip(ref, stop.inputs)])))
    for part in (p for p in parts if p.block < 0):
        add(part, None)
    return Sensitivity(kept.entries, int(windows.size))


def option_kls(loaded: LoadedModel, part: Part, importance: dict[str, np.ndarray], block_kl: Callable[[], float],
               ref: HeldReferences | SpilledReferences, tokens: torch.Tensor):
    """Yields (types, KL) for each option of ``part``: a block's part is rounded in place and
    ``block_kl()`` measures it; the embedding and head are measured at the output."""
    if part.block < 0:
        for types in part.options():
            yield types, output_kl(loaded, ref, tokens, types, importance)
    else:
        for types in rounded_options(loaded, part, importance):
            yield types, block_kl()


def rounded_options(loaded: LoadedModel, part: Part, importance: dict[str, np.ndarray]):
    """Yields each option of ``part`` (its types) while the part's matrices are rounded to it
    (RTN on the importance-weighted grid) in place; the weights are put back at the end."""
    with loaded.block(part.block), torch.no_grad():
        weights = {loaded.gguf_name(hf): p for hf, p in loaded.model.named_parameters(remove_duplicate=False)
                   if p.ndim == 2}
        originals = {m.name: weights[m.name].detach().clone() for m in part.matrices}
        try:
            for types in part.options():
                for m in part.matrices:  # rounded straight into the weight (a 151936-row embedding is 0.9 GB)
                    get_type(types[m.name]).dequantized(originals[m.name].numpy(), importance.get(m.name),
                                                        out=weights[m.name].detach().numpy())
                yield types
        finally:  # also when stopped: then perhaps outside the inference mode the weights were made in
            for m in part.matrices:
                with torch.inference_mode() if weights[m.name].is_inference() else torch.no_grad():
                    weights[m.name].copy_(originals[m.name])


def _nbytes(loaded: LoadedModel, windows: np.ndarray) -> int:
    """Bytes of the reference probabilities of ``windows``."""
    return 4 * windows.size * loaded.adapter.head(loaded.model).out_features


EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"
HEAD_ROWS = 16384  # vocabulary rows of the head rounded and applied at once


@torch.inference_mode()
def output_kl(loaded: LoadedModel, ref: HeldReferences | SpilledReferences, tokens: torch.Tensor,
              types: dict[str, str], importance: dict[str, np.ndarray]) -> float:
    """Mean KL of the model's output from the reference over the windows ``tokens`` when the
    embedding and the head take ``types`` (GGUF name -> type; a matrix not named stays as it is).

    Neither matrix is copied whole (151936 x 1536 is 0.9 GB). The embedding only has the rows
    the windows read rounded, in place and put back after the blocks' pass. The head is rounded
    ``HEAD_ROWS`` vocabulary rows at a time, and each slice's logits ``z`` go into the KL as
    they come: KL(p || softmax z) = sum p log p - sum p z + logsumexp z, all sums over the
    vocabulary. (Rows are rounded on their own, so this is the whole matrix's rounding.)"""
    model, family = loaded.model, loaded.adapter
    head_name = EMBEDDING if loaded.config.tie_word_embeddings else OUTPUT
    used = torch.unique(tokens).numpy()
    with _rounded_rows(family.embedding(model).weight, used, types.get(EMBEDDING), importance.get(EMBEDDING)):
        final = [model.get_decoder()(t[None], use_cache=False).last_hidden_state[0] for t in tokens]
    head = family.head(model)
    qtype = get_type(types[head_name]) if head_name in types else None
    dot = [torch.zeros(len(h), dtype=torch.float64) for h in final]
    lse = [torch.full((len(h),), -torch.inf, dtype=torch.float64) for h in final]
    for v in range(0, head.out_features, HEAD_ROWS):
        rows = slice(v, v + HEAD_ROWS)
        w = head.weight.detach()[rows]
        if qtype is not None:
            w = torch.from_numpy(qtype.dequantized(w.numpy(), importance.get(head_name)))
        bias = None if head.bias is None else head.bias.detach()[rows]
        for i, h in enumerate(final):
            z = torch.nn.functional.linear(h, w, bias).float()
            dot[i] += torch.einsum("ij,ij->i", ref.probs(i, rows), z)
            lse[i] = torch.logaddexp(lse[i], torch.logsumexp(z, -1))
    kl = [ref.neg_entropy(i) - d + s for i, (d, s) in enumerate(zip(dot, lse))]
    return float(torch.cat(kl).mean())


@contextmanager
def _rounded_rows(weight: torch.Tensor, rows: np.ndarray, qtype: str | None, importance: np.ndarray | None):
    """A context in which ``rows`` of ``weight`` are rounded to ``qtype`` in place (None: left)."""
    if qtype is None:
        yield
        return
    w = weight.detach().numpy()
    original = w[rows]  # a copy (indexed by an array)
    w[rows] = get_type(qtype).dequantized(original, importance)
    try:
        yield
    finally:
        w[rows] = original


FISHER_SAMPLES = 2  # labels sampled per window from the model's own distribution


def estimate(
    loaded: LoadedModel,
    parts: list[Part],
    windows: np.ndarray,
    importance: dict[str, np.ndarray],
    progress: Callable[[], None] | None = None,
    kept: Kept | None = None,
) -> Sensitivity:
    """The KL of every option of every part at a cost linear in depth.

    A block part's KL is estimated from the change ``d`` its rounding makes to its block's
    output: ``KL ~ 1/2 sum F d^2`` per token, with ``F`` the diagonal Fisher information of the
    model's output distribution with respect to that block's output (squared gradients of the
    log-likelihood of labels sampled from the model itself). The Fisher information comes from
    one walk back through the blocks, one block in memory at a time; each option then costs
    one run of its own block. The embedding's options are measured at the output, as
    :func:`measure` does (one pass of the model each).
    """
    model, family = loaded.model, loaded.adapter
    tokens = torch.from_numpy(windows)
    walk = Walk(loaded, windows)
    inputs = [stop.inputs for stop in walk]  # every block's, for the walk back
    hidden, kwargs = walk.hidden, walk.kwargs
    with torch.inference_mode():
        ref = references((family.logits(model, h)[0] for h in hidden), _nbytes(loaded, windows))
    fisher = _fisher(loaded, inputs, hidden, kwargs)
    kept = kept or Kept()
    for part in sorted(parts, key=lambda p: (p.block < 0, p.block)):
        if kept.skip(part, progress):
            continue
        with torch.inference_mode(), loaded.block(part.block):
            if part.block >= 0:
                layer, x = family.layers(model)[part.block], inputs[part.block]
                before = [run_block(layer, h, kwargs[part.block]) for h in x]

            def block_kl(part=part) -> float:
                return float(np.mean([0.5 * float((f * (run_block(layer, h, kwargs[part.block]) - y)[0] ** 2).sum(-1).mean())
                                      for h, y, f in zip(x, before, fisher[part.block])]))

            kept.measure(loaded, part, importance, block_kl, ref, tokens, progress)
    return Sensitivity(kept.entries, int(windows.size), "Fisher estimate at the block's output (blocks); measured (embedding)")


def _fisher(loaded: LoadedModel, inputs: list[list[torch.Tensor]], final: list[torch.Tensor], kwargs: list[dict]):
    """Per block and window, the diagonal Fisher information (tokens, hidden) of the output
    distribution with respect to the block's output: gradients walked back from the logits
    one block at a time, each block re-run from its stored input."""
    model, family, gen = loaded.model, loaded.adapter, torch.Generator().manual_seed(0)
    kwargs = _trainable(kwargs)
    grads = []  # per window: (samples, 1, tokens, hidden), at the current block's output
    with torch.enable_grad():
        for h in final:
            x = h.clone().requires_grad_()
            logp = torch.log_softmax(family.logits(model, x)[0].float(), -1)
            labels = [torch.multinomial(logp.detach().exp(), 1, generator=gen) for _ in range(FISHER_SAMPLES)]
            grads.append(torch.stack([torch.autograd.grad(logp.gather(1, y).sum(), x, retain_graph=True)[0]
                                      for y in labels]))
        fisher: list[list[torch.Tensor]] = [[] for _ in inputs]
        for b in reversed(range(len(inputs))):
            fisher[b] = [g.pow(2).mean(0)[0] for g in grads]
            if b == 0:
                break
            with loaded.block(b):
                layer, new = family.layers(model)[b], []
                for h, g in zip(inputs[b], grads):
                    x = h.clone().requires_grad_()
                    out = run_block(layer, x, kwargs[b])
                    new.append(torch.stack([torch.autograd.grad(out, x, grad_outputs=gs, retain_graph=True)[0] for gs in g]))
                grads = new
    return fisher


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two sequences (how the estimate is checked against the measure)."""
    ranks = [np.argsort(np.argsort(np.asarray(x, dtype=float))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _trainable(value, copies: dict | None = None):
    """``value`` with every tensor in it copied out of inference mode (autograd may save it); a
    tensor found twice (the blocks' shared rotary tables and mask) is copied once."""
    copies = {} if copies is None else copies
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:
            copies[id(value)] = value.clone()
        return copies[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_trainable(v, copies) for v in value)
    if isinstance(value, dict):
        return {k: _trainable(v, copies) for k, v in value.items()}
    return value


def n_measurements(parts: list[Part]) -> int:
    return sum(len(p.options()) for p in parts)


# the modules whose code decides a measured table: this one, the block runner, the encoders, the fallbacks
# the code a table's numbers depend on (the options themselves, types per matrix, are keyed as data)
MEASURING_CODE = (__name__, "edgequant.calibration", "edgequant.walker", "edgequant.ggml_quants", "edgequant.ggml_iquants")


HOW = {"measured": measure, "fisher": estimate}
MEASURED_UP_TO = 500_000_000  # parameters: above, ``auto`` estimates (the measured table costs depth^2)


def how_for(loaded: LoadedModel, how: str = "auto") -> str:
    """``measured`` or ``fisher``: ``auto`` measures models up to ``MEASURED_UP_TO`` parameters."""
    if how != "auto":
        return how
    return "measured" if sum(p.numel() for p in loaded.model.parameters()) <= MEASURED_UP_TO else "fisher"


def cached_measure(loaded: LoadedModel, parts, windows, importance, progress=None, how: str = "measured") -> Sensitivity:
    """:func:`measure` (or :func:`estimate`), remembered under the cache dir by the model, the
    text, the importance, the parts' options and the measuring code itself."""
    options = json.dumps([[p.key, [o for o in p.options()]] for p in parts]).encode()
    ort = any(is_ort_type(t) for p in parts for t in p.menu)  # ONNX Runtime's grids: their code decides the numbers too
    code = code_of(*MEASURING_CODE, *(("edgequant.ort_quants",) if ort else ()))
    path = cache_path("sensitivity", loaded, code, windows.tobytes(), tensor_bytes(importance),
                      options, how.encode(), suffix=".json")
    if path.is_file():
        return Sensitivity.from_dict(json.loads(path.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.json")  # the parts measured so far by a run that was stopped
    table = HOW[how](loaded, parts, windows, importance, progress, Kept(partial))
    write_text(path, json.dumps(table.as_dict()))
    partial.unlink(missing_ok=True)
    return table

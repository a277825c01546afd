"""Quality against the full-precision model: perplexity, KL divergence and top-1 agreement.

The text is cut into fixed, non-overlapping windows of ``ctx`` tokens (default 512); each
window is scored on its own (no state carried over), every position predicting the next
token. The same token windows go to every runtime, so torch, llama.cpp and ONNX Runtime
figures are comparable. A *logits source* is any callable ``window (n,) -> logits (n, vocab)``;
the array it returns is the caller's until the source is called again (scoring overwrites it);
the reference is one too, run beside the candidates (:func:`score`).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from .ggml_quants import get_type
from .options import DEFAULT_CTX
from .ort_quants import is_ort_type

LogitSource = Callable[[np.ndarray], np.ndarray]


@dataclass
class Quality:
    runtime: str
    ppl: float
    ppl_se: float  # standard error of the perplexity, from the per-token spread
    kld: float | None  # mean KL(full precision || this), nats per token
    kld_se: float | None
    top1: float | None  # share of positions whose most likely token matches full precision
    tokens: int
    ctx: int
    accuracy: float | None = None  # share of positions whose most likely token is the text's next token

    def as_dict(self) -> dict:
        return asdict(self)


def token_windows(tokenizer, text: str, n_tokens: int, ctx: int = DEFAULT_CTX) -> np.ndarray:
    """(n_windows, ctx) int array covering the first ``n_tokens`` tokens of ``text``. When the
    tokenizer puts a BOS token before a text (Gemma, Llama-2), every window starts with it, as in
    llama.cpp's perplexity and imatrix tools: such models are lost without it (gemma3-270m in
    torch, 1024 tokens of wiki.utf8: perplexity 23.0 without, 12.6 with)."""
    bos = bos_token(tokenizer)
    n_windows, step = max(1, n_tokens // ctx), ctx - (bos is not None)
    needed = n_windows * step
    chars = needed * 8
    ids: list[int] = []
    while len(ids) < needed and chars < len(text) * 2:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        chars *= 2
    n_windows = min(n_windows, len(ids) // step)
    if n_windows == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of {ctx}")
    windows = np.asarray(ids[: n_windows * step], dtype=np.int64).reshape(n_windows, step)
    return windows if bos is None else np.concatenate([np.full((n_windows, 1), bos, np.int64), windows], axis=1)


def bos_token(tokenizer) -> int | None:
    """The token ``tokenizer`` puts before every text, if it puts one."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


class TorchLogits:
    """Logits from a transformers model, one window at a time, on the CPU in float32."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def __call__(self, window: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(window)[None], use_cache=False)
        return out.logits[0].float().numpy()


class Reference:
    """The reference's next-token distributions of one window, as KL needs them: the
    probabilities p and their negative entropy sum(p log p), computed once for every candidate."""

    def __init__(self, logp: torch.Tensor):
        self.p = logp.exp()
        self.neg_entropy = torch.einsum("ij,ij->i", self.p, logp)
        self.top = logp.argmax(-1)

    @classmethod
    def of_logits(cls, logits: torch.Tensor) -> "Reference":
        return cls(torch.log_softmax(logits.float(), -1))

    def kl(self, logp: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """KL(p || q) per position (of ``rows``), for the candidate's log-probabilities there."""
        return self.neg_entropy[rows] - torch.einsum("ij,ij->i", self.p[rows], logp)

    def mean_kl(self, logits: torch.Tensor) -> float:
        """KL(p || softmax(logits)) averaged over the window's positions, in nats."""
        return float(self.kl(torch.log_softmax(logits.float(), -1)).mean())


IN_MEMORY = 1 << 29  # bytes of reference probabilities held in memory; past that, on disk


def references(logits: Iterable[torch.Tensor], nbytes: int) -> "HeldReferences | SpilledReferences":
    """The references of several windows from their ``logits``, ``nbytes`` of float32
    probabilities in all: held in memory up to ``IN_MEMORY``, else :class:`SpilledReferences`."""
    if nbytes <= IN_MEMORY:
        return HeldReferences(Reference.of_logits(window) for window in logits)
    return SpilledReferences(logits)


class HeldReferences(list):
    """The references of several windows, in memory (a list of :class:`Reference`)."""

    def probs(self, i: int, cols: slice) -> torch.Tensor:
        """Window ``i``'s probabilities over the vocabulary slice ``cols``, every position."""
        return self[i].p[:, cols]

    def neg_entropy(self, i: int) -> torch.Tensor:
        return self[i].neg_entropy


class SpilledReferences:
    """The references of several windows, their log-probabilities written to a file under the
    cache's ``spill/`` and read back one window at a time (iterate as often as needed). In
    memory, 16 windows of 512 tokens over a 151936-token vocabulary are 5 GB of probabilities."""

    def __init__(self, logits: Iterable[torch.Tensor]):
        from .errors import disk_full_as_error
        from .spill import spill_dir

        folder = spill_dir()
        fd, name = tempfile.mkstemp(prefix="reference-", suffix=".f32", dir=folder)
        self.path, self.count, self.shape = Path(name), 0, (0, 0)
        self.neg_entropies: list[torch.Tensor] = []
        self._remove = weakref.finalize(self, self.path.unlink, True)  # missing_ok
        try:
            with disk_full_as_error(folder, "for the reference's log-probabilities in"), os.fdopen(fd, "wb") as f:
                for window in logits:
                    logp = torch.log_softmax(window.float(), -1)
                    logp.numpy().tofile(f)
                    self.neg_entropies.append(torch.einsum("ij,ij->i", logp.exp(), logp))
                    self.count, self.shape = self.count + 1, tuple(logp.shape)
        except BaseException:
            self._remove()
            raise

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Reference]:
        n = math.prod(self.shape)
        for i in range(self.count):
            logp = np.fromfile(self.path, np.float32, count=n, offset=4 * n * i).reshape(self.shape)
            yield Reference(torch.from_numpy(logp))

    def probs(self, i: int, cols: slice) -> torch.Tensor:
        """Window ``i``'s probabilities over the vocabulary slice ``cols``, every position, read
        through a map of the file that is let go at once (its pages would stay in the process)."""
        logp = np.memmap(self.path, np.float32, "r", offset=4 * math.prod(self.shape) * i, shape=self.shape)
        return torch.from_numpy(np.exp(logp[:, cols]))

    def neg_entropy(self, i: int) -> torch.Tensor:
        return self.neg_entropies[i]


class _Totals:
    """Per-token figures of one candidate, summed window by window."""

    def __init__(self):
        self.nll, self.hit, self.kl, self.agree = [], [], [], []

    def add(self, logp: torch.Tensor, target: torch.Tensor, ref: Reference | None) -> None:
        top = logp.argmax(-1)
        self.nll.append(-logp.gather(1, target[:, None])[:, 0].double())
        self.hit.append((top == target).float())
        if ref is not None:
            self.kl.append(ref.kl(logp).double())
            self.agree.append((ref.top == top).float())

    def quality(self, runtime: str, ctx: int) -> Quality:
        nll = torch.cat(self.nll)
        ppl = float(torch.exp(nll.mean()))
        quality = Quality(runtime, ppl, ppl * _se(nll), None, None, None, int(nll.numel()), ctx,
                          float(torch.cat(self.hit).mean()))
        if self.kl:
            kl = torch.cat(self.kl)
            quality.kld, quality.kld_se = float(kl.mean()), _se(kl)
            quality.top1 = float(torch.cat(self.agree).mean())
        return quality


def _log_probs(logits: np.ndarray) -> torch.Tensor:
    """Log-probabilities of every position but the last (which predicts past the window),
    computed in place in the source's array (no copy of a window's logits is made)."""
    t = torch.from_numpy(np.asarray(logits, dtype=np.float32)[:-1])
    return t.sub_(torch.logsumexp(t, -1, keepdim=True))


def score(
    candidates: dict[str, LogitSource],
    windows: np.ndarray,
    reference: LogitSource | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Quality]:
    """Score every candidate on ``windows``; KL and top-1 need the full-precision ``reference``.

    Candidates and reference run side by side, window by window: only one window's logits per
    source are held, never the whole text's (a 151936-token vocabulary over 8192 tokens would be
    5 GB). A candidate that *is* the reference is scored on the reference's own logits (its
    perplexity; KL 0). Each source's ``runtime`` attribute labels its figures (``torch`` if none).
    """
    totals = {key: _Totals() for key in candidates}
    for window in windows:
        target = torch.from_numpy(window[1:])
        ref_logp = _log_probs(reference(window)) if reference is not None else None
        ref = Reference(ref_logp) if reference is not None else None
        for key, source in candidates.items():
            logp = ref_logp if source is reference else _log_probs(source(window))
            totals[key].add(logp, target, ref)
            del logp
        if progress:
            progress()
    return {key: t.quality(getattr(candidates[key], "runtime", "torch"), windows.shape[1]) for key, t in totals.items()}


def evaluate(
    candidate: LogitSource,
    windows: np.ndarray,
    reference: LogitSource | None = None,
    runtime: str | None = None,
    progress: Callable[[], None] | None = None,
) -> Quality:
    """:func:`score` of one candidate (labelled ``runtime``, else by its own ``runtime``)."""
    quality = score({"candidate": candidate}, windows, reference, progress)["candidate"]
    if runtime:
        quality.runtime = runtime
    return quality


def _se(x: torch.Tensor) -> float:
    return float(x.std() / np.sqrt(x.numel()))


def decode_into(loaded, encoded: dict) -> None:
    """Give the model (in place) the weights gguf-py decodes from the bytes we ship: the torch
    simulation of the GGUF file (or of an ONNX plan's codes). ``encoded`` maps GGUF names to
    :class:`edgequant.ggml_quants.EncodedTensor`; a tied embedding stays tied (one tensor in the file)."""
    for hf_name, t in loaded.state():
        enc = encoded.get(loaded.gguf_name(hf_name)) if t.ndim == 2 else None
        if enc is not None:
            t.copy_(torch.from_numpy(decoded(enc).reshape(t.shape)))


def decoded(enc) -> np.ndarray:
    """The float32 values of an encoded tensor: gguf-py's dequantizer for a ggml type, the grid's
    own for an ONNX Runtime configuration (``scale * (code - zero point)``)."""
    if is_ort_type(enc.ggml_type):  # a few rows at a time: a whole embedding's codes and values took GBs
        qtype, data = get_type(enc.ggml_type), enc.data
        out = np.empty((len(data), qtype.cols_of(data.shape[1])), np.float32)
        step = max(1, (1 << 22) // out.shape[1])
        for r in range(0, len(data), step):
            grid, codes = qtype.unpack(np.asarray(data[r : r + step]))
            out[r : r + step] = grid.values(codes)
        return out
    return gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType[enc.ggml_type])

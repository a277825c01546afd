"""Quality against the full-precision model: perplexity, KL divergence and top-1 agreement.

The text is cut into fixed, non-overlapping windows of ``ctx`` tokens (default 512); each
window is scored on its own (no state carried over), every position predicting the next
token. The same token windows go to every runtime, so torch, llama.cpp and ONNX Runtime
figures are comparable. A *logits source* is any callable ``window (n,) -> logits (n, vocab)``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import gguf
import numpy as np
import torch

LogitSource = Callable[[np.ndarray], np.ndarray]
DEFAULT_CTX = 512


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
    """(n_windows, ctx) int array covering the first ``n_tokens`` tokens of ``text``."""
    n_windows = max(1, n_tokens // ctx)
    needed = n_windows * ctx
    chars = needed * 8
    ids: list[int] = []
    while len(ids) < needed and chars < len(text) * 2:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        chars *= 2
    n_windows = min(n_windows, len(ids) // ctx)
    if n_windows == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one window of {ctx}")
    return np.asarray(ids[: n_windows * ctx], dtype=np.int64).reshape(n_windows, ctx)


class TorchLogits:
    """Logits from a transformers model, one window at a time, on the CPU in float32."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def __call__(self, window: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(window)[None], use_cache=False)
        return out.logits[0].float().numpy()


class CachedLogits:
    """Remembers a source's log-probabilities per window (the reference is asked many times)."""

    def __init__(self, source: LogitSource):
        self.source = source
        self._cache: dict[bytes, torch.Tensor] = {}

    def log_probs(self, window: np.ndarray) -> torch.Tensor:
        key = window.tobytes()
        if key not in self._cache:
            self._cache[key] = torch.log_softmax(torch.from_numpy(self.source(window)), -1)
        return self._cache[key]


def evaluate(
    candidate: LogitSource,
    windows: np.ndarray,
    reference: CachedLogits | None = None,
    runtime: str = "torch",
    progress: Callable[[], None] | None = None,
) -> Quality:
    """Score ``candidate`` on ``windows``; KL and top-1 need the full-precision ``reference``."""
    nll, kl, agree, hit = [], [], [], []
    for window in windows:
        logp = torch.log_softmax(torch.from_numpy(np.array(candidate(window), dtype=np.float32)), -1)[:-1]
        target = torch.from_numpy(window[1:])
        nll.append(-logp.gather(1, target[:, None])[:, 0])
        hit.append((logp.argmax(-1) == target).float())
        if reference is not None:
            ref = reference.log_probs(window)[:-1]
            kl.append((ref.exp() * (ref - logp)).sum(-1))
            agree.append((ref.argmax(-1) == logp.argmax(-1)).float())
        if progress:
            progress()
    nll_all = torch.cat(nll).double()
    ppl = float(torch.exp(nll_all.mean()))
    quality = Quality(runtime, ppl, ppl * _se(nll_all), None, None, None, int(nll_all.numel()), windows.shape[1],
                      float(torch.cat(hit).mean()))
    if reference is not None:
        kl_all = torch.cat(kl).double()
        quality.kld, quality.kld_se = float(kl_all.mean()), _se(kl_all)
        quality.top1 = float(torch.cat(agree).mean())
    return quality


def _se(x: torch.Tensor) -> float:
    return float(x.std() / np.sqrt(x.numel()))


def simulate(model: torch.nn.Module, gguf_names: Iterable[tuple[str, str]], encoded: dict) -> torch.nn.Module:
    """A copy of ``model`` whose weights are gguf-py's decoding of the bytes we ship.

    ``gguf_names`` pairs state-dict names with GGUF names; ``encoded`` maps GGUF names to
    :class:`edgequant.ggml_quants.EncodedTensor`. Tied embeddings stay tied (one tensor in the file).
    """
    sim = copy.deepcopy(model)
    params = dict(sim.named_parameters(remove_duplicate=False))
    for hf_name, name in gguf_names:
        if name not in encoded:
            continue
        enc = encoded[name]
        w = gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType[enc.ggml_type])
        with torch.no_grad():
            params[hf_name].copy_(torch.from_numpy(w.reshape(params[hf_name].shape)))
    return sim

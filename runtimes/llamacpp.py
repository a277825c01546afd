"""Run a GGUF file in llama.cpp (through llama-cpp-python): logits for evaluation, and chat."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.models import gguf_tensor_infos


UBATCH = 128  # tokens per compute step: the compute buffer holds this many rows of vocabulary logits


def _open(path: Path, n_ctx: int, logits_all: bool, n_threads: int | None):
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise EdgequantError(f"GGUF file not found: {path}")
    gguf_tensor_infos(path)  # a clean one-line error for a truncated or corrupt file
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, UBATCH),
            logits_all=logits_all,
            n_threads=n_threads or os.cpu_count(),
            use_mmap=False,  # mapped, the file's pages stay resident beside the copy x86 repacks Q4_K/Q4_0 into
            verbose=False,
        )
    except (ValueError, RuntimeError) as e:
        raise EdgequantError(f"llama.cpp cannot load {path}: {e}") from None


class LlamaCppLogits:
    """Logits of each window from llama.cpp, fresh KV cache per window."""

    runtime = "llama.cpp"

    def __init__(self, path: Path, ctx: int = 512, n_threads: int | None = None):
        self.llm = _open(path, ctx, logits_all=True, n_threads=n_threads)

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """The window's logits: a view of llama-cpp-python's own buffer (a vocabulary of 151936
        over 512 tokens is 311 MB), valid until the next call."""
        self.llm.reset()
        self.llm.eval(window.tolist())
        return self.llm.scores[: len(window)]

    def close(self) -> None:
        self.llm.close()


def score_in_llama_cpp(path: Path, windows: np.ndarray, reference, n_threads: int | None = None, progress=None):
    """Perplexity, KLD and top-1 of a GGUF file run in llama.cpp on ``windows`` (one window per
    context), against the full-precision ``reference`` logits."""
    from edgequant.evaluation import evaluate

    runner = LlamaCppLogits(path, windows.shape[1], n_threads)
    try:
        return evaluate(runner, windows, reference, "llama.cpp", progress)
    finally:
        runner.close()


def chat(path: Path, question: str, max_tokens: int = 48, n_threads: int | None = None) -> str:
    """Greedy answer to one user message, with the chat template stored in the file."""
    llm = _open(path, 1024, logits_all=False, n_threads=n_threads)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0
        )
        return out["choices"][0]["message"]["content"]
    finally:
        llm.close()

"""The full-precision reference: its log-probabilities on the evaluation windows, kept on disk.

Quality is the KL divergence of a file's next-token distributions from the full-precision
model's. The reference's distributions are computed once per model and text, by walking the
float32 model block by block over all the evaluation windows (:mod:`edgequant.blocks`: one
block in memory at a time), and written to a float16 file under the cache folder. Scoring then
reads one window at a time from that file beside the runtime under test, so no runtime ever
holds the float32 model, and no process holds the whole text's logits (a 151936-token
vocabulary over 8192 tokens is 5 GB in float32; the file is half that, on disk).

float16 log-probabilities are exact to 2^-11 of their size: for tokens of probability above
1% (|log p| < 4.6), to 0.002 nats, around which a KL of 0.002 is still read to a tenth of a percent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path
from .errors import disk_full_as_error
from .measured import cache_path, code_of
from .models import LoadedModel
from .walker import Walk


class StoredLogProbs:
    """A logits source of the reference: the stored float16 log-probabilities of each window,
    read from disk one window at a time."""

    runtime = "torch (float32 reference)"

    def __init__(self, path: Path, windows: np.ndarray, vocab: int):
        self.path, self.vocab, self.windows = Path(path), vocab, windows
        self.index = {w.tobytes(): i for i, w in enumerate(windows)}
        self.ctx = windows.shape[1]

    def __call__(self, window: np.ndarray) -> np.ndarray:
        i = self.index[np.asarray(window).tobytes()]
        n = self.ctx * self.vocab
        part = np.fromfile(self.path, np.float16, count=n, offset=i * n * 2)
        return part.reshape(self.ctx, self.vocab).astype(np.float32)


def reference_log_probs(loaded: LoadedModel, windows: np.ndarray, progress=None) -> StoredLogProbs:
    """The reference source of ``loaded`` on ``windows`` (computed and stored on first use)."""
    vocab = loaded.adapter.head(loaded.model).out_features
    path = cache_path("reference", loaded, code_of(__name__, "edgequant.walker"), windows.tobytes(), suffix=".f16")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with disk_full_as_error(path.parent, "for the reference's log-probabilities in"), atomic_path(path) as tmp:
            _write_log_probs(loaded, windows, tmp, progress)
    elif progress:
        for _ in range(loaded.config.num_hidden_layers + len(windows)):
            progress()
    return StoredLogProbs(path, windows, vocab)


@torch.inference_mode()
def _write_log_probs(loaded: LoadedModel, windows: np.ndarray, path: Path, progress=None) -> None:
    """Walk the model block by block over every window, then write each window's log-probabilities."""
    hidden = Walk(loaded, windows, progress).final_hidden()
    with open(path, "wb") as f:
        for h in hidden:
            logits = loaded.adapter.logits(loaded.model, h)[0].float()
            torch.log_softmax(logits, -1).to(torch.float16).numpy().tofile(f)
            if progress:
                progress()


def steps(loaded: LoadedModel, windows: np.ndarray) -> int:
    """Progress ticks of :func:`reference_log_probs`."""
    return loaded.config.num_hidden_layers + len(windows)

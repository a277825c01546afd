"""The stock twin: llama.cpp's own quantizer at the build's size, scored beside the build.

Every build shows what it gained over ``llama-quantize``:

1. The full-precision model, as loaded (before any transform or pruning), is written once to a
   float GGUF under the cache folder: the file a user would hand to ``llama-quantize``.
2. llama.cpp's dry run sizes each of llama-quantize's presets on it, without quantizing
   anything. The twin is the smallest preset whose tensor data is at least the build's GGUF's
   (the largest preset when ours is larger still).
3. It is quantized with the importance matrix the build used (the block matrices' mean squared
   inputs, what ``llama-imatrix`` collects by default), as ``llama-quantize --imatrix`` would,
   and scored in llama.cpp on the build's evaluation windows.

The same dry runs, on the budget before planning, give the plan its speed to hold
(:func:`stock_speed`): QuBLAST's plan decodes and prefills, as the kernel table predicts, no
slower than llama.cpp's own file nearest its size.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporters.gguf import write_gguf
from runtimes.llama_quantize import STOCK_FTYPES, ImatrixRequired, quantize_stock, stock_size, stock_tensors

from .errors import EdgequantError
from .measured import cache_path, code_of
from .models import LoadedModel
from .planning import Speed, StockSpeed

FLOAT32_UP_TO = 2_000_000_000  # parameters: larger references are written as F16 (an 8B model: 16 GB)
WRITING_CODE = ("exporters.gguf", "edgequant.adapters.base", "edgequant.models")  # what decides the file's bytes


@dataclass
class Twin:
    mix: str  # llama-quantize's preset, e.g. "Q4_K_M"
    path: Path
    tensor_bytes: int
    imatrix: bool  # quantized with the build's importance matrix

    @property
    def label(self) -> str:
        return f"llama.cpp {self.mix}" + (" + imatrix" if self.imatrix else "")

    def as_dict(self, params: int) -> dict:
        return {"mix": self.mix, "imatrix": self.imatrix, "label": self.label, "bytes": self.path.stat().st_size,
                "tensor_bytes": self.tensor_bytes, "bpw": self.tensor_bytes * 8 / params}


def reference_gguf(loaded: LoadedModel, tied: bool) -> Path:
    """The full-precision GGUF of ``loaded`` (written tensor by tensor on first use, then cached).

    ``tied``: the model came with its head tied to the embedding. A method that rotates the two
    apart unties them before this is written, while they are still equal; the file ties them
    again, as the model a user hands to ``llama-quantize`` has them. Above ``FLOAT32_UP_TO``
    parameters the weights are stored as F16, which holds a bf16 checkpoint's weights exactly
    between 2^-14 and 65504 in magnitude."""
    params = sum(p.numel() for p in loaded.model.parameters())
    dtype = np.float32 if params <= FLOAT32_UP_TO else np.float16
    was = loaded.config.tie_word_embeddings
    loaded.config.tie_word_embeddings = tied
    try:
        path = cache_path("twin", loaded, code_of(*WRITING_CODE), version("gguf").encode(), np.dtype(dtype).name.encode(),
                          suffix=".gguf")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_gguf(path, loaded, None, "full precision", dtype)
    finally:
        loaded.config.tie_word_embeddings = was
    return path


def imatrix_of(importance: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The block matrices' importance: what llama-imatrix collects by default (not the output)."""
    return {name: v for name, v in importance.items() if name.startswith("blk.")}


def choose_mix(sizes: list[tuple[str, int]], tensor_bytes: int) -> tuple[str, int]:
    """(preset, its tensor bytes): of ``sizes`` (:func:`preset_sizes`), the smallest preset with at
    least ``tensor_bytes`` of tensor data, or the largest of them. Where rows fall back to 32-wide
    blocks, presets can come out the same size; of those, the first in llama-quantize's order (the
    nominally larger) is taken."""
    return next(((m, n) for m, n in sizes if n >= tensor_bytes), sizes[-1])


def preset_sizes(source: Path, imatrix: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    """(preset, its tensor bytes) of llama-quantize's presets on ``source``, from its dry runs,
    smallest first; of presets of one size, the nominally larger first. Those that need an
    importance matrix are left out when there is none."""
    sizes = {}
    for mix in STOCK_FTYPES:
        try:
            sizes[mix] = stock_size(source, mix, imatrix=imatrix or None)
        except ImatrixRequired:  # an i-quant preset, and no importance matrix
            continue
    order = list(STOCK_FTYPES)  # largest first
    return sorted(sizes.items(), key=lambda kv: (kv[1], order.index(kv[0])))


@dataclass
class TwinSource:
    """Where the stock twin comes from: the full-precision GGUF and the importance matrix (set
    before the presets are first sized, as the sizes follow it)."""

    path: Path
    params: int  # of the full-precision model (the twin's bits per weight count over them)
    importance: dict | None = None
    _sizes: list[tuple[str, int]] | None = field(default=None, repr=False)

    @property
    def imatrix(self) -> dict[str, np.ndarray]:
        return imatrix_of(self.importance or {})

    def preset_sizes(self) -> list[tuple[str, int]]:
        """:func:`preset_sizes` of this source, dry-run once per build (the plan and the twin both ask)."""
        if self._sizes is None:
            self._sizes = preset_sizes(self.path, self.imatrix)
        return self._sizes


def stock_speed(source: TwinSource, tensor_bytes: int, speed: Speed) -> StockSpeed:
    """What llama.cpp's file nearest ``tensor_bytes`` in size costs the kernels, in ``speed``'s
    measures over its matrices: from llama.cpp's dry run, nothing quantized. (The nearest, not the
    next larger as for the twin: a larger file may afford types that prefill faster.)"""
    imatrix = source.imatrix
    try:
        mix, _ = min(source.preset_sizes(), key=lambda kv: abs(kv[1] - tensor_bytes))
        tensors = stock_tensors(source.path, mix, imatrix=imatrix or None)
    except (RuntimeError, OSError) as e:
        raise EdgequantError(f"llama.cpp's own quantizer failed on {source.path.name}: {e}") from None
    matrices = {t.name: (t.ggml_type, t.nbytes) for t in tensors if t.shape[1] > 1}
    return speed.of_stock(matrices, f"llama.cpp {mix}" + (" + imatrix" if imatrix else ""))


def make_twin(source: TwinSource, tensor_bytes: int, folder: Path) -> Twin:
    """llama.cpp's file at the build's size (:func:`choose_mix`), written into ``folder``."""
    imatrix = source.imatrix
    try:
        mix, size = choose_mix(source.preset_sizes(), tensor_bytes)
        path = Path(folder) / f"llama.cpp-{mix}.gguf"
        quantize_stock(source.path, path, mix, imatrix=imatrix or None, nthread=os.cpu_count() or 1)
    except (RuntimeError, OSError) as e:  # e.g. a full disk; llama.cpp's reason in one line
        raise EdgequantError(f"llama.cpp's own quantizer failed on {source.path.name}: {e}") from None
    return Twin(mix, path, size, bool(imatrix))

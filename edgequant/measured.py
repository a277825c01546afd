"""Measurements remembered on disk, under the cache folder, keyed by everything they depend on:
the model's weights, the text, the options, and the source of the code that measures them (so an
edited measuring module never reads back a stale result).

Two measurements are kept: the calibration statistics of a model on its calibration text (so
``edgequant plan`` and the builds after it calibrate once) and QuBLAST's sensitivity table.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from .assets import cache_dir
from .models import LoadedModel


def fingerprint(loaded: LoadedModel) -> hashlib._Hash:
    """A hash of the model: its config, every vector (norms, biases) and 16 rows of every matrix."""
    h = hashlib.sha256(loaded.config.to_json_string(use_diff=False).encode())
    for name, t in loaded.state():
        t = t.detach().float()
        h.update(name.encode())
        h.update((t if t.ndim < 2 else t[:: max(1, t.shape[0] // 16)]).contiguous().numpy().tobytes())
    return h


def code_of(*modules: str) -> bytes:
    """The source of the named modules (``edgequant.calibration``...), loaded already."""
    return b"".join(Path(sys.modules[m].__file__).read_bytes() for m in modules)


def cache_path(kind: str, loaded: LoadedModel, *parts: bytes, suffix: str) -> Path:
    """Where a ``kind`` of measurement of ``loaded`` keyed by ``parts`` lives."""
    h = fingerprint(loaded)
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return cache_dir() / kind / f"{loaded.name}-{h.hexdigest()[:20]}{suffix}"


def tensor_bytes(tensors: dict[str, object]) -> bytes:
    """The arrays (numpy or torch) of a dict, in key order, as one byte string for a key."""
    out = []
    for name in sorted(tensors):
        value = tensors[name]
        value = value.detach().numpy() if isinstance(value, torch.Tensor) else value
        out += [name.encode(), value.tobytes()]
    return b"".join(out)

"""QuaRot-style random Hadamard rotations: the rotation baseline for weight-and-activation quantization.

* the residual stream gets one randomised Hadamard matrix (order = hidden size), folded into
  the embedding, every matrix reading or writing the stream and the output head
  (:mod:`edgequant.rotations`);
* each KV group's value heads get a Hadamard matrix of order head_dim, folded into v and o
  (QuaRot's cross-head online Hadamard needs one of order n_heads, and 9 has none);
* each block's down input gets a randomised Hadamard online (simulation only; ``hadamard-folded``
  and builds leave it out).
"""

from __future__ import annotations

import time

import torch

from ..calibration import Calibration
from ..fakequant import Setting, Transformed
from ..models import LoadedModel
from ..progress import Progress
from ..rotations import hadamard, prepare, random_hadamard, rotate_residual, rotate_value_heads
from ..smoothing import kv_grouping

SEED = 0


def transform(loaded: LoadedModel, calibration: Calibration, setting: Setting, progress: Progress) -> Transformed:
    started = time.time()
    gen = torch.Generator().manual_seed(SEED)
    work = loaded.copy()
    model, family = work.model, work.adapter
    config = model.config
    _, head_dim = kv_grouping(config)
    with progress.step("hadamard: rotate"):
        prepare(model)
        rotate_residual(model, random_hadamard(config.hidden_size, gen))
        for layer in family.layers(model):
            rotate_value_heads(layer, config, [hadamard(head_dim)] * (family.module(layer, "k").out_features // head_dim))
    online = {family.path(i, "down"): random_hadamard(family.module(layer, "down").in_features, gen)
              for i, layer in enumerate(family.layers(model))}
    details = {"seconds": time.time() - started, "online": "down_proj input (simulation only)"}
    return Transformed(work, online, details)

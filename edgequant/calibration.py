"""Activation statistics from calibration text.

``importance`` is what llama.cpp calls an imatrix: for every quantized matrix, the mean square
of each input column's activation, E[x_j^2]. Weighting the rounding error of column j by it
approximates the error of the matrix's output, sum_j E[x_j^2] * dw_j^2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .models import LoadedModel


@dataclass
class ActivationStats:
    """Per quantized matrix (GGUF name), statistics of each input column over the calibration text."""

    importance: dict[str, np.ndarray]  # E[x^2]
    absmax: dict[str, torch.Tensor]  # max |x|


@torch.inference_mode()
def activation_stats(
    loaded: LoadedModel, windows: np.ndarray, progress: Callable[[], None] | None = None
) -> ActivationStats:
    """Statistics for every matrix fed by a ``torch.nn.Linear``.

    With tied embeddings the output head's inputs count for ``token_embd.weight``.
    """
    model = loaded.model
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    absmax: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            absmax[name] = torch.maximum(absmax.get(name, torch.zeros(x.shape[1])), x.abs().amax(0).float())

        return hook

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hf_name = f"{module_name}.weight"
            if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
                hf_name = "model.embed_tokens.weight"
            handles.append(module.register_forward_hook(hook_for(loaded.gguf_name(hf_name))))
    try:
        for window in windows:
            model(torch.from_numpy(window)[None], use_cache=False)
            if progress:
                progress()
    finally:
        for h in handles:
            h.remove()
    importance = {name: (s / counts[name]).float().numpy() for name, s in sums.items()}
    return ActivationStats(importance, absmax)

"""SpecQuant: smooth activation outliers into the weights, then cut the weights' high frequencies.

Stage 1 is SmoothQuant's migration (:func:`edgequant.smoothing.smooth`, ``alpha`` 0.5): per
input channel ``s = max|x|^alpha / max|W|^(1-alpha)``, folded into the norms (q/k/v, gate/up),
the value rows (o) and the up rows (down).

Stage 2, per output row of every block matrix: the real FFT along the input dimension, keep
the lowest-frequency bins that hold a share ``energy`` of the row's energy (Parseval: bins other
than DC and Nyquist count twice), zero the rest, transform back. Cutting high frequencies
lowers the row's peaks, so its quantization grid gets finer, at the cost of the cut itself.

Our choices where the paper (code unpublished) is not specific: ``energy="auto"`` (default)
picks, per row, the candidate share (1.0 = no cut, 0.9999 ... 0.95) whose *quantized* row is
closest to the original, each input column weighted by its activation energy E[x^2]; a
number applies that share to every row. The paper's online adaptive module is not built (it
would be an extra op in the runtimes); everything here is folded, so the files stay standard.
For a build (``--method specquant``), where llama.cpp rounds activations to 8 bits and weights
to the plan's ggml types, stage 1 uses scales searched against that rounding (QuBLAST's maps)
instead of one alpha, and the cuts are chosen for each matrix's ggml type.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..calibration import Calibration, activation_stats
from ..fakequant import Setting, Transformed, quantize_rows
from ..models import LoadedModel
from ..progress import Progress
from ..ggml_quants import get_type
from ..smoothing import search_scales, smooth

ALPHA = 0.5
ENERGIES = (1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.95)
CALIB_WINDOWS = 8

Quantizer = Callable[[torch.Tensor], torch.Tensor]  # (rows, in) float64 -> dequantized, same shape


def bins_kept(w: torch.Tensor, energy: float) -> torch.Tensor:
    """Per row, how many lowest-frequency rFFT bins hold ``energy`` of its energy."""
    f = torch.fft.rfft(w.double(), dim=1)
    weight = torch.full((f.shape[1],), 2.0, dtype=torch.float64)
    weight[0] = 1
    if w.shape[1] % 2 == 0:
        weight[-1] = 1
    e = f.abs().pow(2) * weight
    share = e.cumsum(1) / e.sum(1, keepdim=True).clamp(min=1e-300)
    return (share < energy - 1e-12).sum(1) + 1


def truncate(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``w`` with every row's rFFT bins from ``keep[row]`` on set to zero."""
    f = torch.fft.rfft(w.double(), dim=1)
    mask = torch.arange(f.shape[1])[None, :] < keep[:, None]
    return torch.fft.irfft(f * mask, n=w.shape[1], dim=1)


def low_pass(w: torch.Tensor, quantizer: Quantizer, importance: torch.Tensor | None,
             energies: tuple[float, ...] = ENERGIES) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated weight whose quantization is closest to ``w`` row by row, and each row's share.

    A single share in ``energies`` truncates every row at it."""
    w = w.double()
    imp = torch.ones(w.shape[1], dtype=torch.float64) if importance is None else importance.double()
    best, best_err = w, torch.full((w.shape[0],), float("inf"), dtype=torch.float64)
    chosen = torch.ones(w.shape[0], dtype=torch.float64)
    for energy in energies:
        cut = truncate(w, bins_kept(w, energy)) if energy < 1 else w
        if len(energies) == 1:
            return cut, chosen * energy
        err = ((quantizer(cut) - w).pow(2) * imp).sum(1)
        better = err < best_err
        best = torch.where(better[:, None], cut, best)
        best_err = torch.where(better, err, best_err)
        chosen = torch.where(better, torch.tensor(energy, dtype=torch.float64), chosen)
    return best, chosen


def transform(loaded: LoadedModel, calibration: Calibration, setting: Setting, progress: Progress,
              energy: float | str = "auto", alpha: float = ALPHA, ggml_types: dict[str, str] | None = None) -> Transformed:
    """Smoothed and low-passed copy of the model, for the simulation's ``setting``, or, given
    ``ggml_types`` (a build's plan), for the files: the scales are then searched against
    llama.cpp's rounding (QuBLAST's maps, :func:`edgequant.smoothing.search_scales`) and the
    cuts chosen for each matrix's ggml type."""
    work = loaded.copy()
    windows = calibration.windows[:CALIB_WINDOWS]
    if ggml_types:
        with progress.step("specquant: scaling maps for the plan", loaded.config.num_hidden_layers) as tick:
            search_scales(work, windows, ggml_types, progress=tick)
    else:
        with progress.step("specquant: activation ranges", work.config.num_hidden_layers) as tick:
            smooth(work, activation_stats(work, windows, tick).absmax, alpha)
    with progress.step("specquant: energy of the smoothed inputs", work.config.num_hidden_layers) as tick:
        importance = activation_stats(work, windows, tick).importance
    bits = setting.wbits or 8
    quantizers = _ggml_rounding(ggml_types) if ggml_types else (lambda _name: lambda w: quantize_rows(w.float(), bits).double())
    energies = ENERGIES if energy == "auto" else (float(energy),)
    params = dict(work.model.named_parameters())
    rows, shares, kept, cut_error = 0, 0.0, 0.0, []
    layer_names = [(n, loaded.gguf_name(n)) for n, p in params.items() if p.ndim == 2 and loaded.adapter.block_index(n) >= 0]
    with progress.step("specquant: low-frequency truncation", len(layer_names)) as tick:
        for hf_name, name in layer_names:
            p = params[hf_name]
            imp = importance.get(name)
            new, share = low_pass(p.detach(), quantizers(name), None if imp is None else torch.from_numpy(imp), energies)
            cut_error.append(float((new - p.detach().double()).norm() / p.detach().double().norm()))
            kept += _kept_fraction(new)
            with torch.no_grad():
                p.copy_(new)
            rows += p.shape[0]
            shares += float(share.sum())
            tick()
    details = {"alpha": "searched per block (QuBLAST maps)" if ggml_types else alpha, "energy": energy, "mean_energy_kept": shares / rows,
               "mean_bins_kept": kept / len(layer_names), "relative_cut_error_mean": float(np.mean(cut_error)),
               "relative_cut_error_max": float(np.max(cut_error))}
    return Transformed(work, {}, details)


def _ggml_rounding(types: dict[str, str]) -> Callable[[str], Quantizer]:
    def for_matrix(name: str) -> Quantizer:
        qtype = get_type(types[name])
        return lambda w: torch.from_numpy(qtype.dequantized(w.float().numpy(), None)).double()

    return for_matrix


def _kept_fraction(cut: torch.Tensor) -> float:
    """Share of rFFT bins left non-zero by the cut (averaged over rows)."""
    f = torch.fft.rfft(cut.double(), dim=1)
    return float((f.abs() > 1e-9 * f.abs().amax(1, keepdim=True).clamp(min=1e-300)).double().mean())

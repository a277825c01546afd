"""Activation statistics from calibration text.

``importance`` is what llama.cpp calls an imatrix: for every quantized matrix, the mean square
of each input column's activation, E[x_j^2]. Weighting the rounding error of column j by it
approximates the error of the matrix's output, sum_j E[x_j^2] * dw_j^2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .models import LoadedModel
from .walker import Walk, run_block


@dataclass
class Calibration:
    """What the quantization methods get from the calibration text."""

    windows: np.ndarray  # (n, ctx) token windows
    importance: dict[str, np.ndarray]  # E[x^2] per input column by GGUF name; empty when disabled
    sensitivity_tokens: int = 512  # the first tokens that per-part sensitivity (QuBLAST, joint) is measured on
    sensitivity: str = "auto"  # how: measured / fisher / auto (:func:`edgequant.sensitivity.how_for`)

    def sensitivity_windows(self) -> np.ndarray:
        """The first ``sensitivity_tokens`` tokens: whole windows, or the start of the first one."""
        ctx = self.windows.shape[1]
        return self.windows[: max(1, self.sensitivity_tokens // ctx), : min(ctx, self.sensitivity_tokens)]


@dataclass
class ActivationStats:
    """Per quantized matrix (GGUF name), statistics of each input column over the calibration text."""

    importance: dict[str, np.ndarray]  # E[x^2]
    absmax: dict[str, torch.Tensor]  # max |x|


@torch.inference_mode()
def activation_stats(
    loaded: LoadedModel, windows: np.ndarray, progress: Callable[[], None] | None = None
) -> ActivationStats:
    """Statistics for every matrix fed by a ``torch.nn.Linear``, from one walk through the blocks
    (``progress`` ticks once per block).

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

    head = loaded.adapter.head(model)
    head_stats = hook_for(loaded.linear_weight_name(next(n for n, m in model.named_modules() if m is head)))
    handles = [module.register_forward_hook(hook_for(loaded.linear_weight_name(module_name)))
               for module_name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]
    try:
        hidden = Walk(loaded, windows, progress).final_hidden()
    finally:
        for h in handles:
            h.remove()
    for h in hidden:  # the head's input is all it needs (its vocabulary-wide output would cost most of the pass)
        head_stats(head, (loaded.adapter.final_norm(model)(h),), None)
    importance = {name: (s / counts[name]).float().numpy() for name, s in sums.items()}
    return ActivationStats(importance, absmax)


def cached_activation_stats(loaded: LoadedModel, windows: np.ndarray,
                            progress: Callable[[], None] | None = None) -> ActivationStats:
    """:func:`activation_stats`, remembered under the cache dir by the model, the windows and this
    module's code: ``edgequant plan`` and every build after it on the same text calibrate once."""
    from safetensors.torch import load_file, save_file

    from .atomic import atomic_path
    from .measured import cache_path, code_of

    path = cache_path("calibration", loaded, code_of(__name__, "edgequant.walker"), windows.tobytes(), suffix=".safetensors")
    if path.is_file():
        saved = load_file(path)
        for _ in range(loaded.config.num_hidden_layers) if progress else ():  # the step is done: its bar says so
            progress()
        pick = lambda kind: {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(kind + "/")}  # noqa: E731
        return ActivationStats({k: v.numpy() for k, v in pick("importance").items()}, pick("absmax"))
    stats = activation_stats(loaded, windows, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({**{f"importance/{k}": torch.from_numpy(v) for k, v in stats.importance.items()},
                   **{f"absmax/{k}": v.contiguous() for k, v in stats.absmax.items()}}, str(tmp))
    return stats


@dataclass
class BlockHessians:
    """Hessians H = E[x x^T] of the inputs of one block's matrices, by GGUF name."""

    index: int  # block index; -1 for the output head after the last block
    hessians: dict[str, torch.Tensor]
    linears: dict[str, torch.nn.Linear]  # the layers the Hessians are of, by the same names


@torch.inference_mode()
def sequential_hessians(loaded: LoadedModel, windows: np.ndarray,
                        rounded: Callable[[BlockHessians], dict[str, torch.Tensor]] | None = None):
    """Walk the model's blocks in order, holding one block's activations and Hessians at a time.

    Yields a :class:`BlockHessians` per block, then one for the output head (``token_embd.weight``
    when tied, else ``output.weight``), measured from the final hidden states. With ``rounded``,
    each block's Hessians are handed to it and it returns the block's rounded weights by GGUF
    name: the calibration stream passes the block with those, then the block's own weights are
    put back. So every block is measured on what the earlier blocks hand over *quantized*
    (GPTQ's sequential calibration), and the model is left as it was.
    """
    model, family = loaded.model, loaded.adapter
    walk = Walk(loaded, windows)
    for stop in walk:
        linears = {loaded.gguf_name(family.in_block(stop.index, f"{sub_name}.weight")): module
                   for sub_name, module in stop.block.named_modules() if isinstance(module, torch.nn.Linear)}
        measured = BlockHessians(stop.index, block_input_grams(stop.block, stop.inputs, stop.kwargs, linears), linears)
        yield measured
        if rounded:
            kept = _swap(linears, rounded(measured))
            try:
                stop.outputs = stop.run()
            finally:
                _swap(linears, kept)
    head = "token_embd.weight" if loaded.config.tie_word_embeddings else "output.weight"
    x = torch.cat([family.final_norm(model)(h).reshape(-1, h.shape[-1]) for h in walk.hidden]).double()
    measured = BlockHessians(-1, {head: (x.T @ x / x.shape[0]).float()}, {head: family.head(model)})
    yield measured
    if rounded:
        rounded(measured)


def _swap(linears: dict[str, torch.nn.Linear], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put ``weights`` in the linears in place of their weights; returns the weights that were there.
    The tensors themselves change places, nothing is copied (a copy of an 8B block's weights is 0.9 GB)."""
    before = {}
    for name, w in weights.items():
        before[name] = linears[name]._parameters["weight"]
        linears[name]._parameters["weight"] = w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, False)
    return before


def block_input_grams(block, hidden: list[torch.Tensor], kwargs: dict, modules: dict,
                      seen_as=lambda module, x: x, dtype=torch.float32) -> dict:
    """E[x x^T] of the inputs of ``modules`` (key -> module inside ``block``) while ``block`` runs
    on ``hidden``, in float32 (or ``dtype``); ``seen_as(module, x)`` is the input as the module
    uses it. Modules fed the very same tensor (q/k/v, gate/up) share one sum, so one tensor."""
    sums, counts = {}, {}
    same_input: dict = {}  # key -> the key whose sum it shares
    last: dict = {}  # the input most recently seen, as given and as used, and whose sum took it

    def hook_for(key):
        def hook(module, args):
            x = seen_as(module, args[0])
            if last.get("given") is args[0] and last.get("used") is x:
                same_input[key] = last["key"]
                return
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            sums[key] = _add_gram(sums.get(key), flat)
            counts[key] = counts.get(key, 0) + flat.shape[0]
            last.update(given=args[0], used=x, key=key)
        return hook

    hooks = [module.register_forward_pre_hook(hook_for(key)) for key, module in modules.items()]
    try:
        for h in hidden:
            run_block(block, h, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    grams = {key: _symmetric(total).div_(counts[key]) for key, total in sums.items()}
    return {key: grams[same_input.get(key, key)] for key in modules if key in sums or key in same_input}


GRAM_ROWS = 1024  # rows of a Gram sum updated by one matrix product


def _add_gram(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + x^T x`` in ``total``'s memory (a new sum if None), its upper triangle only: the
    products of ``GRAM_ROWS`` rows at a time from the diagonal on, added in place by the matrix
    product itself (an 8960-wide sum: 55% of the work). (A float64 sum added to per window once
    cost 19 s a block on Qwen2.5-1.5B, the full product 15 s more.)"""
    n = x.shape[1]
    if total is None:
        total = torch.zeros(n, n, dtype=x.dtype)
    for r in range(0, n, GRAM_ROWS):
        total[r : r + GRAM_ROWS, r:].addmm_(x[:, r : r + GRAM_ROWS].T, x[:, r:])
    return total


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    """``upper`` (from :func:`_add_gram`) made whole, in place: each row band mirrored below, and
    each diagonal block made exactly symmetric (its two triangles came from different sums)."""
    for r in range(0, len(upper), GRAM_ROWS):
        band = slice(r, r + GRAM_ROWS)
        upper[band, band] = upper[band, band].triu() + upper[band, band].triu(1).T
        upper[r + GRAM_ROWS :, band] = upper[band, r + GRAM_ROWS :].T
    return upper


@torch.inference_mode()
def linear_inputs(model: torch.nn.Module, windows: np.ndarray, paths: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """The inputs of the modules at ``paths`` (e.g. ``model.layers.3.mlp.down_proj``), up to
    ``max_tokens`` rows each, from running the whole model on ``windows``."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

    def hook_for(path):
        def hook(_module, inputs, _output):
            seen[path].append(inputs[0].reshape(-1, inputs[0].shape[-1]).float())

        return hook

    handles = [model.get_submodule(p).register_forward_hook(hook_for(p)) for p in paths]
    try:
        for window in windows[: max(1, -(-max_tokens // windows.shape[1]))]:
            model(torch.from_numpy(window)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v)[:max_tokens] for p, v in seen.items()}

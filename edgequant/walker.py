"""The block walker: every per-block step of a build is one walk through the decoder blocks.

A walk carries the hidden states of some token windows through the model's blocks in order.
At each block it stops (:class:`Stop`) with the block in memory (mapped from its file when the
model is streamed, :mod:`edgequant.blocks`) and the block's inputs in hand; the caller does its
work there: gathers statistics and Hessians, folds scaling maps, prunes and refits, rounds. When
the caller moves on, the walk runs the block on its inputs, or takes the outputs the caller set
(a quantized stream, a pruned variant, a removed block passing its inputs on), and unmaps it.
A streamed model has one block's weights in memory at a time, and the walk one block's inputs
and outputs, whatever the depth. Each block is called with its own keyword arguments, as the
model's forward calls it (:func:`block_inputs`). After the last block, :attr:`Walk.hidden` holds the final hidden
states (before the final norm); it stays None if the loop is left early.

The hidden states stay float32, as the blocks make them: a block's input is the previous
block's exact output, so a walk gives the same figures as running the whole model. The walk and
the blocks run in inference mode: a stop's inputs and keyword arguments are inference tensors, to
be cloned before autograd or an in-place change. The windows must all be the same length (the
keyword arguments, the causal mask among them, are the first window's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import adapter_of


class _Stop(Exception):
    pass


@torch.inference_mode()
def block_inputs(model: torch.nn.Module, windows: np.ndarray) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states entering the first decoder block, one per window, and each block's keyword
    arguments (rotary embeddings, attention mask...), which differ between blocks in models that
    mix sliding-window and global attention layers. The model runs with every block's forward
    replaced by one that records its arguments and passes its input on; it stops before the final
    norm on the first window, at the first block on the others. No block computes anything, and
    the head never runs."""
    family = adapter_of(model)
    layers = family.layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: list[dict] = [{} for _ in layers]

    def recorder(i: int):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h)
                if len(hidden) > 1:  # every window has the first's length, so the blocks' arguments are known
                    raise _Stop
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
            return h
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute, over the class's forward
    handle = family.final_norm(model).register_forward_pre_hook(_raise_stop)
    try:
        for window in windows:
            try:
                model(torch.from_numpy(window)[None], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
    return hidden, kwargs


def _raise_stop(*_args):
    raise _Stop


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block's output hidden states (blocks return a tuple in some transformers versions)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Stop:
    """The walk at block ``index``: the block (in memory until the walk moves on) and its inputs."""

    index: int
    block: torch.nn.Module
    inputs: list[torch.Tensor]  # one per window
    kwargs: dict  # this block's
    outputs: list[torch.Tensor] | None = None  # set to hand the next block these instead of the block's own

    def run(self, block: torch.nn.Module | None = None, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``block`` (default: this one) run on ``inputs`` (default: this block's)."""
        block = self.block if block is None else block
        return [run_block(block, h, self.kwargs) for h in (self.inputs if inputs is None else inputs)]


class Walk:
    """``for stop in Walk(loaded, windows): ...`` visits every block in order (see the module's text).

    ``target`` is a :class:`~edgequant.models.LoadedModel` (its blocks mapped while visited) or a
    model in memory. ``progress`` is called as each block is left."""

    def __init__(self, target, windows: np.ndarray, progress: Callable[[], None] | None = None):
        from .models import LoadedModel

        loaded = isinstance(target, LoadedModel)
        self.model = target.model if loaded else target
        self._mapped = target.block if loaded else lambda _i: nullcontext()
        self.windows, self.progress = windows, progress
        self.hidden: list[torch.Tensor] | None = None  # the last block's outputs, once walked
        self.kwargs: list[dict] = []  # every block's keyword arguments, once the walk has begun

    @torch.inference_mode()
    def __iter__(self) -> Iterator[Stop]:
        hidden, self.kwargs = block_inputs(self.model, self.windows)
        for i, block in enumerate(adapter_of(self.model).layers(self.model)):
            with self._mapped(i):
                stop = Stop(i, block, hidden, self.kwargs[i])
                yield stop
                hidden = stop.run() if stop.outputs is None else stop.outputs
            if self.progress:
                self.progress()
        self.hidden = hidden

    def final_hidden(self) -> list[torch.Tensor]:
        """Walk every block doing nothing else; the final hidden states."""
        for _ in self:
            pass
        return self.hidden

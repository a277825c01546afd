"""Decoder blocks kept on disk: a model whose blocks are float32 in memory only while worked on.

A streamed build never holds the whole float32 model. Its embedding, final norm and output
head stay in memory; each decoder block's parameters live in a float32 file of its own (under
the cache folder's ``spill/``), and are *mapped* into the model while the block is worked on:

* a forward pass through a block maps it on the way in and unmaps it on the way out, so any
  code that runs the model (calibration hooks, the sensitivity tail, the simulation) works as
  it does on a model in memory, one block resident at a time;
* code that reads or changes a block's weights directly does it inside ``with store.block(i)``.
  The tensors are views of the mapped file, so changes made to them (folded scaling maps) are
  kept when the block is unmapped.

Outside those, a block's parameters are tensors on torch's ``meta`` device: shapes, no data.
The peak RSS of a walk is then the resident parts plus the block being worked on, whatever the
depth. (Pages of an unmapped file leave the process: the kernel's page cache keeps them while
memory is free, and reads them back from disk when it is not.)
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .adapters import adapter_of
from .errors import EdgequantError
from .memory import trim_heap


@dataclass(frozen=True)
class _Slot:
    module: str  # path inside the block, e.g. "mlp.down_proj"
    name: str  # "weight" / "bias"
    shape: tuple[int, ...]
    offset: int  # in float32 elements


class BlockStore:
    """The decoder blocks of ``model`` (built on the meta device), each in a float32 file in ``folder``."""

    def __init__(self, model: torch.nn.Module, folder: Path):
        self.family = adapter_of(model)
        self.layers = self.family.layers(model)
        self.folder = Path(folder)
        self.slots: dict[int, list[_Slot]] = {}
        self.depth: Counter[int] = Counter()
        self.maps: dict[int, np.memmap] = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            layer.register_forward_hook(lambda _m, _a, _o, i=i: self._exit(i, trim=i == last))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @classmethod
    def create(cls, model: torch.nn.Module, fetch: Callable[[str], np.ndarray]) -> "BlockStore":
        """Spill every block of ``model`` (on the meta device) to disk, each parameter read with
        ``fetch(state-dict name)``, one tensor in memory at a time."""
        from .assets import cache_dir

        spill = cache_dir() / "spill"
        spill.mkdir(parents=True, exist_ok=True)
        needed = 4 * sum(p.numel() for p in adapter_of(model).layers(model).parameters())
        free = shutil.disk_usage(spill).free
        if needed > free:
            raise EdgequantError(f"spilling the model's blocks needs {needed / 1e6:.0f} MB on the disk of {spill}; "
                                 f"{free / 1e6:.0f} MB are free")
        store = cls(model, Path(tempfile.mkdtemp(prefix="blocks-", dir=spill)))
        for i in range(len(store.layers)):
            store._write(i, lambda name, i=i: fetch(store.family.in_block(i, name)))
        return store

    def _path(self, i: int) -> Path:
        return self.folder / f"block-{i}.f32"

    def _write(self, i: int, fetch: Callable[[str], np.ndarray]) -> None:
        slots, offset = [], 0
        try:
            with open(self._path(i), "wb") as f:
                for name, param in self.layers[i].named_parameters():
                    module, _, pname = name.rpartition(".")
                    array = np.ascontiguousarray(fetch(name), dtype=np.float32)
                    if array.shape != tuple(param.shape):
                        raise EdgequantError(f"block {i}: {name} is {array.shape}, expected {tuple(param.shape)}")
                    array.tofile(f)
                    slots.append(_Slot(module, pname, tuple(param.shape), offset))
                    offset += array.size
        except OSError as e:
            if e.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.folder).free
                raise EdgequantError(f"no space left to spill the model's blocks to {self.folder} "
                                     f"({free / 1e6:.0f} MB free)") from None
            raise
        self.slots[i] = slots

    @contextmanager
    def block(self, i: int) -> Iterator[torch.nn.Module]:
        """Block ``i`` with its parameters mapped from disk (changes to them are kept)."""
        self._enter(i)
        try:
            yield self.layers[i]
        finally:
            self._exit(i, trim=True)

    def _enter(self, i: int) -> None:
        self.depth[i] += 1
        if self.depth[i] == 1:
            self.maps[i] = mm = np.memmap(self._path(i), np.float32, "r+")
            for s in self.slots[i]:
                n = int(np.prod(s.shape))
                self._set(i, s, torch.from_numpy(mm[s.offset : s.offset + n]).view(s.shape))

    def _exit(self, i: int, trim: bool = False) -> None:
        """Unmap block ``i`` if nothing else holds it; with ``trim``, then give the free heap back
        (a walk leaving a block, a whole forward pass leaving the last one: the temporaries of
        one block or one pass, not each allocation, are faulted in again)."""
        self.depth[i] -= 1
        if self.depth[i] == 0:
            for s in self.slots[i]:
                self._set(i, s, torch.empty(s.shape, device="meta"))
            self.maps.pop(i).flush()
            if trim:
                trim_heap()

    def _set(self, i: int, s: _Slot, t: torch.Tensor) -> None:
        module = self.layers[i].get_submodule(s.module) if s.module else self.layers[i]
        module._parameters[s.name] = torch.nn.Parameter(t, requires_grad=t.device.type != "meta")

    def close(self) -> None:
        """Delete the blocks' files now (else when the store is collected, or at exit)."""
        self._remove()

    @property
    def nbytes(self) -> int:
        return sum(self._path(i).stat().st_size for i in self.slots)

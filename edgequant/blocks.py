"""Decoder blocks kept on disk: a model whose blocks are float32 in memory only while worked on.

A streamed build never holds the whole float32 model. Each decoder block's parameters live in
a float32 file of its own (under the cache folder's ``spill/``), and are *mapped* into the model
while the block is worked on:

* a forward pass through a block maps it on the way in and unmaps it on the way out, so any
  code that runs the model (calibration hooks, the sensitivity tail, the simulation) works as
  it does on a model in memory, one block resident at a time;
* code that reads or changes a block's weights directly does it inside ``with store.block(i)``.
  The tensors are views of the mapped file, so changes made to them (folded scaling maps) are
  kept when the block is unmapped.

Outside those, a block's parameters are tensors on torch's ``meta`` device: shapes, no data.

The embedding and the output head (``keep``) are files too, mapped for the whole build, but
their pages are handed back to the kernel whenever ``block(i)`` is left: a forward pass touches
them again, a block's own work (a walk's stop) does not. For Llama-3.1-8B they are 2.1 GB each
in float32, which sat beside the GPTQ stage's largest block. The norms stay in memory.

The peak RSS of a walk is then the small parts plus the block being worked on, whatever the
depth. (Pages of an unmapped file leave the process: the kernel's page cache keeps them while
memory is free, and reads them back from disk when it is not.)
"""

from __future__ import annotations

import mmap
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
from .errors import EdgequantError, disk_full_as_error
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
        self.kept: list[mmap.mmap] = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            layer.register_forward_hook(lambda _m, _a, _o, i=i: self._exit(i, trim=i == last))
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    @classmethod
    def create(cls, model: torch.nn.Module, fetch: Callable[[str], np.ndarray]) -> "BlockStore":
        """Spill every block of ``model`` (on the meta device) to disk, each parameter read with
        ``fetch(state-dict name)``, one tensor in memory at a time."""
        from .spill import spill_dir

        spill = spill_dir()
        needed = 4 * sum(p.numel() for p in model.parameters())
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
        with self._spilling(), open(self._path(i), "wb") as f:
            for name, param in self.layers[i].named_parameters():
                module, _, pname = name.rpartition(".")
                array = np.ascontiguousarray(fetch(name), dtype=np.float32)
                if array.shape != tuple(param.shape):
                    raise EdgequantError(f"block {i}: {name} is {array.shape}, expected {tuple(param.shape)}")
                array.tofile(f)
                slots.append(_Slot(module, pname, tuple(param.shape), offset))
                offset += array.size
        self.slots[i] = slots

    def keep(self, name: str, array: np.ndarray) -> torch.Tensor:
        """``array`` (a part outside the blocks) as a tensor mapped from a file of its own, whose
        pages are handed back each time a block is left (see the module's text)."""
        path = self.folder / f"{name}.f32"
        with self._spilling():
            np.ascontiguousarray(array, dtype=np.float32).tofile(path)
        with open(path, "r+b") as f:
            kept = mmap.mmap(f.fileno(), 0)
        self.kept.append(kept)
        return torch.from_numpy(np.frombuffer(kept, np.float32).reshape(array.shape))

    def _spilling(self):
        return disk_full_as_error(self.folder, "to spill the model's weights to")

    @contextmanager
    def block(self, i: int) -> Iterator[torch.nn.Module]:
        """Block ``i`` with its parameters mapped from disk (changes to them are kept)."""
        self._enter(i)
        try:
            yield self.layers[i]
        finally:
            self._exit(i, trim=True)
            self._release_kept()

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

    def _release_kept(self) -> None:
        """Hand the kept parts' pages back (a block's own work is done without them; a forward
        pass, which reads the head after the last block, does not come through here)."""
        for kept in self.kept:
            kept.madvise(mmap.MADV_DONTNEED)

    def _set(self, i: int, s: _Slot, t: torch.Tensor) -> None:
        module = self.layers[i].get_submodule(s.module) if s.module else self.layers[i]
        module._parameters[s.name] = torch.nn.Parameter(t, requires_grad=t.device.type != "meta")

    def close(self) -> None:
        """Delete the files now (else when the store is collected, or at exit). The kept parts'
        files go when the model's tensors of them do."""
        self.kept.clear()
        self._remove()

    @property
    def nbytes(self) -> int:
        return sum(self._path(i).stat().st_size for i in self.slots)

"""The rounded model kept on disk until it is written: each matrix's ggml bytes in a file of its own.

A method rounds one matrix at a time, and the exporter writes one tensor at a time; in between,
the codes of the whole model wait. For an 8B model at 4.5 bits that is 4.5 GB, which, held in
memory, sat on top of the GPTQ stage's working set (a 14336-wide Hessian factored in float64)
and took the build past 12 GB. A :class:`CodeStore` writes each matrix's bytes to the cache's
``spill/`` folder as soon as they are made, and hands them back as a read-only map of their file:
only the tensor being written (or decoded) is resident, and only while something holds it.
The files are deleted with the store (or at exit).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .errors import disk_full_as_error
from .ggml_quants import EncodedTensor


class CodeStore(Mapping):
    """GGUF name -> :class:`EncodedTensor`, the bytes on disk. Set an entry to spill it."""

    def __init__(self, folder: Path | None = None):
        if folder is None:
            from .spill import spill_dir

            folder = Path(tempfile.mkdtemp(prefix="codes-", dir=spill_dir()))
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, tuple[str, Path, np.dtype, tuple[int, ...]]] = {}
        self._numbers = itertools.count()
        self._remove = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def __setitem__(self, name: str, tensor: EncodedTensor) -> None:
        path = self.folder / f"{next(self._numbers)}.bin"  # a new file: a map of the one replaced may live on
        data = np.ascontiguousarray(tensor.data)
        with disk_full_as_error(self.folder, "to keep the rounded model in"):
            data.tofile(path)
        if name in self._entries:
            self._entries[name][1].unlink()
        self._entries[name] = (tensor.ggml_type, path, data.dtype, data.shape)

    def __getitem__(self, name: str) -> EncodedTensor:
        ggml_type, path, dtype, shape = self._entries[name]
        return EncodedTensor(ggml_type, np.memmap(path, dtype, "r", shape=shape))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Delete the files now (else when the store is collected, or at exit)."""
        self._remove()

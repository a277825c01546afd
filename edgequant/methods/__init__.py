"""Quantization methods. Each is one module with a ``quantize`` function of this shape:

    quantize(loaded, plan, importance, progress) -> {GGUF name: EncodedTensor}

``plan`` gives each matrix its ggml type; ``importance`` (may be empty) gives E[x^2] per input
column from calibration. The result is the exact bytes that the exporters write.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from ..errors import EdgequantError
from ..ggml_quants import EncodedTensor
from ..models import LoadedModel
from ..planning import Plan
from . import rtn


class Quantize(Protocol):
    def __call__(
        self,
        loaded: LoadedModel,
        plan: Plan,
        importance: dict[str, np.ndarray],
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, EncodedTensor]: ...


METHODS: dict[str, Quantize] = {"rtn": rtn.quantize}


def get_method(name: str) -> Quantize:
    try:
        return METHODS[name]
    except KeyError:
        raise EdgequantError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

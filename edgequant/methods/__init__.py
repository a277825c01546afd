"""Quantization methods. Each is one module with a ``quantize`` function of this shape:

    quantize(loaded, plan, calibration, progress) -> {GGUF name: EncodedTensor}

``plan`` gives each matrix its ggml type; ``calibration`` holds the calibration token windows
and E[x^2] per input column (may be empty). The result is the exact bytes that the exporters
write. ``loaded.model`` is the full-precision reference: a method must not change it.
"""

from __future__ import annotations

from typing import Callable, Protocol

from ..calibration import Calibration
from ..errors import EdgequantError
from ..ggml_quants import EncodedTensor
from ..models import LoadedModel
from ..planning import Plan
from . import gptq, rtn


class Quantize(Protocol):
    def __call__(
        self,
        loaded: LoadedModel,
        plan: Plan,
        calibration: Calibration,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, EncodedTensor]: ...


METHODS: dict[str, Quantize] = {"rtn": rtn.quantize, "gptq": gptq.quantize}


def get_method(name: str) -> Quantize:
    try:
        return METHODS[name]
    except KeyError:
        raise EdgequantError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

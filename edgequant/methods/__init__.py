"""Quantization methods, each one module, registered here as a :class:`Method`.

Every method rounds: ``quantize(loaded, plan, calibration, progress) -> {GGUF name: EncodedTensor}``.
``plan`` gives each matrix its ggml type; ``calibration`` holds the calibration token windows
and E[x^2] per input column (may be empty). The result is the exact bytes that the exporters
write. ``loaded.model`` is the full-precision reference: a method must not change it.

A method may also choose the plan itself (``allocate``, from measurements, within a byte
budget) and fold an equivalence transform into a copy of the model before rounding
(``transform``). Methods without ``allocate`` get the greedy prior of :mod:`edgequant.planning`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..calibration import Calibration
from ..errors import EdgequantError
from ..ggml_quants import EncodedTensor
from ..models import LoadedModel
from ..planning import Plan
from . import gptq, qublast, rtn


class Quantize(Protocol):
    def __call__(
        self,
        loaded: LoadedModel,
        plan: Plan,
        calibration: Calibration,
        progress: Callable[[str], None] | None = None,
    ) -> dict[str, EncodedTensor]: ...


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    quantize: Quantize
    allocate: Callable | None = None  # (loaded, matrices, other_params, max_bytes, calibration, progress) -> (Plan, table)
    transform: Callable | None = None  # (loaded, plan, calibration, progress) -> (LoadedModel copy, report rows)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("qublast", "sensitivity-planned mixed precision + activation scaling maps + GPTQ",
               gptq.quantize, qublast.allocate, qublast.transform),
        Method("qublast-rtn", "QuBLAST with round-to-nearest as the rounding step",
               rtn.quantize, qublast.allocate, qublast.transform),
        Method("gptq", "GPTQ (Hessian error compensation) on the greedy mix", gptq.quantize),
        Method("rtn", "round to nearest on the importance-weighted grid, greedy mix", rtn.quantize),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise EdgequantError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

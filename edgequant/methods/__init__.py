"""Quantization methods, each one module, registered here as a :class:`Method`.

Every method rounds: ``quantize(loaded, plan, calibration, progress) -> {GGUF name: EncodedTensor}``,
a :class:`..codestore.CodeStore` (the bytes wait on disk for the exporter). ``plan`` gives each
matrix its ggml type; ``calibration`` holds the calibration token windows and E[x^2] per input
column (may be empty). The result is the exact bytes that the exporters
write. ``quantize`` leaves ``loaded.model`` as it found it.

A method may also choose the plan itself (``allocate``, from measurements, within a byte
budget), or the pruning and the plan together (``search``, returning a :class:`.joint.Choice`), and fold an equivalence transform into the model before rounding
(``transform``, returning the model to round and details for the report). The build owns the
model it hands to ``transform``: a transform may change it in place (QuBLAST's maps do) or
return a new one. Methods without ``allocate``
get the greedy prior of :mod:`edgequant.planning`. A method that ``unties`` (the Hadamard
baseline) gets its own output head before planning, so the plan and the budget count both
matrices; RUQuant instead leaves a tied model's residual stream alone.

The activation-outlier methods (SpecQuant, RUQuant, the Hadamard baseline) are written for
the WxAy simulation (:mod:`edgequant.activation_quant`); :func:`folded` turns a deployable one
(SpecQuant's, Hadamard's, ``ruquant.folded_transform``) into a build transform: tuned for the
runtimes' 8-bit activations, with what must stay online left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from ..calibration import Calibration
from ..errors import EdgequantError
from ..codestore import CodeStore
from ..models import LoadedModel
from ..planning import Plan
from ..fakequant import Setting
from . import gptq, hadamard, joint, qublast, rtn, ruquant, specquant

DEPLOYED = Setting(wbits=4, abits=8)  # what llama.cpp and ORT run: low-bit weights, 8-bit activations


class Quantize(Protocol):
    def __call__(
        self,
        loaded: LoadedModel,
        plan: Plan,
        calibration: Calibration,
        progress: Callable[[str], None] | None = None,
    ) -> CodeStore: ...


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    quantize: Quantize
    allocate: Callable | None = None  # (loaded, matrices, other_params, max_bytes, calibration, progress, speed) -> (Plan, table)
    transform: Callable | None = None  # (loaded, plan, calibration, progress) -> (model to round, details dict)
    search: Callable | None = None  # (loaded, matrices, other_params, max_bytes, calibration, progress, speed) -> joint.Choice
    streams: bool = False  # works block by block on a streamed model (:mod:`edgequant.blocks`); else loaded whole
    unties: bool = False  # the transform needs separate embedding and output matrices
    rotates: bool = False  # the transform rotates the residual stream or the value heads
    activation_aware: bool = False  # also report the torch simulation with 8-bit activations (W4A8)


def folded(transform, options: Callable[[LoadedModel, Plan], dict] = lambda loaded, plan: {}):
    """A build transform ``(loaded, plan, calibration, progress) -> (model copy, details)`` from a
    deployable simulation transform, run for the deployed regime with ``options(loaded, plan)``. Online
    transforms are dropped: the copy is exact without them."""

    def run(loaded, plan, calibration, progress):
        done = transform(loaded, calibration, DEPLOYED, progress, **options(loaded, plan))
        return done.work, {**done.details, "online": "none (left out of the exported files)"}

    return run


def _ruquant_options(loaded: LoadedModel, plan: Plan) -> dict:
    """A tied output head stays tied: rotating the residual stream would need a second
    vocab x hidden matrix in the file (21% of the default model), so only the value heads turn."""
    return {"residual": not loaded.config.tie_word_embeddings}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("qublast", "sensitivity-planned mixed precision + activation scaling maps + GPTQ",
               gptq.quantize, qublast.allocate, qublast.transform, streams=True),
        Method("joint", "structural pruning + mixed precision searched together against the output's KL, "
               "then QuBLAST's scaling maps and GPTQ", gptq.quantize, transform=qublast.transform, search=joint.search),
        Method("qublast-rtn", "QuBLAST with round-to-nearest as the rounding step",
               rtn.quantize, qublast.allocate, qublast.transform, streams=True),
        Method("specquant", "SmoothQuant migration + per-row low-frequency Fourier truncation, then GPTQ",
               gptq.quantize, transform=folded(specquant.transform, lambda loaded, plan: {"ggml_types": plan.types}),
               activation_aware=True),
        Method("ruquant", "Householder+Givens block rotations + tuned global Householder (folded; a tied "
               "model's build turns only the value heads), then GPTQ",
               gptq.quantize, transform=folded(ruquant.folded_transform, _ruquant_options), rotates=True,
               activation_aware=True),
        Method("hadamard", "QuaRot-style random Hadamard rotations (folded), then GPTQ",
               gptq.quantize, transform=folded(hadamard.transform), unties=True, rotates=True, activation_aware=True),
        Method("gptq", "GPTQ (Hessian error compensation) on the greedy mix", gptq.quantize, streams=True),
        Method("rtn", "round to nearest on the importance-weighted grid, greedy mix", rtn.quantize, streams=True),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise EdgequantError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None

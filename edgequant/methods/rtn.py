"""RTN: round every weight to the nearest point of its ggml grid.

The grid (block scales and mins) is searched per block to minimise the squared error,
weighted by the calibration importance of each input column when there is one.
"""

from __future__ import annotations

from typing import Callable

from ..calibration import Calibration
from ..codestore import CodeStore
from ..ggml_quants import EncodedTensor, get_type
from ..models import LoadedModel
from ..planning import Plan


def quantize(
    loaded: LoadedModel,
    plan: Plan,
    calibration: Calibration,
    progress: Callable[[str], None] | None = None,
) -> CodeStore:
    encoded = CodeStore()
    for name, w in loaded.matrices():
        encoded[name] = encode(name, w, plan, calibration, progress)
    return encoded


def encode(name, weight, plan: Plan, calibration: Calibration, progress=None) -> EncodedTensor:
    """One matrix, rounded to nearest on its importance-weighted grid."""
    if progress:
        progress(name)
    qtype = plan.types[name]
    data = get_type(qtype).quantize(weight.detach().float().numpy(), calibration.importance.get(name))
    return EncodedTensor(qtype, data)

"""RTN: round every weight to the nearest point of its ggml grid.

The grid (block scales and mins) is searched per block to minimise the squared error,
weighted by the calibration importance of each input column when there is one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..ggml_quants import EncodedTensor, get_type
from ..models import LoadedModel
from ..planning import Plan


def quantize(
    loaded: LoadedModel,
    plan: Plan,
    importance: dict[str, np.ndarray],
    progress: Callable[[str], None] | None = None,
) -> dict[str, EncodedTensor]:
    encoded = {}
    for name, weight in loaded.matrices():
        if progress:
            progress(name)
        qtype = plan.types[name]
        data = get_type(qtype).quantize(weight.detach().float().numpy(), importance.get(name))
        encoded[name] = EncodedTensor(qtype, data)
    return encoded

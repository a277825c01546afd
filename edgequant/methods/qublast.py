"""QuBLAST: per-block mixed precision from measured cross-entropy sensitivity, activation scaling
maps, and GPTQ (or RTN) as the rounding step.

1. ``allocate``: measure the sensitivity table (:mod:`edgequant.sensitivity`): the KL each
   block's attention / MLP part (and the embedding) adds when quantized alone, for every type
   the part can take; then choose one option per part minimising the summed KL under the byte
   budget, each option charged for its kernels' slowdown: at the least price that keeps the plan
   as fast as llama.cpp's own file of this size (the stock twin's mix, when the build makes one),
   else at the price of a byte; and within the decode floor of ``--min-tok-s`` (exact
   multiple-choice knapsack, :func:`edgequant.planning.knapsack_with_speed`). When the largest
   option of every part fits (and reads fast enough), nothing needs measuring.
2. ``transform``: activation scaling maps (folded in place), searched per block and group for the types just
   chosen (:func:`edgequant.smoothing.search_scales`) and folded into norms / previous matrices.
3. ``quantize``: GPTQ onto the exact ggml grids (``rounding="rtn"`` for round-to-nearest).
"""

from __future__ import annotations

from dataclasses import asdict

from ..calibration import Calibration
from ..errors import EdgequantError
from ..models import LoadedModel
from ..planning import Matrix, Plan, Speed, knapsack, knapsack_with_speed, summed
from ..progress import Progress
from ..sensitivity import CANDIDATES, Part, Sensitivity, cached_measure, how_for, n_measurements, split_parts
from ..smoothing import search_scales

def allocate(
    loaded: LoadedModel,
    matrices: list[Matrix],
    other_params: int,
    max_bytes: int,
    calibration: Calibration,
    progress: Progress,
    speed: Speed = Speed(),
    menu: tuple[str, ...] = CANDIDATES,
) -> tuple[Plan, Sensitivity | None]:
    """The plan of least summed sensitivity within ``max_bytes`` (all tensors counted), the
    types' slowdown priced in and the decode floor kept (``speed``); ``menu``: the types a part
    may take (ONNX Runtime's configurations for an ONNX plan)."""
    parts = split_parts(matrices, menu)
    other_bytes = 4 * other_params
    max_decode = None if speed.max_decode_bytes is None else speed.max_decode_bytes - other_bytes
    largest = [p.options()[-1] for p in parts]
    if (sum(p.nbytes(t) for p, t in zip(parts, largest)) + other_bytes <= max_bytes
            and (max_decode is None or sum(speed.decode(t, p.sizes(t)) for p, t in zip(parts, largest)) <= max_decode)):
        return _plan(parts, largest, matrices, other_params, "qublast: every part at its largest type fits"), None
    smallest = sum(p.nbytes(p.options()[0]) for p in parts) + other_bytes
    if smallest > max_bytes:
        raise EdgequantError(f"the budget of {max_bytes / 1e6:.1f} MB of tensors is below the smallest mix, "
                             f"{smallest / 1e6:.1f} MB")
    table = measure_table(loaded, parts, calibration, progress)
    entries = table.by_part()
    options = [[(e.bytes, e.kl, speed.slowdown(e.types, p.sizes(e.types)), speed.decode(e.types, p.sizes(e.types)),
                 speed.prefill_work(e.types, p.sizes(e.types))) for e in entries[p.key]] for p in parts]
    stock = speed.stock and (speed.stock.decode_bytes, speed.stock.prefill_work)
    chosen, price, extra = knapsack_with_speed(options, max_bytes - other_bytes, max_decode, stock)
    if chosen is None and (max_decode is None or knapsack([[o[:2] for o in opts] for opts in options],
                                                          max_bytes - other_bytes) is None):
        raise EdgequantError(f"the budget of {max_bytes / 1e6:.1f} MB of tensors is at the smallest mix, "
                             f"{smallest / 1e6:.1f} MB: give it a little more")
    if chosen is None:
        raise EdgequantError(f"--min-tok-s cannot be met: no mix within {max_bytes / 1e6:.1f} MB reads under "
                             f"{speed.max_decode_bytes / 1e6:.1f} MB per token (bandwidth-equivalent)")
    types = [entries[p.key][j].types for p, j in zip(parts, chosen)]
    decode, prefill = (summed(options, chosen, k) for k in (3, 4))
    plan = _plan(parts, types, matrices, other_params,
                 f"qublast: least summed KL within {max_bytes / 1e6:.2f} MB{_speed_rule(options, speed, decode, prefill)}")
    plan.pricing = {"kernels": speed.costs.as_dict(), "slowdown_price": price, "decode_price": extra,
                    "slowdown_bytes": {p.key: {e.option: o[2] for e, o in zip(entries[p.key], opts)}
                                       for p, opts in zip(parts, options)},
                    "stock": speed.stock.as_dict() if speed.stock else None, "decode_bytes": decode, "prefill_work": prefill}
    return plan, table


def _speed_rule(options, speed: Speed, decode: float, prefill: float) -> str:
    """How the plan weighed the kernels' speed, for its rule."""
    if not any(o[2] for opts in options for o in opts):
        return ""
    if speed.stock is None:
        return " (the types' slowdown priced in)"
    if decode <= speed.stock.decode_bytes and prefill <= speed.stock.prefill_work:
        return f" (held to {speed.stock.label}'s predicted speed)"
    return f" (the types' slowdown priced in: no plan of this size is as fast as {speed.stock.label})"


def measure_table(loaded: LoadedModel, parts: list[Part], calibration: Calibration, progress: Progress) -> Sensitivity:
    """The sensitivity table of ``parts`` on the first ``calibration.sensitivity_tokens`` (cached: the joint search reads the same one)."""
    how = how_for(loaded, calibration.sensitivity)
    with progress.step("measure sensitivity" if how == "measured" else "estimate sensitivity (Fisher)",
                       n_measurements(parts)) as tick:
        return cached_measure(loaded, parts, calibration.sensitivity_windows(), calibration.importance, tick, how)


def _plan(parts: list[Part], types: list[dict[str, str]], matrices, other_params, rule) -> Plan:
    merged = {name: t for part_types in types for name, t in part_types.items()}
    return Plan(merged, matrices, other_params, rule)


def transform(
    loaded: LoadedModel, plan: Plan, calibration: Calibration, progress: Progress
) -> tuple[LoadedModel, dict]:
    """The model with the scaling maps searched for ``plan``'s types folded in, in place (and,
    under ``folded``, the scales, from which the calibration statistics follow)."""
    with progress.step("search activation scaling maps", loaded.config.num_hidden_layers) as tick:
        choices, folded = search_scales(loaded, calibration.windows, plan.types, progress=tick)
    return loaded, {"scaling_maps": [asdict(c) for c in choices], "folded": folded}

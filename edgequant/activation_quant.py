"""``edgequant eval --wbits W --abits A``: a method's transform, then the exact WxAy simulation.

Every method runs through the same harness (:mod:`edgequant.fakequant`): the same quantizers,
the same calibration windows, the same evaluation windows. ``rtn`` is no transform at all;
``smoothquant`` is SmoothQuant's migration (alpha 0.5) on every block's four input groups.
``NAME-folded`` (ruquant, hadamard) is the form a build ships: folded into the weights, nothing
left online.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .assets import CALIBRATION_TEXT, EVALUATION_TEXT, load_text
import torch

from .calibration import Calibration, activation_stats, block_input_grams
from .errors import EdgequantError, check_number
from .evaluation import DEFAULT_CTX, LogitSource, TorchLogits, evaluate, token_windows
from .fakequant import QuantLinear, RowGrid, Setting, Transformed, fake_quantize
from .methods import hadamard, ruquant, specquant
from .methods.gptq import gptq
from .models import LoadedModel, load_model
from .walker import Walk
from .progress import Progress
from .smoothing import smooth

SMOOTHQUANT_ALPHA = 0.5


def _none(loaded, calibration, setting, progress) -> Transformed:
    return Transformed(loaded)


def _smoothquant(loaded, calibration, setting, progress) -> Transformed:
    work = loaded.copy()
    with progress.step("smoothquant: activation ranges", work.config.num_hidden_layers) as tick:
        smooth(work, activation_stats(work, calibration.windows, tick).absmax, SMOOTHQUANT_ALPHA)
    return Transformed(work, details={"alpha": SMOOTHQUANT_ALPHA})


TRANSFORMS = {
    "rtn": _none,
    "smoothquant": _smoothquant,
    "hadamard": hadamard.transform,
    "specquant": specquant.transform,
    "ruquant": ruquant.transform,
}
FOLDED = {  # the deployable forms: what stays online in TRANSFORMS is dropped or folded
    "hadamard-folded": hadamard.transform,
    "ruquant-folded": ruquant.folded_transform,
}


def check_method(name: str) -> None:
    if name not in TRANSFORMS and name not in FOLDED:
        raise EdgequantError(f"--wbits/--abits simulate {', '.join([*TRANSFORMS, *FOLDED])} (NAME-folded: the form "
                             f"a build ships, nothing online); not {name!r}")


def transform(name: str, loaded, calibration, setting, progress, **options) -> Transformed:
    """``name``'s transform; a ``NAME-folded`` one keeps nothing online (what ships)."""
    check_method(name)
    if name in FOLDED:
        return replace(FOLDED[name](loaded, calibration, setting, progress, **options), online={})
    return TRANSFORMS[name](loaded, calibration, setting, progress, **options)


@torch.no_grad()
def gptq_weights(sim: torch.nn.Module, windows, bits: int, group: int | None = None, progress=None) -> None:
    """Round the weights of ``sim`` (from :func:`fake_quantize` with ``gptq``) block by block with
    GPTQ on the per-row grids, each block calibrated on the outputs of the blocks already
    rounded, and on its matrices' inputs as they see them (online transform and activation
    rounding included)."""
    for stop in Walk(sim, windows, progress):
        matrices = {id(m): m for m in stop.block.modules() if isinstance(m, QuantLinear)}
        grams = block_input_grams(stop.block, stop.inputs, stop.kwargs, matrices, seen_as=lambda m, x: m.prepare(x))
        for key, m in matrices.items():
            codes, grid = gptq(m.weight, grams[key].float(), RowGrid(bits, group))
            m.weight.copy_(torch.from_numpy(grid.values(codes)))


def simulate(method: str, setting: Setting, model: str | None = None, calib_tokens: int = 4096,
             eval_text: str | None = None, eval_tokens: int = 8192, ctx: int = DEFAULT_CTX,
             progress: Progress | None = None, loaded: LoadedModel | None = None,
             reference: LogitSource | None = None, **options) -> dict:
    """Quality of ``method`` at ``setting`` against full precision, and how long the transform took."""
    progress = progress or Progress()
    check_method(method)
    if any(b is not None and not 2 <= b <= 8 for b in (setting.wbits, setting.abits, setting.kv_bits)):
        raise EdgequantError("--wbits, --abits and --kv-bits take 2 to 8 bits")
    for option, value, least in (("--w-group", setting.w_group, 2), ("--calib-tokens", calib_tokens, 1),
                                 ("--eval-tokens", eval_tokens, 1), ("--eval-ctx", ctx, 2)):
        check_number(option, value, at_least=least)
    if loaded is None:
        with progress.step("load model"):
            loaded = load_model(model)
    _, calib_text = load_text(None, CALIBRATION_TEXT)
    calibration = Calibration(token_windows(loaded.tokenizer, calib_text, calib_tokens, ctx), {})
    label, text = load_text(eval_text, EVALUATION_TEXT)
    windows = token_windows(loaded.tokenizer, text, eval_tokens, ctx)
    started = time.time()
    done = transform(method, loaded, calibration, setting, progress, **options)
    seconds = time.time() - started
    sim = fake_quantize(done.work.model, setting, done.online)
    if setting.gptq and setting.wbits:
        with progress.step("gptq on the simulated grids", sim.config.num_hidden_layers) as tick:
            gptq_weights(sim, calibration.windows, setting.wbits, setting.w_group, tick)
    reference = reference or TorchLogits(loaded.model)  # run beside the simulation, window by window
    with progress.step(f"evaluate {method} {setting.label}", len(windows)) as tick:
        quality = evaluate(TorchLogits(sim), windows, reference, "torch", tick)
    return {"method": method, "setting": setting.label, "quality": quality.as_dict(), "transform_seconds": seconds,
            "details": done.details, "online_transforms": len(done.online),
            "reference": loaded.name, "text": {"source": label, "tokens": int(windows.size), "ctx": ctx}}

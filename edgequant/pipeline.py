"""``edgequant build``: load -> calibrate -> plan -> quantize -> export -> evaluate -> report.

Everything is written into a staging folder next to ``--out`` and moved into place at the end,
so a failed or interrupted build never leaves a half-written output (and an earlier build in
that folder survives until the new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

from exporters.gguf import write_gguf
from runtimes.llamacpp import LlamaCppLogits

from . import __version__
from .assets import CALIBRATION_TEXT, EVALUATION_TEXT, load_text
from .atomic import atomic_dir
from .calibration import Calibration, activation_stats
from .errors import EdgequantError
from .evaluation import DEFAULT_CTX, CachedLogits, TorchLogits, evaluate, simulate, token_windows
from .methods import get_method
from .models import LoadedModel, load_model, read_gguf
from .planning import Matrix, Plan, for_bpw, uniform
from .progress import Progress
from .smoothing import smooth


@dataclass
class BuildOptions:
    model: str | None = None  # None / "default" -> the built-in model
    out: Path = Path("out")
    method: str = "rtn"
    ggml_type: str | None = None  # uniform type, e.g. "Q4_K"
    bpw: float | None = None  # target bits per weight (mixed); default 4.5 when no type is given
    use_importance: bool = True
    calib_text: str | None = None  # None -> built-in c4; else a built-in name or comma-separated files
    calib_tokens: int = 16384
    eval_text: str | None = None  # None -> built-in wiki
    eval_tokens: int = 8192
    ctx: int = DEFAULT_CTX
    smooth: float | None = None  # migration strength alpha of the activation scaling maps; None = off
    torch_sim: bool = True  # also score the decoded weights in torch (parity with llama.cpp)
    threads: int | None = None


def make_plan(loaded: LoadedModel, ggml_type: str | None, bpw: float | None) -> Plan:
    matrices = [Matrix(name, *w.shape) for name, w in loaded.matrices()]
    n_matrix = sum(m.params for m in matrices)
    n_all = sum(p.numel() for p in loaded.model.parameters())  # tied weights counted once
    other = n_all - n_matrix
    if ggml_type:
        return uniform(matrices, other, ggml_type)
    return for_bpw(matrices, other, 4.5 if bpw is None else bpw)


def smoothed_copy(loaded: LoadedModel, ranges, alpha: float) -> LoadedModel:
    """A copy of the model with activation scaling maps folded in (the original stays the reference)."""
    copy = LoadedModel(deepcopy(loaded.model), loaded.tokenizer, loaded.arch, loaded.path)
    smooth(copy, ranges, alpha)
    return copy


def build(
    opts: BuildOptions,
    progress: Progress | None = None,
    loaded: LoadedModel | None = None,
    reference: CachedLogits | None = None,
) -> dict:
    """Run the whole build into ``opts.out``.

    ``loaded`` skips loading ``opts.model`` again; ``reference`` reuses full-precision logits
    already computed for ``loaded`` (several builds scored on the same text).
    """
    progress = progress or Progress()
    out = Path(opts.out)
    _check_writable(out)
    if loaded is None:
        with progress.step("load model"):
            loaded = load_model(opts.model)
    method = get_method(opts.method)
    plan = make_plan(loaded, opts.ggml_type, opts.bpw)
    calib_label, calib_text = load_text(opts.calib_text, CALIBRATION_TEXT)
    eval_label, eval_text = load_text(opts.eval_text, EVALUATION_TEXT)
    calib = token_windows(loaded.tokenizer, calib_text, opts.calib_tokens, opts.ctx)
    windows = token_windows(loaded.tokenizer, eval_text, opts.eval_tokens, opts.ctx)

    if opts.smooth:
        with progress.step("calibrate activation ranges", len(calib)) as tick:
            ranges = activation_stats(loaded, calib, tick).absmax
    work = smoothed_copy(loaded, ranges, opts.smooth) if opts.smooth else loaded
    imatrix = {}
    if opts.use_importance:
        with progress.step("calibrate", len(calib)) as tick:
            imatrix = activation_stats(work, calib, tick).importance
    with progress.step(f"quantize ({opts.method})", len(plan.matrices)) as tick:
        encoded = method(work, plan, Calibration(calib, imatrix), tick)

    with atomic_dir(out) as stage:
        gguf_path = stage / "model.gguf"
        with progress.step("export GGUF"):
            write_gguf(gguf_path, work, encoded, opts.method)
        reference = reference or CachedLogits(TorchLogits(loaded.model))
        quality = _evaluate(reference, work, encoded, gguf_path, windows, opts, progress)
        report = {
            "edgequant": __version__,
            "model": {"name": loaded.name, "path": str(loaded.path), "architecture": loaded.arch.model_type},
            "method": {"name": opts.method, "importance": opts.use_importance, "smooth": opts.smooth, "plan": plan.rule},
            "artifacts": [_artifact(gguf_path, "gguf", out)],
            "quality": quality,
            "tensors": [{"name": t["name"], "ggml_type": t["ggml_type"], "bpw": t["bpw"]} for t in plan.as_dict()["tensors"]],
            "text": {
                "calibration": {"source": calib_label, "tokens": int(calib.size)},
                "evaluation": {"source": eval_label, "tokens": int(windows.size), "ctx": opts.ctx},
                "reference": "full precision = the float32 weights of the loaded model",
            },
        }
        (stage / "plan.json").write_text(json.dumps(plan.as_dict(), indent=1))
        (stage / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _evaluate(reference, work, encoded, gguf_path, windows, opts, progress) -> dict:
    """Quality of the file against the full-precision ``reference``; ``work`` is what was quantized."""
    quality = {}
    with progress.step("evaluate full precision", len(windows)) as tick:
        cached = lambda window: reference.log_probs(window).numpy()  # noqa: E731  (log-probs are logits too)
        quality["fp"] = evaluate(cached, windows, reference, "torch", tick).as_dict()
    if opts.torch_sim:
        sim = simulate(work.model, _name_pairs(work), encoded)
        with progress.step("evaluate torch simulation", len(windows)) as tick:
            quality["gguf_sim"] = evaluate(TorchLogits(sim), windows, reference, "torch", tick).as_dict()
        del sim
    runner = LlamaCppLogits(gguf_path, opts.ctx, opts.threads)
    try:
        with progress.step("evaluate GGUF in llama.cpp", len(windows)) as tick:
            quality["gguf"] = evaluate(runner, windows, reference, "llama.cpp", tick).as_dict()
    finally:
        runner.close()
    return quality


def _name_pairs(loaded: LoadedModel):
    return [(hf, loaded.gguf_name(hf)) for hf, t in loaded.model.state_dict().items() if t.ndim == 2]


def gguf_tensor_stats(path: Path) -> tuple[int, int]:
    """(bytes, parameters) over all tensors stored in a GGUF file."""
    reader = read_gguf(path)
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)


def _artifact(path: Path, fmt: str, out: Path) -> dict:
    n_bytes, n_params = gguf_tensor_stats(path)
    return {
        "format": fmt,
        "path": str(out / path.name),
        "bytes": path.stat().st_size,
        "tensor_bytes": n_bytes,
        "params": n_params,
        "bpw": n_bytes * 8 / n_params,
        "sha256": sha256(path),
    }


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_writable(out: Path) -> None:
    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise EdgequantError(f"--out {out} exists and is not a folder")
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise EdgequantError(f"cannot create {parent}: {e.strerror}") from None
    try:  # a real probe: access() says yes to root even on a read-only filesystem
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=parent))
    except OSError as e:
        raise EdgequantError(f"cannot write to {parent}: {e.strerror}") from None

"""edgequant: quantize a language model to fit an edge device, export GGUF/ONNX, measure it.

The Python API mirrors the command line; each function returns what ``--json`` prints::

    import edgequant
    plan = edgequant.plan(device="raspberry-pi-5-8gb", bpw=4.5)   # nothing written
    report = edgequant.build(device="jetson-orin", out="out")     # out/model.gguf, out/onnx/, report...
    edgequant.evaluate("out/model.gguf")                          # perplexity / KLD in llama.cpp
    edgequant.simulate("ruquant", wbits=4, abits=4)               # W4A4 in a torch simulation
    edgequant.deploy("out", "ssh://me@board/home/me/eq"); edgequant.bench("out", "ssh://me@board/home/me/eq")

Keyword options are those of ``edgequant.options.BuildOptions`` (``method``, ``ggml_type``,
``bpw``, ``budget_mb``, ``calib_tokens``, ``formats``...). Bad input raises
``edgequant.errors.EdgequantError`` with a one-line message. Imports are deferred, so
``import edgequant`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _progress(show: bool):
    from .progress import bars

    return bars(show)


def build(model: str | None = None, device: str | None = None, out="out", *, progress: bool = False, **options) -> dict:
    """``edgequant build``: quantize, export and evaluate into ``out``; returns report.json's contents."""
    from .options import BuildOptions

    opts = BuildOptions(model=model, device=device, out=out, **options)  # bad input fails before torch is imported
    from .pipeline import build as run

    return run(opts, _progress(progress))


def plan(model: str | None = None, device: str | None = None, *, progress: bool = False, **options) -> dict:
    """``edgequant plan``: budget, per-block types and predicted size/memory/speed; writes nothing."""
    from .options import BuildOptions

    opts = BuildOptions(model=model, device=device, **options)
    from .pipeline import planned

    return planned(opts, _progress(progress)).summary()


def evaluate(path, reference: str | None = None, *, progress: bool = False, **options) -> dict:
    """``edgequant eval``: quality of a .gguf (llama.cpp) or ONNX folder (ONNX Runtime) vs full precision.
    Options: ``eval_text``, ``eval_tokens``, ``ctx``, ``threads``, ``accuracy_level``."""
    from .pipeline import evaluate_file

    return evaluate_file(path, reference, progress=_progress(progress), **options)


def simulate(method: str = "rtn", wbits: int | None = 4, abits: int | None = 4, kv_bits: int | None = None,
             model: str | None = None, *, gptq: bool = False, w_group: int | None = None, progress: bool = False,
             **options) -> dict:
    """``edgequant eval --wbits --abits``: a method's weight-and-activation quantization simulated in
    torch (rtn, smoothquant, hadamard, specquant, ruquant; hadamard-folded and ruquant-folded are
    the forms builds ship), weights rounded to nearest or by ``gptq``,
    one grid per row or per ``w_group`` weights of a row. Options: ``eval_text``, ``eval_tokens``,
    ``ctx``, ``calib_tokens``, ``energy`` (SpecQuant)."""
    from .activation_quant import simulate as run
    from .fakequant import Setting

    return run(method, Setting(wbits, abits, kv_bits, gptq, w_group=w_group), model, progress=_progress(progress), **options)


def export_onnx(gguf_file, out, accuracy_level: int = 4) -> dict:
    """``edgequant export-onnx``: an ONNX Runtime / genai folder running the GGUF file's own codes."""
    from exporters.onnx import export_onnx as run

    return run(gguf_file, out, None, accuracy_level)


def deploy(folder, to: str) -> dict:
    """``edgequant deploy``: copy a build to ``local``, ``ssh://...`` or ``adb://...``, checked by sha256."""
    from .deployment import deploy as run

    return run(folder, to).as_dict()


def verify(folder, to: str = "local") -> dict:
    """``edgequant verify``: every file of the build against the manifest (``result["ok"]``)."""
    from .deployment import verify as run

    return run(folder, to)


def bench(folder, target: str = "local", **options) -> dict:
    """``edgequant bench``: TTFT, prefill/decode tok/s and peak RSS. Options: ``runtime``, ``threads``,
    ``python``, ``prompt_tokens``, ``gen_tokens``, ``repeats``."""
    from .benchmark import bench as run

    return run(folder, target, **options)


def report(folder, ladder=None):
    """``edgequant report``: (re)write ``folder/report.html``; returns its path."""
    from .reporting import write_report

    return write_report(folder, ladder)

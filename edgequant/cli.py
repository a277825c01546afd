"""The ``edgequant`` command line. Logs and progress go to stderr, results to stdout."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import EdgequantError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize a language model for an edge device.")


def _fail(message: str, code: int = 1):
    typer.echo(f"edgequant: error: {message}", err=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):
    """Call ``fn``; known failures become one line on stderr and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except EdgequantError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except MemoryError:
        _fail("out of memory")
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))


@app.command()
def build(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF folder, .gguf file, or 'default' (SmolLM2-135M-Instruct)."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder (replaced atomically)."),
    method: str = typer.Option("rtn", help="Quantization method: rtn (round to nearest on the searched grid) or gptq (Hessian error compensation, block by block)."),
    ggml_type: Optional[str] = typer.Option(None, "--type", help="One ggml type for every matrix, e.g. Q4_K."),
    bpw: Optional[float] = typer.Option(None, help="Target bits per weight over all tensors (mixed types). Default 4.5."),
    importance: bool = typer.Option(True, "--importance/--no-importance", help="Weight the rounding error by calibration activations (imatrix)."),
    smooth: Optional[float] = typer.Option(None, help="Fold activation scaling maps with strength ALPHA (e.g. 0.5) into the norms/weights: fewer activation outliers for llama.cpp's 8-bit activations. Helps 8-bit weights; hurt at 4.5 bpw here."),
    calib_text: Optional[str] = typer.Option(None, help="Calibration text: built-in name (c4.utf8...) or comma-separated files."),
    calib_tokens: int = typer.Option(16384, help="Calibration tokens."),
    eval_text: Optional[str] = typer.Option(None, help="Evaluation text: built-in name (wiki.utf8...) or files."),
    eval_tokens: int = typer.Option(8192, help="Evaluation tokens."),
    ctx: int = typer.Option(512, help="Evaluation window (context) length."),
    threads: Optional[int] = typer.Option(None, help="llama.cpp threads (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (implies --quiet)."),
):
    """Quantize MODEL, export model.gguf into OUT, and measure it against full precision."""
    from transformers.utils import logging as hf_logging

    from .pipeline import BuildOptions, build as run_build
    from .progress import Progress, RichProgress

    hf_logging.disable_progress_bar()  # our own bars replace transformers' ones

    opts = BuildOptions(model, out, method, ggml_type, bpw, importance, calib_text, calib_tokens,
                        eval_text, eval_tokens, ctx, smooth=smooth, threads=threads)
    progress = Progress() if quiet or as_json else RichProgress()
    report = _run(run_build, opts, progress)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print_summary(report)


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']['name']} · {report['method']['name']} · {report['method']['plan']}")
    for col in ("artifact", "runtime", "bpw", "MB", "ppl", "KLD", "top-1"):
        table.add_column(col)
    q = report["quality"]
    fp = q["fp"]
    table.add_row("full precision", "torch", "32", "", f"{fp['ppl']:.3f}", "", "")
    art = report["artifacts"][0]
    for key in ("gguf_sim", "gguf"):
        if key in q:
            r = q[key]
            table.add_row(art["path"], r["runtime"], f"{art['bpw']:.3f}", f"{art['bytes'] / 1e6:.1f}",
                          f"{r['ppl']:.3f}", f"{r['kld']:.4f}", f"{r['top1']:.3f}")
    Console().print(table)
    t = report["text"]["evaluation"]
    typer.echo(f"evaluation: {t['source']}, {t['tokens']} tokens, ctx {t['ctx']}")


@app.command("fetch-default")
def fetch_default():
    """Write the default model's float32 Hugging Face folder into the cache (done on first use anyway)."""
    from .assets import default_model_dir

    typer.echo(_run(default_model_dir))


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading bars on stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("edgequant: error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m edgequant.cli
    main()

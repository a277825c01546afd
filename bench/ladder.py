"""The stock llama.cpp ladder against our methods, at matching file sizes, measured in llama.cpp.

    python bench/ladder.py [--model default|qwen2.5-coder-1.5b] [--eval-tokens 8192] [--mixes Q2_K,...]
                           [--ours-at Q3_K_M,Q4_K_M|all|none] [--ours rtn,gptq,qublast,joint,...]
                           [--bpw-points 2.5,3.0] [--imatrix ours|llama] [--tools DIR]
                           [--speed [--speed-rounds 9]] [--pair-speed] [--out DIR] [--rows DIR]

1. Writes a full-precision GGUF of the reference model, then llama.cpp's own mixes, each without
   (where llama.cpp allows it) and with an importance matrix. With ``--imatrix ours`` (the default)
   the importance is ours, from the calibration text, passed through ``llama_model_quantize``
   (llama-cpp-python) exactly as llama-quantize passes its file's. With ``--imatrix llama`` the files
   are made the way users make them: ``llama-imatrix`` on the calibration text (as a text file, ctx
   512), then ``llama-quantize --imatrix``, both built by ``runtimes/build_llama_cpp.sh`` (``--tools``
   names their folder; without it the script runs first).
2. For each stock mix, builds our RTN, RTN + importance, GPTQ and QuBLAST files (QuBLAST also
   without its activation scaling maps, where ``--no-maps-at`` lists the mix) at the stock
   file's bits per weight (``--bpw``), so rows compare at the same size. Each of our builds runs
   as its own ``edgequant build`` process, so its time and peak RSS are its own.
3. At each of ``--bpw-points`` (bits per weight; below the stock ladder's sizes), builds
   ``--method joint`` (pruning + mixed precision) and QuBLAST, which is skipped with its own
   error where no unpruned mix is that small.
4. Scores every file in llama.cpp on the same evaluation windows (perplexity, KLD and top-1
   against the full-precision model). With ``--speed``, once every file is made, times them all
   with ``llama-bench`` (pp128 and tg64 on ``--threads``) in ``--speed-rounds`` interleaved rounds,
   takes each file's medians and prints our files' speed over the stock file of their mix (run it
   on an idle CPU). Prints one table sorted by bits per weight (also JSON and CSV; the
   JSON also goes where ``report.html`` finds it, ``~/.cache/edgequant/ladder/``). QuBLAST's
   sensitivity table is measured once and then read from the cache. With ``--pair-speed``, each of
   our files at a mix's size is timed the same way against that mix's stock file with the
   imatrix as soon as it is scored, while both files are on disk, and the ratio is kept in its row.

Every file's row is kept in ``--rows`` (``OUT/rows/`` unless given) as soon as it is measured, and a
later run reads it back instead of making the file again. A ladder of many hours (the 1.5B's) can so
be stopped and resumed, or grown by new ``--ours`` and ``--bpw-points``; rows kept outside ``--out``
(in a checkout, say) outlive the files, and a stock file a pair timing needs is then made again.
QuBLAST's sensitivity tables travel with the rows too (``--rows``'s ``sensitivity/``): copied there
after each of our builds and into the cache at the start, so a new machine with the same code and
inputs reads them back. A stopped measurement's ``.partial.json`` travels the same way (the copy
with more parts wins) and resumes where it stopped; SIGTERM stops the ladder as Ctrl-C does, the
build in progress unwinding first.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from edgequant.atomic import write_text
from edgequant.assets import CALIBRATION_TEXT, EVALUATION_TEXT, cache_dir, read_text
from edgequant.calibration import cached_activation_stats
from edgequant.errors import EdgequantError
from edgequant.evaluation import token_windows
from edgequant.reference import reference_log_probs
from edgequant.models import load_model
from edgequant.pipeline import gguf_tensor_stats
from edgequant.reporting import ladder_file
from edgequant.twin import imatrix_of, reference_gguf
from runtimes.llama_quantize import quantize_stock
from runtimes.rpc import build_tools
from runtimes.llamacpp import score_in_llama_cpp
from type_speed import llama_bench  # bench/type_speed.py

CODE = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                      capture_output=True, text=True).stdout.strip()  # the commit each new row was made at

MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
LOW_BIT_MIXES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q2_K",
                 "Q3_K_M", "IQ4_XS", "Q4_K_M"]  # for a model whose rows take every i-quant (``--mixes low``)
OURS = {  # row label -> edgequant build options
    "rtn": ["--method", "rtn", "--no-importance"],
    "rtn + importance": ["--method", "rtn"],
    "gptq": ["--method", "gptq"],
    "qublast": ["--method", "qublast"],
    "joint": ["--method", "joint"],
    "default": [],  # the build's default method
}
AT_POINTS = {"joint": OURS["joint"], "qublast": OURS["qublast"]}
NO_MAPS = ["--method", "qublast", "--no-maps"]


def build_ours(model: str, out: Path, bpw: float, calib_tokens: int, options: list[str]) -> dict:
    """One ``edgequant build`` in its own process; returns its report (raises on failure)."""
    cmd = [sys.executable, "-m", "edgequant.cli", "build", "--model", model, "--bpw", f"{bpw:.6f}", "--out", str(out),
           "--calib-tokens", str(calib_tokens), "--eval-tokens", "512", "--formats", "gguf", "--json",
           *options]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as build:
        try:
            stdout, stderr = build.communicate()
        except BaseException:  # the ladder stopped: the build unwinds too (its spills and temporary files removed)
            build.terminate()
            build.wait()
            raise
    if build.returncode:
        raise EdgequantError(stderr.strip().splitlines()[-1])
    return json.loads(stdout)


def score(path: Path, windows, reference, params: int) -> dict:
    """llama.cpp's quality of the file, its path and size, and its bits per weight counted over the
    reference model's ``params`` (for a pruned file: the equivalent at equal size)."""
    q = score_in_llama_cpp(path, windows, reference)
    n_bytes, _ = gguf_tensor_stats(path)
    return {"path": str(path), "bpw": n_bytes * 8 / params, "MB": path.stat().st_size / 1e6, **q.as_dict()}


def timed(rows: list[dict], args) -> list[dict]:
    """``rows`` with llama-bench's decode and prefill tok/s of their files on ``--threads``: the
    median of ``--speed-rounds`` rounds, each timing every file once in turn (llama-bench's mean of
    3 runs), so that a drift of the host's speed falls on all files alike. The rounds' rates are
    kept beside the medians."""
    runs: list[list[dict]] = [[] for _ in rows]
    for _ in range(args.speed_rounds):
        for row, seen in zip(rows, runs):
            seen.append(llama_bench(args.tools / "llama-bench", Path(row["path"]), args.threads))
    return [{**row, "tg_tok_s": median(r["decode_tok_s"] for r in seen), "pp_tok_s": median(r["prefill_tok_s"] for r in seen),
             "tg_runs": [r["decode_tok_s"] for r in seen], "pp_runs": [r["prefill_tok_s"] for r in seen]}
            for row, seen in zip(rows, runs)]


def speed_ratios(rows: list[dict]) -> list[str]:
    """Per timed file of ours at a stock mix's size, its decode and prefill speed over that mix's
    file made with the importance matrix: the median of the rounds' ratios (a round times both
    within seconds, so the ratio holds when the host's speed drifts between rounds)."""
    stock = {r["file"].removeprefix("llama.cpp ").removesuffix(" + imatrix"): r
             for r in rows if r["file"].startswith("llama.cpp ") and r["file"].endswith(" + imatrix")}
    lines = []
    for r in rows:
        mix = r["file"].split(" @ ")[-1].removesuffix(" size") if " @ " in r["file"] else None
        if "vs_stock" in r:  # timed beside its stock file as soon as it was made (--pair-speed)
            lines.append(f"{r['file']:<48} decode {r['vs_stock']['tg']:.2f}x  prefill {r['vs_stock']['pp']:.2f}x  "
                         f"({r['vs_stock']['file']}, paired)")
        elif "tg_tok_s" in r and mix in stock and "tg_tok_s" in stock[mix]:
            tg, pp = (round_ratio(r, stock[mix], k) for k in ("tg_runs", "pp_runs"))
            lines.append(f"{r['file']:<48} decode {tg:.2f}x  prefill {pp:.2f}x  (llama.cpp {mix} + imatrix)")
    return lines


def round_ratio(ours: dict, stock: dict, key: str) -> float:
    """The median over the rounds of ``ours``'s rate over ``stock``'s (``key``: tg_runs or pp_runs, from :func:`timed`)."""
    return median(a / b for a, b in zip(ours[key], stock[key]))


def llama_imatrix(tools: Path, f32: Path, calib_text: str, out: Path, tokens: int, threads: int) -> Path:
    """``llama-imatrix`` on the calibration text in windows of 512 tokens, as a user runs it."""
    path = out / f"llama-imatrix-{f32.stem}-{tokens}.gguf"  # the reference's cache name: model and writer
    if not path.exists():
        text = out / "calibration.txt"
        text.write_text(calib_text)
        cmd = [str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(path), "-c", "512",
               "--chunks", str(max(1, tokens // 512)), "-t", str(threads)]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
    return path


def llama_quantize(tools: Path, f32: Path, dst: Path, mix: str, imatrix: Path | None, threads: int) -> None:
    """``llama-quantize [--imatrix FILE] F32 DST MIX THREADS``; RuntimeError with its last line on failure."""
    cmd = [str(tools / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []), str(f32), str(dst), mix,
           str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        dst.unlink(missing_ok=True)
        raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--ours-at", default="Q3_K_M,Q4_K_M",
                    help="mixes at whose size our methods are built too ('all' for every mix, ~13 min each; 'none' for the stock files only)")
    ap.add_argument("--ours", default=",".join(OURS), help=f"which of our builds to make at the mixes' sizes ({', '.join(OURS)})")
    ap.add_argument("--bpw-points", default="", help="bits per weight where joint and QuBLAST are built too, e.g. 2.5,3.0")
    ap.add_argument("--no-maps-at", default="Q3_K_M,Q4_K_M", help="mixes where QuBLAST also runs without maps")
    ap.add_argument("--out", type=Path, default=Path("bench-out/ladder"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--imatrix", choices=("ours", "llama"), default="ours",
                    help="the stock files' importance matrix: ours through the API, or llama-imatrix's through llama-quantize")
    ap.add_argument("--tools", type=Path, default=None, help="folder of llama-imatrix, llama-quantize and llama-bench")
    ap.add_argument("--speed", action="store_true", help="also time every file with llama-bench, all after the builds")
    ap.add_argument("--speed-rounds", type=int, default=9,
                    help="rounds of timing every file in turn (medians; on the 2-core build host 5 did not settle a 5%% gap)")
    ap.add_argument("--pair-speed", action="store_true",
                    help="time each of our files against its mix's stock file with the imatrix as soon as it is made")
    ap.add_argument("--rows", type=Path, default=None, help="folder of the kept rows (default: OUT/rows)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.rows = args.rows or args.out / "rows"
    if args.mixes == "low":
        args.mixes = ",".join(LOW_BIT_MIXES)
    if args.tools is None and (args.imatrix == "llama" or args.speed or args.pair_speed):
        args.tools = build_tools()  # runtimes/build_llama_cpp.sh (once)

    loaded = load_model(args.model, streamed=True)
    carry_tables(args.rows / "sensitivity", cache_dir() / "sensitivity")
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), args.eval_tokens)
    calib = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    reference = reference_log_probs(loaded, windows)
    f32 = reference_gguf(loaded, bool(loaded.config.tie_word_embeddings))
    params = sum(p.numel() for p in loaded.model.parameters())
    if args.imatrix == "llama":
        calib_text = loaded.tokenizer.decode(calib.reshape(-1).tolist())
        importance = llama_imatrix(args.tools, f32, calib_text, args.out, args.calib_tokens, args.threads)
    else:
        importance = imatrix_of(cached_activation_stats(loaded, calib).importance)
    stock_sources = (f32, importance)

    def scoring(path: Path) -> dict:
        return score(path, windows, reference, params)

    rows = []
    for mix in args.mixes.split(","):
        stock = []
        for with_imatrix in (False, True):
            name = f"llama.cpp {mix}" + (" + imatrix" if with_imatrix else "")
            path = args.out / f"stock-{mix}{'-imatrix' if with_imatrix else ''}.gguf"
            stock += measured(args, name, lambda: make_stock(name, path, mix, with_imatrix, stock_sources, args, scoring))
        rows += stock
        if not stock or (args.ours_at != "all" and mix not in args.ours_at.split(",")):
            continue
        target = stock[-1]["bpw"]  # the size of the stock mix made with the imatrix (without, some differ)
        ours = {label: OURS[label] for label in args.ours.split(",")}
        if mix in args.no_maps_at.split(","):
            ours["qublast without maps"] = NO_MAPS
        stock_file = functools.partial(remade, args.out / f"stock-{mix}-imatrix.gguf", mix, stock_sources, args)
        for label, options in ours.items():
            name, out = f"edgequant {label} @ {mix} size", args.out / f"ours-{label.replace(' ', '')}-{mix}"
            made = measured(args, name, lambda: build_and_score(name, out, target, args, options, scoring))
            rows += [paired(args, row, stock_file) for row in made] if args.pair_speed else made
    for point in filter(None, args.bpw_points.split(",")):
        for label, options in AT_POINTS.items():
            name, out = f"edgequant {label} @ {float(point):.2f} bpw", args.out / f"ours-{label}-{point}bpw"
            rows += measured(args, name, lambda: build_and_score(name, out, float(point), args, options, scoring))

    if args.speed:  # after every build, so the files are timed together on an otherwise idle CPU
        rows = timed(rows, args)
        for row in rows:
            write_text(_kept(args.rows, row["file"]), json.dumps([row]))
    rows.sort(key=lambda r: r["bpw"])
    _write(rows, args.out, windows.size, loaded.name)
    print("\n".join(["", "speed against llama.cpp's file of the same mix, made with the importance matrix:",
                      *speed_ratios(rows)]) if args.speed or args.pair_speed else "")


def carry_tables(src: Path, dst: Path) -> None:
    """Copies the sensitivity tables in ``src`` that ``dst`` lacks, and a stopped measurement's
    partial table where it holds more parts than ``dst``'s copy; a finished table makes its
    partial moot. Tables are named by the model and a hash of everything they depend on, so a
    table is only read where it holds."""
    for table in sorted(src.glob("*.json")):
        if _wanted(table, dst):
            dst.mkdir(parents=True, exist_ok=True)
            write_text(dst / table.name, table.read_text())
    for partial in dst.glob("*" + PARTIAL):
        if _finished(partial).exists():
            partial.unlink()


PARTIAL = ".partial.json"  # sensitivity.cached_measure's name for a stopped measurement's parts


def _finished(partial: Path) -> Path:
    return partial.with_name(partial.name.replace(PARTIAL, ".json"))


def _wanted(table: Path, dst: Path) -> bool:
    """Whether ``dst`` lacks ``table``, or holds fewer of a partial table's parts."""
    if not table.name.endswith(PARTIAL):
        return not (dst / table.name).exists()
    return not _finished(dst / table.name).exists() and _entries(dst / table.name) < _entries(table)


def _entries(table: Path) -> int:
    return len(json.loads(table.read_text())["entries"]) if table.exists() else 0


def _kept(rows: Path, name: str) -> Path:
    return rows / (name.replace(" ", "_").replace("/", "_") + ".json")


def measured(args, name: str, make) -> list[dict]:
    """The rows of the file ``name``: kept in ``--rows`` by an earlier run, or measured now by ``make``
    (none when the file cannot be made, each with the commit it was made at) and kept at once."""
    kept = _kept(args.rows, name)
    rows = json.loads(kept.read_text()) if kept.exists() else [{**row, "commit": CODE} for row in make()]
    if kept.exists():
        for row in rows:
            print(_line(row) + "  (kept)", flush=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_text(kept, json.dumps(rows))
    return rows


def stock_quantized(path: Path, mix: str, f32: Path, imatrix, args) -> None:
    """llama.cpp's ``mix`` of ``f32`` at ``path``, made as ``--imatrix`` says (``imatrix`` None: without)."""
    if args.imatrix == "llama":
        llama_quantize(args.tools, f32, path, mix, imatrix, args.threads)
    else:
        quantize_stock(f32, path, mix, imatrix=imatrix)


def remade(path: Path, mix: str, sources: tuple, args) -> Path:
    """The stock file of ``mix`` with the importance matrix at ``path``, made again if a kept row
    outlived it (the same quantizer on the same inputs makes the same file)."""
    if not path.exists():
        stock_quantized(path, mix, *sources, args)
    return path


def paired(args, row: dict, stock_file) -> dict:
    """``row``, one of our files at a stock mix's size, with its decode and prefill speed over that
    mix's stock file with the imatrix (``stock_file()`` makes or finds it), both timed together by
    :func:`timed`. Kept at once; a row already timed, or whose file is gone, is returned as it is."""
    if "vs_stock" in row or not Path(row["path"]).exists():
        return row
    stock = stock_file()
    timed_row, stock_row = timed([row, {"path": str(stock)}], args)
    timed_row["vs_stock"] = {"file": stock.name, "threads": args.threads,
                             **{k: stock_row[k] for k in ("tg_tok_s", "pp_tok_s", "tg_runs", "pp_runs")},
                             "tg": round_ratio(timed_row, stock_row, "tg_runs"),
                             "pp": round_ratio(timed_row, stock_row, "pp_runs")}
    write_text(_kept(args.rows, row["file"]), json.dumps([timed_row]))
    print(f"{row['file']:<48} decode {timed_row['vs_stock']['tg']:.2f}x  prefill {timed_row['vs_stock']['pp']:.2f}x"
          f"  ({stock.name}, {args.speed_rounds} rounds)", flush=True)
    return timed_row


def make_stock(name: str, path: Path, mix: str, with_imatrix: bool, sources: tuple, args, scoring) -> list[dict]:
    """llama.cpp's ``mix`` of the reference, made as ``--imatrix`` says, and its row ``name`` (none
    when llama.cpp refuses the mix, as it does the very low-bit ones without an importance matrix)."""
    f32, importance = sources
    start = time.time()
    try:
        stock_quantized(path, mix, f32, importance if with_imatrix else None, args)
    except RuntimeError as e:
        print(f"{name}: not made ({e})", flush=True)
        return []
    row = {"file": name, "seconds": time.time() - start, "peak_rss_mb": None, **scoring(path)}
    print(_line(row), flush=True)
    return [row]


def build_and_score(name: str, out: Path, bpw: float, args, options: list[str], scoring) -> list[dict]:
    """One of our builds at ``bpw`` scored in llama.cpp: its row, or none when it cannot be made."""
    try:
        report = build_ours(args.model, out, bpw, args.calib_tokens, options)
    except EdgequantError as e:  # e.g. a size below our smallest mix
        print(f"{name}: skipped ({e})", flush=True)
        return []
    finally:
        carry_tables(cache_dir() / "sensitivity", args.rows / "sensitivity")
    row = {"file": name, "seconds": report["build"]["seconds"], "peak_rss_mb": report["build"]["peak_rss_mb"],
           **scoring(out / "model.gguf")}
    print(_line(row), flush=True)
    if report.get("scaling_maps"):
        print(f"  {_outliers(report['scaling_maps'])}", flush=True)
    if (report.get("pruning") or {}).get("search"):
        print(f"  {_pruned(report['pruning'])}", flush=True)
    return [row]


def _pruned(pruning: dict) -> str:
    """One line on what the joint search pruned."""
    search = pruning["search"]
    if "blocks" not in pruning:
        return f"joint search {search['seconds']:.0f} s: nothing pruned"
    full = pruning["unpruned"]
    ffn = sum(b["ffn"] for b in pruning["blocks"]) / (full["ffn"] * (len(pruning["blocks"]) + len(pruning["removed"])))
    kv = sum(b["kv_heads"] for b in pruning["blocks"]) / (full["kv_heads"] * (len(pruning["blocks"]) + len(pruning["removed"])))
    return (f"joint search {search['seconds']:.0f} s: {len(pruning['removed'])} blocks removed "
            f"({', '.join(map(str, pruning['removed'])) or '-'}), FFN channels kept {ffn:.0%}, KV heads kept {kv:.0%}")


def _outliers(maps: list[dict]) -> str:
    """One line on what QuBLAST's scaling maps did to the quantized linears' inputs."""
    before = sum(m["outlier_before"] for m in maps) / len(maps)
    after = sum(m["outlier_after"] for m in maps) / len(maps)
    error = sum(m["error_ratio"] for m in maps) / len(maps)
    return (f"scaling maps: mean max|x|/std at the quantized inputs {before:.1f} -> {after:.1f}, "
            f"layer output error x{error:.2f} ({sum(m['alpha'] > 0 for m in maps)}/{len(maps)} groups scaled)")


def _line(r: dict) -> str:
    rss = f"{r['peak_rss_mb']:7.0f}" if r["peak_rss_mb"] else f"{'':7}"
    speed = f" {r['tg_tok_s']:7.1f} {r['pp_tok_s']:8.1f}" if "tg_tok_s" in r else ""
    return (f"{r['file']:<48} {r['bpw']:6.3f} {r['MB']:7.1f} {r['ppl']:8.3f} ±{r['ppl_se']:.2f} "
            f"{r['kld']:.4f} ±{r['kld_se']:.4f} {r['top1']:.3f} {r['seconds']:6.1f}s {rss}{speed}")


def _write(rows: list[dict], out: Path, tokens: int, model: str) -> None:
    header = (f"{'file':<48} {'bpw':>6} {'MB':>7} {'ppl':>8} {'':6} {'KLD':>6} {'':7} {'top-1':>5} {'time':>7} "
              f"{'RSS MB':>7}" + (f" {'tg64':>7} {'pp128':>8}" if any("tg_tok_s" in r for r in rows) else ""))
    print(f"\nllama.cpp, wiki.utf8, {tokens} tokens, ctx 512; bpw = tensor bytes x 8 / the reference model's "
          "parameters (a pruned file's equivalent at equal size); RSS = peak RSS of our build process")
    print(header)
    for r in rows:
        print(_line(r))
    result = json.dumps({"model": model, "text": EVALUATION_TEXT, "tokens": tokens, "rows": rows}, indent=1)
    (out / "ladder.json").write_text(result)
    ladder_file(model).parent.mkdir(parents=True, exist_ok=True)
    ladder_file(model).write_text(result)  # where report.html looks for llama.cpp's mixes
    with open(out / "ladder.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def _stop(_signal, _frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)  # unwinds as Ctrl-C does: the build stopped, the tables carried out
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("ladder: stopped; the rows and sensitivity tables measured so far are kept")

"""The stock llama.cpp ladder against our methods, at matching file sizes, measured in llama.cpp.

    python bench/ladder.py [--eval-tokens 8192] [--mixes Q2_K,...] [--ours-at Q3_K_M,Q4_K_M|all|none]
                           [--ours rtn,gptq,qublast,joint,...] [--bpw-points 2.5,3.0] [--out DIR]

1. Writes an F32 GGUF of the reference model, then llama.cpp's own mixes through
   ``llama_model_quantize`` (llama-cpp-python), each without and with an importance matrix
   (ours, from the calibration text, passed through the API exactly as llama-quantize does).
2. For each stock mix, builds our RTN, RTN + importance, GPTQ and QuBLAST files (QuBLAST also
   without its activation scaling maps, where ``--no-maps-at`` lists the mix) at the stock
   file's bits per weight (``--bpw``), so rows compare at the same size. Each of our builds runs
   as its own ``edgequant build`` process, so its time and peak RSS are its own.
3. At each of ``--bpw-points`` (bits per weight; below the stock ladder's sizes), builds
   ``--method joint`` (pruning + mixed precision) and QuBLAST, which is skipped with its own
   error where no unpruned mix is that small.
4. Scores every file in llama.cpp on the same evaluation windows (perplexity, KLD and top-1
   against the full-precision model) and prints one table sorted by bits per weight (also JSON
   and CSV; the JSON also goes where ``report.html`` finds it, ``~/.cache/edgequant/ladder/``). QuBLAST's sensitivity table is measured once and then read from the cache.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from edgequant.assets import CALIBRATION_TEXT, EVALUATION_TEXT, default_gguf, read_text
from edgequant.calibration import activation_stats
from edgequant.errors import EdgequantError
from edgequant.evaluation import token_windows
from edgequant.reference import reference_log_probs
from edgequant.models import load_model
from edgequant.pipeline import gguf_tensor_stats
from edgequant.reporting import ladder_file
from runtimes.llama_quantize import quantize_stock, write_f32_copy
from runtimes.llamacpp import score_in_llama_cpp

MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
OURS = {  # row label -> edgequant build options
    "rtn": ["--method", "rtn", "--no-importance"],
    "rtn + importance": ["--method", "rtn"],
    "gptq": ["--method", "gptq"],
    "qublast": ["--method", "qublast"],
    "joint": ["--method", "joint"],
}
AT_POINTS = {"joint": OURS["joint"], "qublast": OURS["qublast"]}
NO_MAPS = ["--method", "qublast", "--no-maps"]


def build_ours(out: Path, bpw: float, calib_tokens: int, options: list[str]) -> dict:
    """One ``edgequant build`` in its own process; returns its report (raises on failure)."""
    cmd = [sys.executable, "-m", "edgequant.cli", "build", "--bpw", f"{bpw:.6f}", "--out", str(out),
           "--calib-tokens", str(calib_tokens), "--eval-tokens", "512", "--json", *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise EdgequantError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout)


def score(path: Path, windows, reference, params: int) -> dict:
    """llama.cpp's quality of the file, its size, and its bits per weight counted over the
    reference model's ``params`` (for a pruned file: the equivalent at equal size)."""
    q = score_in_llama_cpp(path, windows, reference)
    n_bytes, _ = gguf_tensor_stats(path)
    return {"bpw": n_bytes * 8 / params, "MB": path.stat().st_size / 1e6, **q.as_dict()}


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
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = load_model("default")
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), args.eval_tokens)
    calib = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    reference = reference_log_probs(loaded, windows)
    f32 = args.out / "reference-f32.gguf"
    if not f32.exists():
        write_f32_copy(default_gguf(), f32)
    params = sum(p.numel() for p in loaded.model.parameters())
    imatrix = {k: v for k, v in activation_stats(loaded, calib).importance.items() if k.startswith("blk.")}

    rows = []
    for mix in args.mixes.split(","):
        for with_imatrix in (False, True):
            path = args.out / f"stock-{mix}{'-imatrix' if with_imatrix else ''}.gguf"
            start = time.time()
            quantize_stock(f32, path, mix, imatrix=imatrix if with_imatrix else None)
            made = time.time() - start
            rows.append({"file": f"llama.cpp {mix}" + (" + imatrix" if with_imatrix else ""),
                         "seconds": made, "peak_rss_mb": None, **score(path, windows, reference, params)})
            print(_line(rows[-1]), flush=True)
        if args.ours_at != "all" and mix not in args.ours_at.split(","):
            continue
        target = rows[-2]["bpw"]  # the size of the plain stock mix
        ours = {label: OURS[label] for label in args.ours.split(",")}
        if mix in args.no_maps_at.split(","):
            ours["qublast without maps"] = NO_MAPS
        for label, options in ours.items():
            rows += build_and_score(f"edgequant {label} @ {mix} size", args.out / f"ours-{label.replace(' ', '')}-{mix}",
                                    target, args, options, windows, reference, params)
    for point in filter(None, args.bpw_points.split(",")):
        for label, options in AT_POINTS.items():
            rows += build_and_score(f"edgequant {label} @ {float(point):.2f} bpw", args.out / f"ours-{label}-{point}bpw",
                                    float(point), args, options, windows, reference, params)

    rows.sort(key=lambda r: r["bpw"])
    _write(rows, args.out, windows.size, loaded.name)


def build_and_score(name: str, out: Path, bpw: float, args, options: list[str], windows, reference,
                    params: int) -> list[dict]:
    """One of our builds at ``bpw`` scored in llama.cpp: its row, or none when it cannot be made."""
    try:
        report = build_ours(out, bpw, args.calib_tokens, options)
    except EdgequantError as e:  # e.g. a size below our smallest mix
        print(f"{name}: skipped ({e})", flush=True)
        return []
    row = {"file": name, "seconds": report["build"]["seconds"], "peak_rss_mb": report["build"]["peak_rss_mb"],
           **score(out / "model.gguf", windows, reference, params)}
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
    return (f"{r['file']:<48} {r['bpw']:6.3f} {r['MB']:7.1f} {r['ppl']:8.3f} ±{r['ppl_se']:.2f} "
            f"{r['kld']:.4f} ±{r['kld_se']:.4f} {r['top1']:.3f} {r['seconds']:6.1f}s {rss}")


def _write(rows: list[dict], out: Path, tokens: int, model: str) -> None:
    header = (f"{'file':<48} {'bpw':>6} {'MB':>7} {'ppl':>8} {'':6} {'KLD':>6} {'':7} {'top-1':>5} {'time':>7} "
              f"{'RSS MB':>7}")
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
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

"""The stock llama.cpp ladder against our methods, at matching file sizes, measured in llama.cpp.

    python bench/ladder.py [--eval-tokens 20480] [--mixes Q4_K_M,Q3_K_M] [--out bench-out]

1. Writes an F32 GGUF of the reference model, then llama.cpp's own mixes through
   ``llama_model_quantize`` (llama-cpp-python), each without and with an importance matrix
   (ours, from the calibration text, passed through the API exactly as llama-quantize does).
2. For each stock mix, builds our RTN, RTN + importance and GPTQ files at the stock file's bits
   per weight (``--bpw``), so rows compare at the same size.
3. Scores every file in llama.cpp on the same evaluation windows (perplexity, KLD and top-1
   against the full-precision model), records the time each file took to make and the peak
   RSS of this process, and prints one table sorted by bits per weight (also JSON and CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from pathlib import Path

from edgequant.assets import CALIBRATION_TEXT, EVALUATION_TEXT, default_gguf, read_text
from edgequant.calibration import activation_stats
from edgequant.errors import EdgequantError
from edgequant.evaluation import CachedLogits, TorchLogits, evaluate, token_windows
from edgequant.models import load_model
from edgequant.pipeline import BuildOptions, build, gguf_tensor_stats
from runtimes.llama_quantize import quantize_stock, write_f32_copy
from runtimes.llamacpp import LlamaCppLogits

MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
OURS = [("rtn", False), ("rtn", True), ("gptq", True)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score(path: Path, windows, reference) -> dict:
    runner = LlamaCppLogits(path, windows.shape[1])
    try:
        q = evaluate(runner, windows, reference, "llama.cpp")
    finally:
        runner.close()
    n_bytes, n_params = gguf_tensor_stats(path)
    return {"bpw": n_bytes * 8 / n_params, "MB": path.stat().st_size / 1e6, **q.as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--out", type=Path, default=Path("bench-out/ladder"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    loaded = load_model("default")
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), args.eval_tokens)
    calib = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    reference = CachedLogits(TorchLogits(loaded.model))
    f32 = args.out / "reference-f32.gguf"
    if not f32.exists():
        write_f32_copy(default_gguf(), f32)
    imatrix = {k: v for k, v in activation_stats(loaded, calib).importance.items() if k.startswith("blk.")}

    rows = []
    for mix in args.mixes.split(","):
        for with_imatrix in (False, True):
            path = args.out / f"stock-{mix}{'-imatrix' if with_imatrix else ''}.gguf"
            start = time.time()
            quantize_stock(f32, path, mix, imatrix=imatrix if with_imatrix else None)
            made = time.time() - start
            rows.append({"file": f"llama.cpp {mix}" + (" + imatrix" if with_imatrix else ""),
                         "seconds": made, **score(path, windows, reference)})
            print(_line(rows[-1]), flush=True)
        target = rows[-2]["bpw"]  # the size of the plain stock mix
        for method, importance in OURS:
            name = f"edgequant {method}{' + importance' if importance else ''} @ {mix} size"
            out = args.out / f"ours-{method}{'-imp' if importance else ''}-{mix}"
            start = time.time()
            try:
                build(BuildOptions(out=out, method=method, bpw=target, use_importance=importance,
                                   calib_tokens=args.calib_tokens, eval_tokens=512, torch_sim=False),
                      loaded=loaded)
            except EdgequantError as e:  # e.g. a size below our smallest mix
                print(f"{name}: skipped ({e})", flush=True)
                continue
            made = time.time() - start
            rows.append({"file": name, "seconds": made, **score(out / "model.gguf", windows, reference)})
            print(_line(rows[-1]), flush=True)

    rows.sort(key=lambda r: r["bpw"])
    _write(rows, args.out, windows.size)


def _line(r: dict) -> str:
    return (f"{r['file']:<44} {r['bpw']:6.3f} {r['MB']:7.1f} {r['ppl']:8.3f} ±{r['ppl_se']:.2f} "
            f"{r['kld']:.4f} ±{r['kld_se']:.4f} {r['top1']:.3f} {r['seconds']:6.1f}s")


def _write(rows: list[dict], out: Path, tokens: int) -> None:
    header = f"{'file':<44} {'bpw':>6} {'MB':>7} {'ppl':>8} {'':6} {'KLD':>6} {'':7} {'top-1':>5} {'time':>7}"
    print(f"\nllama.cpp, wiki.utf8, {tokens} tokens, ctx 512; peak RSS {peak_rss_mb():.0f} MB")
    print(header)
    for r in rows:
        print(_line(r))
    (out / "ladder.json").write_text(json.dumps({"tokens": tokens, "peak_rss_mb": peak_rss_mb(), "rows": rows}, indent=1))
    with open(out / "ladder.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()

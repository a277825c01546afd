"""Rounding and scaling on the default model at one uniform type: round to nearest, SmoothQuant
maps (``--smooth``) and GPTQ, in llama.cpp, against llama.cpp's own file of that type.

    python bench/rounding.py [--types Q8_0,Q3_K] [--calib-tokens 16384] [--eval-tokens 8192] [--out DIR]

For each type, the rows are ``edgequant build --type T --formats gguf`` with ``--method rtn``,
``--method rtn --smooth 0.5`` and ``--method gptq`` (calibration on c4.utf8, evaluation on
wiki.utf8, windows of 512), and llama.cpp's own quantization of the reference to that type
(``llama_model_quantize``, no imatrix; for the types that are llama.cpp file types), scored on
the same windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgequant.assets import EVALUATION_TEXT, default_gguf, read_text
from edgequant.evaluation import token_windows
from edgequant.reference import reference_log_probs
from edgequant.models import load_model
from runtimes.llama_quantize import STOCK_FTYPES, quantize_stock, write_f32_copy
from runtimes.llamacpp import score_in_llama_cpp

OURS = {"rtn": ["--method", "rtn"], "rtn --smooth 0.5": ["--method", "rtn", "--smooth", "0.5"], "gptq": ["--method", "gptq"]}


def build(out: Path, ggml_type: str, options: list[str], args) -> tuple[dict, float]:
    """One ``edgequant build`` in its own process: its report and wall time."""
    started = time.time()
    cmd = [sys.executable, "-m", "edgequant.cli", "build", "--type", ggml_type, "--formats", "gguf", "--out", str(out),
           "--calib-tokens", str(args.calib_tokens), "--eval-tokens", str(args.eval_tokens), "--json", *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout), time.time() - started


def row(name: str, q: dict, seconds: float | None) -> str:
    took = f"{seconds:.0f} s" if seconds is not None else ""
    return f"| {name} | {q['ppl']:.3f} ± {q['ppl_se']:.3f} | {q['kld']:.5f} ± {q['kld_se']:.5f} | {q['top1']:.3f} | {took} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q8_0,Q3_K")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("bench-out/rounding"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("default")
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), args.eval_tokens)
    reference = reference_log_probs(loaded, windows)
    f32 = args.out / "reference-f32.gguf"
    if not f32.exists():
        write_f32_copy(default_gguf(), f32)
    print(f"# llama.cpp; {EVALUATION_TEXT}, {windows.size} tokens, ctx 512; calibration {args.calib_tokens} c4 tokens\n")
    print("| file | ppl | KLD | top-1 | build |")
    print("|---|---|---|---|---|")
    for ggml_type in args.types.split(","):
        for label, options in OURS.items():
            report, seconds = build(args.out / f"{ggml_type}-{label.replace(' ', '')}", ggml_type, options, args)
            print(row(f"edgequant {label}, {ggml_type}", report["quality"]["gguf"], seconds), flush=True)
        if ggml_type in STOCK_FTYPES:  # (a K-quant "type" of llama.cpp's is a mix with other fallbacks than ours)
            stock = args.out / f"stock-{ggml_type}.gguf"
            quantize_stock(f32, stock, ggml_type)
            print(row(f"llama.cpp {ggml_type}", score_in_llama_cpp(stock, windows, reference).as_dict(), None), flush=True)
    fp = report["quality"]["fp"]
    print(f"\nfull precision: ppl {fp['ppl']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

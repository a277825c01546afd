"""Our ONNX export against onnxruntime-genai's own builder, both int4, in ONNX Runtime on 2 threads.

    pip install onnx-ir        # the genai builder needs it (not a dependency of edgequant)
    python bench/onnx_vs_genai.py [--eval-tokens 20480] [--threads 2] [--out DIR] [--rows genai,q4_0,planned]

Rows, all of the same reference model:
- the genai builder's int4 export (``-p int4 -e cpu``: symmetric RTN, blocks of 32, accuracy_level 4,
  shared 4-bit embedding) and its ``k_quant`` variant;
- ``edgequant build --type Q4_0 --formats onnx`` with RTN and with GPTQ: every matrix in llama.cpp's
  Q4_0, which ORT holds exactly as MatMulNBits bits=4, block 32 (the same width and block as the builder);
- ``edgequant build --formats onnx --budget-mb MB`` (the default method, QuBLAST): the ONNX folder's own
  plan in ORT's configurations, within the builder's folder size (all its files).
Each is scored with the same harness (perplexity, KLD and top-1 vs full precision, wiki.utf8, ctx 512)
and timed with the same loop: a 128-token prefill, then 64 greedy decode steps, median of 3 runs
after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from edgequant.assets import EVALUATION_TEXT, default_model_dir, read_text
from edgequant.errors import EdgequantError
from edgequant.evaluation import evaluate, token_windows
from edgequant.reference import reference_log_probs
from edgequant.models import load_model
from edgequant.benchmark import PROBE
from runtimes.ort import score_in_ort

OURS = {  # row label -> (output folder, edgequant build options)
    "edgequant Q4_0 rtn": ("edgequant-rtn", ["--type", "Q4_0", "--method", "rtn"]),
    "edgequant Q4_0 gptq": ("edgequant-gptq", ["--type", "Q4_0", "--method", "gptq"]),
}
BUILDER = "genai builder int4 (rtn)"
GENAI = {  # row label -> (output folder, builder options)
    BUILDER: ("genai-rtn", []),
    "genai builder int4 (k_quant)": ("genai-k_quant", ["--extra_options", "algo_config=k_quant"]),
}


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise EdgequantError(f"{' '.join(cmd[:4])}...: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")


def export_genai(out: Path, options: list[str]) -> Path:
    if not (out / "model.onnx").exists():
        run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(default_model_dir()), "-o", str(out),
             "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache"), *options])
    return out


PLANNED = "edgequant plan at builder size"  # the row of our own ONNX plan within the builder's folder size


def export_ours(out: Path, options: list[str], calib_tokens: int) -> Path:
    if not (out / "onnx" / "model.onnx").exists():
        run([sys.executable, "-m", "edgequant.cli", "build", "--formats", "onnx", "--out", str(out),
             "--calib-tokens", str(calib_tokens), "--eval-tokens", "512", "--quiet", *options])
    return out / "onnx"


def speed(folder: Path, threads: int) -> dict:
    """The probe that ``edgequant bench`` runs, in its own process: median prefill / decode tok/s."""
    done = subprocess.run([sys.executable, str(PROBE), "ort", str(folder), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return {key: result[key]["median"] for key in ("prefill_tok_s", "decode_tok_s")} | {
        "prompt_tokens": result["prompt_tokens"], "new_tokens": result["gen_tokens"], "repeats": result["repeats"]}


def folder_mb(path: Path, every_file: bool = False) -> float:
    """MB of model.onnx + model.onnx.data (``every_file``: of the whole folder, tokenizer and config too)."""
    return sum(p.stat().st_size for p in path.iterdir() if every_file or p.suffix in (".onnx", ".data")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=20480)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench-out/onnx-vs-genai"))
    ap.add_argument("--rows", default="genai,k_quant,q4_0,planned",
                    help="which rows: genai (the builder's int4), k_quant (its k_quant option), q4_0 (ours, --type Q4_0), planned")
    args = ap.parse_args()
    rows_asked = set(args.rows.split(","))
    args.out.mkdir(parents=True, exist_ok=True)

    builder = export_genai(args.out / GENAI[BUILDER][0], [])  # the planned row's size, and the first row
    folders = {label: export_genai(args.out / name, opts) for label, (name, opts) in GENAI.items()
               if ("k_quant" if "k_quant" in label else "genai") in rows_asked}
    if "q4_0" in rows_asked:
        folders |= {label: export_ours(args.out / name, opts, args.calib_tokens) for label, (name, opts) in OURS.items()}
    if "planned" in rows_asked:
        budget = f"{folder_mb(builder, every_file=True):.3f}"
        folders[PLANNED] = export_ours(args.out / "edgequant-planned", ["--budget-mb", budget], args.calib_tokens)

    loaded = load_model("default")
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), args.eval_tokens)
    reference = reference_log_probs(loaded, windows)
    fp = evaluate(reference, windows, reference)
    print(f"full precision (torch): ppl {fp.ppl:.3f} ± {fp.ppl_se:.2f}", flush=True)
    rows = []
    for label, folder in folders.items():
        q = score_in_ort(folder, windows, reference, args.threads)
        rows.append({"model": label, "MB": folder_mb(folder), "folder_MB": folder_mb(folder, every_file=True),
                     **q.as_dict(), **speed(folder, args.threads)})
        print(_line(rows[-1]), flush=True)
    print(f"\nONNX Runtime, {args.threads} threads; wiki.utf8, {windows.size} tokens, ctx 512 (full precision: ppl {fp.ppl:.3f}); "
          f"prefill {rows[0]['prompt_tokens']} tokens, decode {rows[0]['new_tokens']} steps, median of {rows[0]['repeats']}")
    print(f"{'model':<30} {'MB':>6} {'folder':>6} {'ppl':>8} {'':6} {'KLD':>6} {'':7} {'top-1':>5} {'prefill/s':>9} {'decode/s':>8}")
    for r in rows:
        print(_line(r))
    (args.out / "onnx_vs_genai.json").write_text(json.dumps(rows, indent=1))


def _line(r: dict) -> str:
    return (f"{r['model']:<30} {r['MB']:6.1f} {r['folder_MB']:6.1f} {r['ppl']:8.3f} ±{r['ppl_se']:.2f} {r['kld']:.4f} ±{r['kld_se']:.4f} "
            f"{r['top1']:.3f} {r['prefill_tok_s']:9.0f} {r['decode_tok_s']:8.1f}")


if __name__ == "__main__":
    main()

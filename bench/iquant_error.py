"""Our encoders against llama.cpp's own quantizer on a model's real matrices, with the same importance.

    python bench/iquant_error.py [--model qwen2.5-coder-1.5b] [--types IQ1_S,IQ1_M,...]
                                 [--matrices blk.0.attn_q,blk.0.ffn_down,...] [--calib-tokens 4096]
                                 [--out DIR]

1. Writes the model's full-precision GGUF (the stock twin's, :mod:`edgequant.twin`) and computes the
   calibration importance, the mean squared input of every column, on the built-in calibration text.
2. For each type, llama.cpp quantizes that GGUF once, the chosen matrices overridden to the type
   (``llama-quantize --tensor-type``; the rest Q8_0), with that importance as its imatrix.
3. Our encoder rounds the same float32 rows (as the GGUF stores them) with the same importance.

For each type it prints the importance-weighted squared error, sum over rows and columns of
``imp[col] * (w - w_hat)^2``, of both over the chosen matrices, and ours / llama.cpp's.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import gguf
import numpy as np

from edgequant.assets import CALIBRATION_TEXT, read_text
from edgequant.calibration import cached_activation_stats
from edgequant.evaluation import token_windows
from edgequant.ggml_quants import get_type
from edgequant.models import load_model
from edgequant.twin import reference_gguf
from runtimes.llama_quantize import quantize_stock

TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"]
MATRICES = ["blk.0.attn_q", "blk.0.attn_v", "blk.0.ffn_up", "blk.0.ffn_down",
            "blk.14.attn_output", "blk.14.ffn_gate", "blk.27.attn_k", "blk.27.ffn_down"]


def weighted_error(w: np.ndarray, w_hat: np.ndarray, importance: np.ndarray) -> float:
    return float((((w - w_hat) ** 2) * importance[None, :]).sum(dtype=np.float64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--matrices", default=",".join(MATRICES))
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgequant-iquant-error"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [f"{m}.weight" for m in args.matrices.split(",")]

    loaded = load_model(args.model, streamed=True)
    windows = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    importance = cached_activation_stats(loaded, windows).importance
    source = reference_gguf(loaded, loaded.config.tie_word_embeddings)
    del loaded
    imatrix = {k: v for k, v in importance.items() if k.startswith("blk.")}
    weights = {t.name: np.array(t.data, np.float32) for t in gguf.GGUFReader(source).tensors if t.name in names}

    print(f"{args.model}: {len(names)} matrices, {sum(w.size for w in weights.values()) / 1e6:.1f} M weights; "
          f"importance from {windows.size} tokens of {CALIBRATION_TEXT}")
    print(f"{'type':8} {'llama.cpp':>12} {'ours':>12} {'ours/llama':>10} {'worst matrix':>12}  our encode")
    for qtype in args.types.split(","):
        stock = args.out / f"{qtype}.gguf"
        quantize_stock(source, stock, "Q8_0", imatrix=imatrix,
                       type_overrides={re.escape(n): qtype for n in names})
        theirs = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(weights[t.name].shape)
                  for t in gguf.GGUFReader(stock).tensors if t.name in names}
        stock.unlink()
        started, ratios, total = time.time(), [], [0.0, 0.0]
        for name, w in weights.items():
            imp = importance[name]
            ours = get_type(qtype).dequantized(w, imp)
            e_ours, e_theirs = weighted_error(w, ours, imp), weighted_error(w, theirs[name], imp)
            total[0] += e_theirs
            total[1] += e_ours
            ratios.append(e_ours / e_theirs)
        seconds = time.time() - started
        print(f"{qtype:8} {total[0]:12.5g} {total[1]:12.5g} {total[1] / total[0]:10.3f} {max(ratios):12.3f}  "
              f"{seconds:.0f} s ({sum(w.size for w in weights.values()) / seconds / 1e6:.2f} M weights/s)", flush=True)


if __name__ == "__main__":
    main()

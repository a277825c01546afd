"""Each ggml type's decode and prefill speed in llama.cpp on this host: the planner's kernel table.

    python bench/type_speed.py [--model qwen2.5-coder-1.5b] [--threads 2] [--types Q8_0,IQ2_XS,...]
                               [--llama-bench PATH] [--write device_profiles/kernels/host-x86_64.json]

For every type, llama.cpp's own quantizer writes the model with every matrix in that type (the
embedding too; the norms stay float32; ``bytes`` counts the tensor data), and ``llama-bench`` times it on ``--threads`` threads:
``pp128`` (prefill, 128 tokens from an empty cache) and ``tg64`` (64 decoded tokens), 3 runs each.
The model must have rows of 256 everywhere so that no type falls back (Qwen2.5-Coder-1.5B's are).
The very-low-bit types need an importance matrix to quantize at all; speed does not depend on it,
so a flat one (all ones) stands in. Prints the table, with the factors the planner derives from it
(:mod:`edgequant.kernels`); ``--write`` stores it as the planner's table.

Without ``--llama-bench`` it builds llama.cpp's programs first (``edgequant tools``: ~6 min on 2 cores, once).
A run takes about 1 min per type on the 1.5B model (2 cores). Run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgequant.atomic import write_text  # noqa: E402
from edgequant.devices import detect_host  # noqa: E402
from edgequant.kernels import DEFAULT, TABLES, from_measurements  # noqa: E402
from edgequant.models import load_model  # noqa: E402
from edgequant.pipeline import gguf_tensor_stats  # noqa: E402
from edgequant.twin import reference_gguf  # noqa: E402
from runtimes.llama_quantize import quantize_stock  # noqa: E402
from runtimes.rpc import build_tools  # noqa: E402

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "IQ3_S",
         "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def llama_bench(binary: Path, model: Path, threads: int) -> dict:
    """llama-bench's pp128 and tg64 on ``model``: mean and standard deviation of tok/s over 3 runs."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", "128", "-n", "64", "-r", "3", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out = {}
    for row in rows:
        key = "prefill" if row["n_prompt"] else "decode"
        out[f"{key}_tok_s"], out[f"{key}_std"] = row["avg_ts"], row["stddev_ts"]
        out["commit"] = row["build_commit"]
    return out


def uniform_file(src: Path, dst: Path, ggml_type: str, imatrix: dict[str, np.ndarray], threads: int) -> None:
    """``src`` with every matrix in ``ggml_type``, by llama.cpp's quantizer (a tensor-type override
    matching every weight bypasses its mixes)."""
    quantize_stock(src, dst, "Q8_0", imatrix=imatrix, type_overrides={r"\.weight$": ggml_type}, nthread=threads)


def flat_imatrix(loaded) -> dict[str, np.ndarray]:
    return {name: np.ones(w.shape[1], np.float32) for name, w in loaded.matrices()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--write", type=Path, default=None, help=f"store the table (the planner reads {TABLES / DEFAULT}.json)")
    args = ap.parse_args()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
    if args.llama_bench is None:
        args.llama_bench = build_tools() / "llama-bench"  # runtimes/build_llama_cpp.sh (once)
    loaded = load_model(args.model, streamed=True)
    bad = [name for name, w in loaded.matrices() if w.shape[1] % 256]
    if bad:
        sys.exit(f"{args.model}: {bad[0]} has rows of {dict(loaded.matrices())[bad[0]].shape[1]}, not a multiple of 256")
    src = reference_gguf(loaded, bool(loaded.config.tie_word_embeddings))
    imatrix = flat_imatrix(loaded)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types.split(","):
            dst = Path(tmp) / f"{t}.gguf"
            started = time.time()
            uniform_file(src, dst, t, imatrix, args.threads)
            rows[t] = {"bytes": gguf_tensor_stats(dst)[0], **llama_bench(args.llama_bench, dst, args.threads)}
            dst.unlink()
            print(f"{t:8} {rows[t]['bytes'] / 1e6:8.1f} MB  tg64 {rows[t]['decode_tok_s']:7.2f}  "
                  f"pp128 {rows[t]['prefill_tok_s']:8.2f}  ({time.time() - started:.0f} s)", file=sys.stderr)
    host = detect_host()
    commit = next(iter(rows.values()))["commit"]
    source = (f"llama-bench (build {commit}) on {host.cpu}, {args.threads} threads, {platform.machine()}: "
              f"uniform {args.model} files, tg64 and pp128, 3 runs; python bench/type_speed.py --model {args.model} "
              f"--threads {args.threads}; {time.strftime('%Y-%m-%d')}")
    costs = from_measurements(DEFAULT, source, rows)
    print(f"{source}\n")
    print("| type | MB | decode tok/s | prefill tok/s | decode factor | prefill factor |")
    print("|---|---|---|---|---|---|")
    for t, r in rows.items():
        print(f"| {t} | {r['bytes'] / 1e6:.1f} | {r['decode_tok_s']:.2f} ± {r['decode_std']:.2f} | "
              f"{r['prefill_tok_s']:.1f} ± {r['prefill_std']:.1f} | {costs.decode_factor(t):.2f} | "
              f"{costs.prefill_factor(t):.2f} |")
    if args.write:
        write_text(args.write, json.dumps({"source": source, "types": rows}, indent=1) + "\n")
        print(f"\nwrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

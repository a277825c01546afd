"""`edgequant bench --target local` against llama.cpp's own llama-bench, on the same GGUF files.

    python bench/bench_vs_llama_bench.py OUT_DIR [OUT_DIR ...] [--llama-bench PATH] [--threads 2]

Without ``--llama-bench`` it builds llama.cpp's programs first (``edgequant tools``: once, ~6 min on
2 cores) from the llama.cpp sources of the installed llama-cpp-python.

For each build folder: our probe (llama-cpp-python in a fresh process: 128-token prompt, then 64
greedy decode steps, median of 3 after a warm-up) and llama-bench's own tests with the same
shapes (``-p 128 -n 0``: prompt processing; ``-p 0 -n 64 -d 128``: 64 generated tokens after 128
in the cache), both on ``--threads`` threads. Prints decode and prefill tok/s side by side and
the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from runtimes.rpc import build_tools


def ours(folder: Path, threads: int) -> dict:
    cmd = [sys.executable, "-m", "edgequant.cli", "bench", str(folder), "--runtime", "llama.cpp",
           "--threads", str(threads), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["results"][0]


def llama_bench(binary: Path, model: Path, threads: int) -> dict:
    """llama-bench's pp128 (from an empty cache) and tg64 at depth 128 (after 128 tokens in the
    cache, where our decode steps run too), mean ± std of tok/s over 3 runs."""
    out = {}
    for name, test in (("prefill", ["-p", "128", "-n", "0"]), ("decode", ["-p", "0", "-n", "64", "-d", "128"])):
        cmd = [str(binary), "-m", str(model), "-t", str(threads), *test, "-r", "3", "-o", "json"]
        (row,) = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        out[name], out["commit"] = (row["avg_ts"], row["stddev_ts"]), row["build_commit"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.llama_bench is None:
        args.llama_bench = build_tools() / "llama-bench"  # runtimes/build_llama_cpp.sh (once)
    rows = []
    for folder in args.folders:
        mine, theirs = ours(folder, args.threads), llama_bench(args.llama_bench, folder / "model.gguf", args.threads)
        rows.append((folder.name, (folder / "model.gguf").stat().st_size / 1e6, mine, theirs))
    print(f"llama.cpp on this host, {args.threads} threads; llama-bench build {rows[0][3]['commit']}")
    print(f"{'build':<16} {'MB':>6} {'decode ours':>12} {'llama-bench':>14} {'ratio':>6} {'prefill ours':>13} {'llama-bench':>14}")
    for name, mb, mine, theirs in rows:
        d, p = mine["decode_tok_s"]["median"], mine["prefill_tok_s"]["median"]
        print(f"{name:<16} {mb:6.1f} {d:12.1f} {theirs['decode'][0]:8.1f} ±{theirs['decode'][1]:4.1f} "
              f"{d / theirs['decode'][0]:6.2f} {p:13.1f} {theirs['prefill'][0]:8.1f} ±{theirs['prefill'][1]:4.1f}")


if __name__ == "__main__":
    main()

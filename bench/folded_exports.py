"""The folded SpecQuant / RUQuant / Hadamard builds against GPTQ without transforms, at one file size.

    python bench/folded_exports.py [--budget-mb 94] [--methods gptq,specquant,ruquant,hadamard] [--out DIR]

Each row is ``edgequant build --budget-mb B --method M --formats gguf,onnx`` (default calibration:
16384 c4 tokens; evaluation: 8192 wiki tokens, ctx 512), so every file fits the same budget and
the planner spends it as it can (the Hadamard baseline carries a separate output head, which
the tied GPTQ build does not). Columns: the GGUF's size, its perplexity and KLD in llama.cpp, the
torch simulation of the same bytes with llama.cpp's 8-bit activation blocks ("sim W·A8") and
the ratio of the two perplexities, the ONNX model in ONNX Runtime as shipped, and the build time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def build(out: Path, method: str, budget_mb: float) -> tuple[dict, float]:
    if not (out / "report.json").exists():
        started = time.time()
        cmd = [sys.executable, "-m", "edgequant.cli", "build", "--method", method, "--budget-mb", str(budget_mb),
               "--formats", "gguf,onnx", "--out", str(out), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)}: {done.stderr.strip().splitlines()[-1:]}")
        (out / "seconds").write_text(f"{time.time() - started:.0f}")
    return json.loads((out / "report.json").read_text()), float((out / "seconds").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=float, default=94.0)
    parser.add_argument("--methods", default="gptq,specquant,ruquant,hadamard")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgequant-folded"))
    args = parser.parse_args()
    print(f"# every build: --budget-mb {args.budget_mb}\n")
    print("| method | GGUF MB | bpw | ppl llama.cpp | KLD llama.cpp | ppl sim W·A8 | llama.cpp / sim | KLD ORT | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        report, seconds = build(args.out / method, method, args.budget_mb)
        gguf = next(a for a in report["artifacts"] if a["format"] == "gguf")
        q = report["quality"]
        sim = q.get("gguf_sim_a8")
        sim_cols = f"{sim['ppl']:.3f} | {q['gguf']['ppl'] / sim['ppl']:.4f}" if sim else "– | –"
        print(f"| {method} | {gguf['bytes'] / 1e6:.1f} | {gguf['bpw']:.3f} | {q['gguf']['ppl']:.3f} ± {q['gguf']['ppl_se']:.3f} "
              f"| {q['gguf']['kld']:.4f} ± {q['gguf']['kld_se']:.4f} | {sim_cols} | {q['onnx']['kld']:.4f} | {seconds:.0f} |",
              flush=True)
    fp = report["quality"]["fp"]
    print(f"\nfull precision: ppl {fp['ppl']:.3f} on {fp['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

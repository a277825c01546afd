"""Weight-and-activation quantization of the default model: every method in the same torch simulation.

    python bench/activation_quant.py [--eval-tokens 20480] [--settings W4A4,W6A6,W6A6-gptq] [--methods ...] [--json FILE]

Rows: full precision, then RTN (no transform), SmoothQuant (alpha 0.5), the QuaRot-style random
Hadamard rotations, SpecQuant and RUQuant, each at every setting (default W4A4 and W6A6). The
harness is :mod:`edgequant.fakequant` (weights per output row, activations per token, both
asymmetric; embedding, norms, attention and the output head in float32); transforms are
calibrated on 4096 tokens of the built-in c4 text and scored on the first ``--eval-tokens``
tokens of wiki.utf8 in windows of 512. A ``-gptq`` setting rounds the weights with GPTQ on the same
per-row grids (sequential, on the calibration text) instead of to nearest; a ``-g32`` setting gives
every 32 weights of a row their own grid (as the runtimes' blocks do) instead of one per row. "top-1 acc kept" is the share of positions whose most
likely token is the text's next token, over the same share at full precision. "transform s"
is the wall time of the method's transform (RUQuant: smoothing, then stages 1 and 2 at every site)
on this machine. ``--methods`` also takes hadamard-folded and ruquant-folded, the forms builds ship.
A second table sweeps SpecQuant's energy share (what the truncation does on its own).
"""

from __future__ import annotations

import argparse
import json
import sys

from edgequant.activation_quant import simulate
from edgequant.assets import EVALUATION_TEXT, load_text
from edgequant.evaluation import TorchLogits, evaluate, token_windows
from edgequant.fakequant import Setting
from edgequant.models import load_model

METHODS = ("rtn", "smoothquant", "hadamard", "specquant", "ruquant")
ENERGIES = ("auto", 1.0, 0.9999, 0.999, 0.99)


def setting(label: str) -> Setting:
    """``W4A4`` -> Setting(4, 4); 16 bits means float32 (``W16A6``: activations only);
    ``W6A6-gptq``: the weights rounded by GPTQ instead of to nearest; ``W6A6-g32``: one weight
    grid per 32 weights of a row instead of per row (both: ``W6A6-gptq-g32``)."""
    bits, *suffixes = label.upper().split("-")
    w, a = (int(b) for b in bits.lstrip("W").split("A"))
    group = next((int(x[1:]) for x in suffixes if x.startswith("G") and x[1:].isdigit()), None)
    return Setting(None if w == 16 else w, None if a == 16 else a, gptq="GPTQ" in suffixes, w_group=group)


def row(label: str, method: str, q: dict, fp: dict, seconds: float | None) -> str:
    kept = q["accuracy"] / fp["accuracy"]
    secs = "" if seconds is None else f"{seconds:.0f}"
    return (f"| {label} | {method} | {q['ppl']:.2f} ± {q['ppl_se']:.2f} | {q['kld']:.4f} ± {q['kld_se']:.4f} "
            f"| {q['top1']:.3f} | {kept:.3f} | {secs} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=20480)
    parser.add_argument("--settings", default="W4A4,W6A6")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-sweep", action="store_true", help="skip the SpecQuant energy sweep")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args()

    loaded = load_model(None)
    reference = TorchLogits(loaded.model)  # run beside each simulation, window by window
    label, text = load_text(None, EVALUATION_TEXT)
    windows = token_windows(loaded.tokenizer, text, args.eval_tokens)
    fp = evaluate(reference, windows, reference).as_dict()
    common = {"loaded": loaded, "reference": reference, "eval_tokens": args.eval_tokens}
    results = [{"method": "fp", "setting": "W16A16", "quality": fp, "transform_seconds": None}]
    print(f"# {loaded.name}, {windows.size} tokens of {label}, ctx {windows.shape[1]}, FP accuracy {fp['accuracy']:.3f}\n")
    print("| setting | method | ppl | KLD | top-1 agree | top-1 acc kept | transform s |")
    print("|---|---|---|---|---|---|---|")
    print(row("W16A16", "fp", fp, fp, None), flush=True)
    for s in args.settings.split(","):
        for method in args.methods.split(","):
            r = simulate(method, setting(s), **common)
            results.append(r)
            print(row(r["setting"], method, r["quality"], fp, r["transform_seconds"]), flush=True)
    if not args.no_sweep:
        s = args.settings.split(",")[0]
        print(f"\nSpecQuant energy share at {s} (1.0 = SmoothQuant alone; the cut's own cost is the FP column):\n")
        print("| energy | ppl | KLD | top-1 agree | FP ppl after the cut | mean share kept | mean bins kept |")
        print("|---|---|---|---|---|---|---|")
        for energy in ENERGIES:
            r = simulate("specquant", setting(s), energy=energy, **common)
            cut = simulate("specquant", Setting(None, None), energy=energy, **common) if energy != "auto" else None
            results.append({**r, "energy": energy, "fp_after_cut": cut and cut["quality"]})
            q, d = r["quality"], r["details"]
            fp_cut = f"{cut['quality']['ppl']:.2f}" if cut else "(per row, for the setting)"
            print(f"| {energy} | {q['ppl']:.2f} ± {q['ppl_se']:.2f} | {q['kld']:.4f} | {q['top1']:.3f} | {fp_cut} "
                  f"| {d['mean_energy_kept']:.5f} | {d['mean_bins_kept']:.4f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a row is not a whole number of 256-weight blocks, Q2_K and Q3_K cannot hold it. llama.cpp
falls back to Q4_0 there; edgequant takes IQ4_NL, the same 4.5 bits per weight. This prints, for
every such matrix of the default model, the squared error of both encoders (ours, which gguf-py
decodes), plain and weighted by the calibration importance E[x^2].

    python bench/iq4_nl_vs_q4_0.py [--calib-tokens 2048]
"""

from __future__ import annotations

import argparse

import gguf

from edgequant.assets import CALIBRATION_TEXT, read_text
from edgequant.calibration import activation_stats
from edgequant.evaluation import token_windows
from edgequant.ggml_quants import get_type
from edgequant.models import load_model

TYPES = ("Q4_0", "IQ4_NL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=2048)
    args = parser.parse_args()
    loaded = load_model("default")
    windows = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    importance = activation_stats(loaded, windows).importance
    weighted, plain, matrices = dict.fromkeys(TYPES, 0.0), dict.fromkeys(TYPES, 0.0), 0
    for name, w in loaded.matrices():
        w = w.detach().float().numpy()
        if w.shape[1] % 256 == 0:
            continue
        matrices += 1
        for t in TYPES:
            qtype = get_type(t)
            error = gguf.quants.dequantize(qtype.quantize(w, importance[name]), qtype.ggml_type).reshape(w.shape) - w
            weighted[t] += float((error**2 * importance[name]).sum())
            plain[t] += float((error**2).sum())
    print(f"{matrices} matrices with rows of {loaded.config.hidden_size}, importance from {windows.size} tokens of c4.utf8")
    print("| squared error | Q4_0 | IQ4_NL | IQ4_NL / Q4_0 |\n|---|---|---|---|")
    for label, error in (("importance-weighted", weighted), ("plain", plain)):
        print(f"| {label} | {error['Q4_0']:.4g} | {error['IQ4_NL']:.4g} | {error['IQ4_NL'] / error['Q4_0']:.3f} |")


if __name__ == "__main__":
    main()

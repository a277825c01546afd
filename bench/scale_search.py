"""QuBLAST's scaling-map search alone, run again for a finished build: its time, and its choices
against the ones the build made (its ``report.json``).

    python bench/scale_search.py BUILD_DIR

The search reads the build's model, calibration text and tokens (``manifest.json``) and its plan's
types (``plan.json``), as the build did. Run it on a build made before a change to the search to
see what the change costs or saves, without running a whole build again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgequant.assets import CALIBRATION_TEXT, load_text
from edgequant.evaluation import token_windows
from edgequant.models import load_model
from edgequant.smoothing import search_scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path, help="a folder written by edgequant build --method qublast")
    args = ap.parse_args()
    settings = json.loads((args.build / "manifest.json").read_text())["settings"]
    types = {t["name"]: t["ggml_type"] for t in json.loads((args.build / "plan.json").read_text())["tensors"]}
    before = {(c["block"], c["group"]): c for c in json.loads((args.build / "report.json").read_text())["scaling_maps"]}
    loaded = load_model(settings["model"], streamed=True)  # one float32 block in memory at a time, as the build
    _, text = load_text(settings["calib_text"], CALIBRATION_TEXT)
    windows = token_windows(loaded.tokenizer, text, settings["calib_tokens"], settings["ctx"])
    started = time.time()
    choices, _ = search_scales(loaded, windows, types)
    print(f"search: {time.time() - started:.0f} s")
    print("| block | group | alpha before | error ratio before | alpha now | error ratio now |")
    print("|---|---|---|---|---|---|")
    for c in choices:
        was = before[(c.block, c.group)]
        if was["alpha"] != c.alpha:
            print(f"| {c.block} | {c.group} | {was['alpha']} | {was['error_ratio']:.4f} | {c.alpha} | {c.error_ratio:.4f} |")
    same = sum(before[(c.block, c.group)]["alpha"] == c.alpha for c in choices)
    print(f"{same} of {len(choices)} groups chose the alpha the build chose")


if __name__ == "__main__":
    main()

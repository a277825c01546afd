"""QuBLAST's sensitivity, measured at the output against the Fisher estimate, on the default model.

    python bench/sensitivity.py [--model default] [--tokens 512] [--budgets-mb 93.4,105.4]

Both tables are made on the first ``--tokens`` calibration tokens (c4.utf8) with the build's
importance: ``measured`` runs the model from each part's block to the logits for every option
(cost ~ depth^2), ``fisher`` estimates from the Fisher information at the block's output (cost ~
depth). Printed: the time of each, Spearman's rank correlation over every (part, option) entry and
over the block parts alone, and, at each budget, the plan each table gives (the exact knapsack) with
its summed KL under the *measured* table: how much worse the estimate's plan is, as the measure sees it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgequant.assets import CALIBRATION_TEXT, read_text
from edgequant.calibration import cached_activation_stats
from edgequant.evaluation import token_windows
from edgequant.models import load_model
from edgequant.pipeline import matrices_of
from edgequant.planning import knapsack
from edgequant.sensitivity import estimate, measure, rank_correlation, split_parts


def plan(table, parts, max_bytes: int) -> list[int]:
    entries = table.by_part()
    return knapsack([[(e.bytes, e.kl) for e in entries[p.key]] for p in parts], max_bytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--budgets-mb", default="93.4,105.4", help="tensor bytes of the plans compared")
    args = parser.parse_args()

    loaded = load_model(args.model, streamed=True)
    calib = token_windows(loaded.tokenizer, read_text(CALIBRATION_TEXT), args.calib_tokens)
    importance = cached_activation_stats(loaded, calib).importance
    windows = calib[: max(1, args.tokens // calib.shape[1]), : min(calib.shape[1], args.tokens)]
    matrices, other = matrices_of(loaded)
    parts = split_parts(matrices)
    tables, seconds = {}, {}
    for name, fn in (("measured", measure), ("fisher", estimate)):
        started = time.time()
        tables[name] = fn(loaded, parts, windows, importance)
        seconds[name] = time.time() - started
    m, f = ([e.kl for e in tables[k].entries] for k in ("measured", "fisher"))
    blocks = [i for i, e in enumerate(tables["measured"].entries) if e.part != "embd"]
    ratio = np.median([f[i] / m[i] for i in blocks if m[i] > 0])
    print(f"# {loaded.name}, {windows.size} calibration tokens, {len(m)} entries ({len(parts)} parts)\n")
    print("| table | seconds |\n|---|---|")
    for name in tables:
        print(f"| {name} | {seconds[name]:.0f} |")
    print(f"\nSpearman, every entry: {rank_correlation(m, f):.3f}; block parts only: "
          f"{rank_correlation([m[i] for i in blocks], [f[i] for i in blocks]):.3f}; "
          f"median estimate / measure (block parts): {ratio:.2f}\n")
    print("| tensor MB | summed measured KL, measured plan | summed measured KL, estimated plan | parts that differ |")
    print("|---|---|---|---|")
    measured_entries = tables["measured"].by_part()
    for mb in (float(b) for b in args.budgets_mb.split(",")):
        max_bytes = int(mb * 1e6) - 4 * other
        chosen = {k: plan(tables[k], parts, max_bytes) for k in tables}
        kl = {k: sum(measured_entries[p.key][j].kl for p, j in zip(parts, chosen[k])) for k in chosen}
        differ = sum(a != b for a, b in zip(chosen["measured"], chosen["fisher"]))
        print(f"| {mb:.1f} | {kl['measured']:.4f} | {kl['fisher']:.4f} | {differ} of {len(parts)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill and decode speed of several ONNX folders in ONNX Runtime, alternated in one process.

    python bench/onnx_speed.py FOLDER FOLDER... [--rounds 12] [--threads 2]

Each round runs every folder once: a 128-token prefill, then 64 greedy decode steps, through the
same KV-cache loop the evaluation uses. The table gives each folder's median rates and, round by
round, its rates over the first folder's (the median of those ratios): on a shared host whose
absolute speed drifts, alternating the folders and comparing within a round is what keeps the
comparison fair.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from runtimes.ort import OrtDecoder


def one_round(decoder: OrtDecoder, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one prompt and ``steps`` greedy tokens."""
    start = time.perf_counter()
    logits, cache = decoder.step(prompt, decoder.empty_cache())
    prefilled = time.perf_counter()
    for _ in range(steps):
        logits, cache = decoder.step(np.array([int(logits[-1].argmax())]), cache)
    return len(prompt) / (prefilled - start), steps / (time.perf_counter() - prefilled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()

    decoders = [OrtDecoder(f, n_threads=args.threads) for f in args.folders]
    vocab = min(d.session.get_outputs()[0].shape[-1] for d in decoders)  # logits [batch, seq, vocab]
    prompt = np.random.default_rng(0).integers(100, vocab, args.prompt_tokens)
    for d in decoders:  # warm-up: first runs pack weights and grow buffers
        one_round(d, prompt, 4)
    rates = [[one_round(d, prompt, args.gen_tokens) for d in decoders] for _ in range(args.rounds)]

    print(f"ONNX Runtime, {args.threads} threads, {args.prompt_tokens}-token prefill then {args.gen_tokens} decode steps, "
          f"median of {args.rounds} alternated rounds")
    print(f"{'folder':<40} {'prefill/s':>9} {'decode/s':>8} {'prefill ×':>9} {'decode ×':>8}")
    for i, folder in enumerate(args.folders):
        prefill = statistics.median(r[i][0] for r in rates)
        decode = statistics.median(r[i][1] for r in rates)
        prefill_x = statistics.median(r[i][0] / r[0][0] for r in rates)
        decode_x = statistics.median(r[i][1] / r[0][1] for r in rates)
        print(f"{str(folder):<40} {prefill:9.0f} {decode:8.1f} {prefill_x:9.3f} {decode_x:8.3f}")


if __name__ == "__main__":
    main()

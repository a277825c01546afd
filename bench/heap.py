"""Freed memory that glibc keeps: a reference walk's resident heap with glibc's dynamic mmap
threshold (raised to the largest block freed, up to 32 MB) and with a fixed one of 1 MB. In both,
the walk trims the heap as it leaves each block (:func:`edgequant.memory.trim_heap`), as builds do.

    python bench/heap.py [--model qwen2.5-coder-1.5b] [--tokens 8192]

Each case runs in a process of its own, with llama.cpp's and ONNX Runtime's libraries imported as
in a build: load the model streamed, walk it block by block over the evaluation windows (the
stored reference of :mod:`edgequant.reference`), then ``malloc_trim``. Printed per case: resident
memory (VmRSS), the ``[heap]`` mapping's resident part (smaps), and the walk's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CASE = r"""
import ctypes, json, sys, time
import edgequant.pipeline, exporters.onnx, runtimes.llamacpp  # the libraries a build loads
from edgequant.assets import read_text
from edgequant.evaluation import token_windows
from edgequant.memory import trim_heap
from edgequant.models import load_model
from edgequant.reference import _write_log_probs

def memory():
    status = {l.split()[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")}
    heap, name = 0, None
    for line in open("/proc/self/smaps"):
        f = line.split()
        if "-" in f[0] and ":" not in f[0]:
            name = f[5] if len(f) > 5 else ""
        elif f[0] == "Rss:" and name == "[heap]":
            heap += int(f[1])
    return {"rss_mb": status["VmRSS:"] // 1024, "heap_mb": heap // 1024}

model, tokens, mapped, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
if mapped:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, 1 MB
loaded = load_model(model, streamed=True)
windows = token_windows(loaded.tokenizer, read_text("wiki.utf8"), tokens, 512)
row = {"loaded": memory()}
started = time.time()
_write_log_probs(loaded, windows, out)
row["walked"], row["seconds"] = memory(), round(time.time() - started)
trim_heap()
row["trimmed"] = memory()
print(json.dumps(row))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    print(f"{args.model}, {args.tokens} tokens: RSS / resident heap, MB")
    print("| glibc mmap threshold (heap trimmed after each block) | loaded | walked | after malloc_trim | walk |")
    print("|---|---|---|---|---|")
    for mapped, label in ((False, "dynamic (glibc's default)"), (True, "fixed at 1 MB")):
        with tempfile.NamedTemporaryFile(suffix=".f16") as out:
            result = subprocess.run([sys.executable, "-c", CASE, args.model, str(args.tokens), str(int(mapped)), out.name],
                                    capture_output=True, text=True, check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        cells = [f"{row[k]['rss_mb']} / {row[k]['heap_mb']}" for k in ("loaded", "walked", "trimmed")]
        print(f"| {label} | " + " | ".join(cells) + f" | {row['seconds']} s |")


if __name__ == "__main__":
    main()

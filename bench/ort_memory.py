"""ONNX Runtime's peak memory on ONNX folders against the rule the planner predicts it with.

    python bench/ort_memory.py FOLDER... [--prompts 64,256,512] [--gen-tokens 16]
    python bench/ort_memory.py --matrices     # resident bytes over stored bytes, one MatMulNBits per configuration
    python bench/ort_memory.py --speed FOLDER FOLDER...  # decode and prefill against the speed rule, and its fit

For each folder and prompt, ``runtimes/probe.py`` (what ``edgequant bench`` runs) prefills a
prompt and decodes ``--gen-tokens`` steps in a fresh process; its peak RSS is set beside
:mod:`edgequant.ort_budget`'s rule, evaluated on the folder's own graph: every initializer's
stored bytes, 12 bytes a ``MatMulNBits`` block for MLAS's prepacking, a lookup table shared with
the output matrix counted again, the float32 KV cache twice, the prompt's logits, the process.
Any folder works (ours, onnxruntime-genai's builder's).

``--speed`` runs the probe's 128-token prefill and 64 decode steps (3 runs, after a warm-up) on each
folder and sets the rates beside the rule's on the host profile; with two folders or more it also
fits the rule's two decode constants (a fixed cost per block, the bandwidth's efficiency) to them
by least squares, and prefill's efficiency as the geometric mean of the folders'.

``--matrices`` measures the prepacking itself: a 4096-wide ``MatMulNBits`` of 4096 and of 12288
rows per configuration, each in a fresh process; the difference of their resident memory after
the session is made, over the difference of their stored bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgequant import ort_budget
from edgequant.devices import load_device

PROBE = Path(__file__).resolve().parent.parent / "runtimes" / "probe.py"


def probe(folder: Path, prompt: int, gen: int, threads: int, repeats: int = 1) -> dict:
    done = subprocess.run([sys.executable, str(PROBE), "ort", str(folder), "--prompt-tokens", str(prompt),
                           "--gen-tokens", str(gen), "--repeats", str(repeats), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def speed_table(folders: list[Path], threads: int) -> None:
    host = load_device("host")
    print("| folder | prefill tok/s measured / predicted | decode tok/s measured / predicted |")
    print("|---|---:|---:|")
    rows = []
    for folder in folders:
        terms = ort_budget.folder_terms(folder, host)
        predicted, run = ort_budget.at(terms, 128 + 64, 128), probe(folder, 128, 64, threads, repeats=3)
        measured = run["prefill_tok_s"]["median"], run["decode_tok_s"]["median"]
        rows.append((terms, measured))
        print(f"| {folder} | {measured[0]:.1f} / {predicted['prefill_tok_s']:.1f} | {measured[1]:.2f} / "
              f"{predicted['decode_tok_s']:.2f} |", flush=True)
    if len(rows) < 2:
        return
    # seconds a token = blocks * work / ops + bytes / (efficiency * bandwidth), the KV cache read at the mean context
    blocks = [t["fixed_seconds"] / ort_budget.LAYER_WORK * host.int8_ops_per_s for t, _ in rows]
    read = [t["decode_read_bytes"] + t["kv_read_bytes_per_token"] * (128 + 32) for t, _ in rows]
    a = np.array([[b / host.int8_ops_per_s, r / host.effective_bandwidth] for b, r in zip(blocks, read)])
    (work, inverse), *_ = np.linalg.lstsq(a, np.array([1 / m[1] for _, m in rows]), rcond=None)
    prefill = [m[0] / (t["prefill_tok_s"] / ort_budget.PREFILL_EFFICIENCY) for t, m in rows]
    print(f"fit: LAYER_WORK = {work:.3g}, DECODE_EFFICIENCY = {1 / inverse:.3f}, "
          f"PREFILL_EFFICIENCY = {float(np.exp(np.mean(np.log(prefill)))):.3f} (per folder {', '.join(f'{x:.3f}' for x in prefill)})")


def folders_table(folders: list[Path], prompts: list[int], gen: int, threads: int) -> None:
    print("| folder | prompt | predicted MB | measured peak RSS MB | measured / predicted |")
    print("|---|---:|---:|---:|---:|")
    for folder in folders:
        terms = ort_budget.folder_terms(folder, load_device("host"))
        for prompt in prompts:
            predicted = ort_budget.at(terms, prompt + gen, prompt)["memory_bytes"]
            measured = probe(folder, prompt, gen, threads)["peak_rss_bytes"]
            print(f"| {folder} | {prompt} | {predicted / 1e6:.1f} | {measured / 1e6:.1f} | {measured / predicted:.3f} |",
                  flush=True)


# --- one matrix per configuration ------------------------------------------------------------

CONFIGS = [(4, b, z) for b in (32, 64, 128, 256) for z in (False, True)] + [(8, 32, False), (8, 32, True)]


def _matrix_model(path: Path, bits: int, block: int, zero_points: bool, rows: int, cols: int = 4096) -> int:
    """A one-node model with random codes, its data beside it; returns the stored bytes."""
    rng = np.random.default_rng(0)
    n_blocks = cols // block
    inits = [numpy_helper.from_array(rng.integers(0, 256, (rows, n_blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array(rng.random(rows * n_blocks, dtype=np.float32), "S")]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (rows, -(-n_blocks * bits // 8)), dtype=np.uint8), "Z"))
    node = helper.make_node("MatMulNBits", ["A"] + [i.name for i in inits], ["Y"], domain="com.microsoft",
                            K=cols, N=rows, bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return sum(i.nbytes for i in (numpy_helper.to_array(t) for t in inits))


def matrices_table() -> None:
    print("| configuration | stored bytes / weight | resident / stored | rule: (stored + 12 a block) / stored |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for bits, block, zp in CONFIGS:
            grown = []
            for rows in (4096, 12288):
                path = Path(tmp) / f"m{rows}.onnx"
                stored = _matrix_model(path, bits, block, zp, rows)
                rss = json.loads(subprocess.run([sys.executable, str(PROBE), "session", str(path)], capture_output=True,
                                                text=True, check=True).stdout)["session_bytes"]
                grown.append((stored, rss))
                for f in Path(tmp).iterdir():
                    f.unlink()
            (s0, r0), (s1, r1) = grown
            ratio = (r1 - r0) / (s1 - s0)
            per_block = block * bits / 8 + 4 + (bits / 8 if zp else 0)  # stored bytes of a block
            rule = 1 + ort_budget.PACKED_BYTES_PER_BLOCK / per_block
            name = f"MNB{bits}_B{block}_{'ZP' if zp else 'SYM'}"
            print(f"| {name} | {per_block / block:.4f} | {ratio:.3f} | {rule:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="*")
    ap.add_argument("--prompts", default="64,256,512")
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matrices", action="store_true")
    ap.add_argument("--speed", action="store_true")
    args = ap.parse_args()
    if args.matrices:
        matrices_table()
    if args.speed:
        speed_table(args.folders, args.threads)
    elif args.folders:
        folders_table(args.folders, [int(p) for p in args.prompts.split(",")], args.gen_tokens, args.threads)


if __name__ == "__main__":
    main()

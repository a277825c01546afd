"""Measure one model in one runtime on the machine this script runs on, and print JSON.

This file is self-contained on purpose: ``edgequant bench`` copies it to the target (a board over
ssh, a phone over adb, or runs it here) and starts it with the target's own Python, which needs
only numpy and the runtime (llama-cpp-python or onnxruntime), not edgequant.

    python3 probe.py which                       -> which runtimes this machine has
    python3 probe.py llama.cpp MODEL.gguf [opts] -> time to first token, prefill/decode tok/s, peak RSS
    python3 probe.py ort ONNX_DIR [opts]
    python3 probe.py session MODEL.onnx          -> the resident bytes making an ONNX Runtime session adds

One run = a prompt of ``--prompt-tokens`` random tokens (prefill), then ``--gen-tokens`` greedy
steps (decode). The first run warms up and is discarded; the median and spread of
``--repeats`` runs are reported. Peak RSS is this process's own (the runtime runs in it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time


def peak_rss_bytes() -> int:
    """This program's peak resident memory: VmHWM where there is /proc (``ru_maxrss`` also counts
    what the parent held when it forked this process, before ``exec``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def device_identity() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(), "ram_bytes": None}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                info["cpu"] = value.strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                info["ram_bytes"] = int(line.split()[1]) * 1024
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return info


def which() -> dict:
    found = {}
    for runtime, module in (("llama.cpp", "llama_cpp"), ("ort", "onnxruntime")):
        try:
            found[runtime] = __import__(module).__version__
        except Exception:
            pass
    return found


class LlamaCpp:
    def __init__(self, path: str, ctx: int, threads: int):
        import llama_cpp

        self.version = llama_cpp.__version__
        # flash attention on: what llama.cpp's own tools pick ("auto") on the CPU; llama-cpp-python
        # defaults to off, which decoded 20% slower here
        self.llm = llama_cpp.Llama(path, n_ctx=ctx, n_batch=ctx, n_threads=threads, flash_attn=True, verbose=False)
        self.vocab = self.llm.n_vocab()

    def prefill(self, tokens: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(tokens)
        return self._next()

    def decode(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()

    def _next(self) -> int:
        import numpy as np

        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))


class Ort:
    def __init__(self, path: str, ctx: int, threads: int):
        import numpy as np
        import onnxruntime as ort

        self.np, self.version = np, ort.__version__
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 4
        self.session = ort.InferenceSession(os.path.join(path, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        config = json.load(open(os.path.join(path, "genai_config.json")))["model"]
        self.vocab, self.context = config["vocab_size"], config.get("context_length")
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past = [i.name for i in past]
        decoder = config["decoder"]  # a symbolic dimension (genai's builder): its config says
        self.kv = {i.name: (i.shape[1] if isinstance(i.shape[1], int) else decoder["num_key_value_heads"],
                            i.shape[3] if isinstance(i.shape[3], int) else decoder["head_size"]) for i in past}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, tokens: list[int]) -> int:
        np = self.np
        past_len = next(iter(self.cache.values())).shape[2]
        feed = {"input_ids": np.array([tokens], np.int64),
                "attention_mask": np.ones((1, past_len + len(tokens)), np.int64), **self.cache}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        self.cache = {n: out[n.replace("past_key_values.", "present.")] for n in self.past}
        return int(out["logits"][0, -1].argmax())

    def prefill(self, tokens: list[int]) -> int:
        self.cache = {n: self.np.zeros((1, self.kv[n][0], 0, self.kv[n][1]), self.np.float32) for n in self.past}
        return self._run(tokens)

    def decode(self, token: int) -> int:
        return self._run([token])


def session_bytes(path: str) -> int:
    """Resident bytes that making an ONNX Runtime session of ``path`` adds (one thread): what it
    holds of the model, with the runtime's own fixed share."""
    import onnxruntime as ort

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

    before, options = rss(), ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    held = rss() - before
    del session
    return held


def measure(runner, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(100, runner.vocab) for _ in range(prompt_tokens)]
    ttft, prefill, decode = [], [], []
    for run in range(repeats + 1):
        start = time.perf_counter()
        token = runner.prefill(prompt)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(gen_tokens):
            token = runner.decode(token)
        elapsed = time.perf_counter() - start
        if run:  # run 0 is the warm-up
            ttft.append(first)
            prefill.append(prompt_tokens / first)
            decode.append(gen_tokens / elapsed)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for name, v in (("ttft_s", ttft), ("prefill_tok_s", prefill), ("decode_tok_s", decode))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runtime", choices=["which", "llama.cpp", "ort", "session"])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.runtime == "which":
        print(json.dumps({"runtimes": which(), "device": device_identity()}))
        return
    if args.runtime == "session":
        print(json.dumps({"session_bytes": session_bytes(args.model)}))
        return
    tokens = args.prompt_tokens + args.gen_tokens
    runner = (LlamaCpp if args.runtime == "llama.cpp" else Ort)(args.model, max(args.ctx, tokens), args.threads)
    if tokens > (getattr(runner, "context", None) or tokens):
        sys.exit(f"{args.model} holds {runner.context} positions (the context it was built for); a prompt of "
                 f"{args.prompt_tokens} and {args.gen_tokens} new tokens need {tokens}: rebuild with a longer --context")
    result = measure(runner, args.prompt_tokens, args.gen_tokens, args.repeats)
    print(json.dumps({
        "runtime": args.runtime, "runtime_version": runner.version, "model": args.model,
        "threads": args.threads, "ctx": args.ctx, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
        "repeats": args.repeats, **result,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": device_identity(),
    }))


if __name__ == "__main__":
    main()

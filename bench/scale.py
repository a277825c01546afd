"""Peak memory and time of a build, per stage, as models grow.

    python bench/scale.py [--models default,qwen2.5-coder-1.5b,synthetic-8b] [--out DIR] [-- BUILD OPTIONS]

Each model is built in a process of its own (``edgequant build --model M --out DIR/M`` plus the
options after ``--``; defaults per model below), and the stages are timed as they end, with the
process's resident memory then and its peak so far (``/proc/self/status``: VmRSS, VmHWM). The last
table gives each build's wall time, peak RSS and file size.

``synthetic-8b`` is a model with Llama-3.1-8B's shapes (32 blocks, hidden 4096, FFN 14336, 32/8
heads, vocabulary 128256) and random bf16 weights from a fixed seed, written once to
``DIR/synthetic-8b-model`` as sharded safetensors (16 GB), with the default model's tokenizer.
``qwen2.5-coder-1.5b`` must be fetched first (``edgequant fetch qwen2.5-coder-1.5b``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

OPTIONS = {  # per model, unless options are given after --
    "default": ["--device", "jetson-orin"],
    "qwen2.5-coder-1.5b": ["--bpw", "3.0", "--device", "raspberry-pi-5-8gb", "--formats", "gguf"],
    "synthetic-8b": ["--calib-tokens", "2048", "--bpw", "4.5", "--formats", "gguf", "--eval-tokens", "2048"],
}
LLAMA_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def memory_gb() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1e6, int(status["VmHWM"].split()[0]) / 1e6


def child(model: str, out: Path, options: list[str]) -> None:
    """Run one build in this process, printing a JSON line as each stage ends."""
    from edgequant.cli import app  # noqa: F401  (the command line's environment settings)
    from edgequant.errors import EdgequantError
    from edgequant.pipeline import BuildOptions, build
    from edgequant.progress import Progress

    class Stages(Progress):
        @contextmanager
        def step(self, description, total=None, in_bytes=False):
            started = time.time()
            yield lambda *_: None
            rss, peak = memory_gb()
            print(json.dumps({"stage": description, "seconds": time.time() - started, "rss_gb": rss, "peak_gb": peak}),
                  flush=True)

    names = {"--bpw": "bpw", "--device": "device", "--formats": "formats", "--calib-tokens": "calib_tokens",
             "--eval-tokens": "eval_tokens", "--method": "method", "--type": "ggml_type", "--budget-mb": "budget_mb"}
    kwargs = {names[k]: v for k, v in zip(options[::2], options[1::2])}
    for k in ("bpw", "budget_mb"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    for k in ("calib_tokens", "eval_tokens"):
        if k in kwargs:
            kwargs[k] = int(kwargs[k])
    try:
        report = build(BuildOptions(model=model, out=out, **kwargs), Stages())
    except EdgequantError as e:
        sys.exit(f"error: {e}")
    gguf = next((a for a in report["artifacts"] if a["format"] == "gguf"), report["artifacts"][0])
    print(json.dumps({"done": True, "bytes": gguf["bytes"], "bpw": gguf["bpw"],
                      "kld": report["quality"].get("gguf", {}).get("kld"), "peak_gb": memory_gb()[1]}), flush=True)


def synthetic_8b(folder: Path) -> Path:
    """Llama-3.1-8B's shapes, random bf16 weights (seed 0), written one tensor at a time."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgequant.assets import default_model_dir

    tmp = folder.with_name(folder.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", **LLAMA_8B)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, index = {}, 0, index + 1

    for name, p in skeleton.state_dict().items():
        t = torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape, generator=gen) * (1 / p.shape[-1] ** 0.5)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 2 << 30:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.torch_dtype = "bfloat16"
    config.save_pretrained(tmp)
    shutil.copy(default_model_dir() / "tokenizer_config.json", tmp / "tokenizer_config.json")
    padded_tokenizer(default_model_dir() / "tokenizer.json", tmp / "tokenizer.json", config.vocab_size)
    os.replace(tmp, folder)
    return folder


def padded_tokenizer(source: Path, target: Path, size: int) -> None:
    """The default model's BPE tokenizer with its vocabulary padded to ``size`` tokens. The padding
    tokens have no merges that make them, so the text tokenizes as before; they only give each of
    the embedding's rows a token, as a model's own vocabulary would."""
    tokenizer = json.loads(source.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), size)})
    target.write_text(json.dumps(tokenizer, ensure_ascii=False))


def main() -> int:
    argv = sys.argv[1:]
    options = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,qwen2.5-coder-1.5b,synthetic-8b")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgequant-scale"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), options or [])
        return 0
    rows = []
    for name in args.models.split(","):
        model = str(synthetic_8b(args.out / "synthetic-8b-model")) if name == "synthetic-8b" else name
        opts = options if options is not None else OPTIONS.get(name, [])
        print(f"\n## {name}: edgequant build --model {model} {' '.join(opts)}\n", flush=True)
        print("| stage | s | RSS GB | peak GB |\n|---|---|---|---|", flush=True)
        started = time.time()
        proc = subprocess.Popen([sys.executable, __file__, "--child", model, str(args.out / name), "--", *opts],
                                stdout=subprocess.PIPE, text=True)
        done = None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("done"):
                done = event
            else:
                print(f"| {event['stage']} | {event['seconds']:.1f} | {event['rss_gb']:.2f} | {event['peak_gb']:.2f} |",
                      flush=True)
        if proc.wait() != 0 or done is None:
            print(f"(the build of {name} failed)")
            continue
        rows.append((name, time.time() - started, done))
    print("\n| model | wall | peak RSS | file | bpw | KLD (llama.cpp) |\n|---|---|---|---|---|---|")
    for name, seconds, d in rows:
        kld = f"{d['kld']:.4f}" if d["kld"] is not None else ""
        print(f"| {name} | {seconds / 60:.1f} min | {d['peak_gb']:.2f} GB | {d['bytes'] / 1e6:.1f} MB | {d['bpw']:.3f} | {kld} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

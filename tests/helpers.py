"""Helpers the test files share (fixtures live in conftest.py; no test file imports another)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

# What the chat tests ask. The full-precision default model answers "The capital city of France is
# Paris." with a lead of 0.73 nats or more for every greedy token ("What is the capital of France?"
# led by 0.08 nats on its first token, and CI's CPU flipped it).
QUESTION = "Name the capital city of France."


def edgequant(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run the command line as a user does, in its own process."""
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def in_process(*args) -> subprocess.CompletedProcess:
    """The command line's own entry point, run in this process (no interpreter start-up)."""
    from typer.testing import CliRunner

    from edgequant.cli import app

    done = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(args, done.exit_code, done.stdout, done.stderr)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_line_error(result) -> str:
    """The single stderr line of a clean failure (and nothing else)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgequant: error: ")
    return lines[0]


def assert_clean_failure(result, *words) -> str:
    """A clean failure whose one line holds every one of ``words``; returns the line."""
    message = one_line_error(result)
    for word in words:
        assert word in message, message
    return message


def weights(rows=48, cols=512, seed=0) -> np.ndarray:
    """A heavy-tailed test matrix with a few exact zeros and one all-zero block (the edge cases)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(rows, cols)).astype(np.float32) * 0.02
    w[0, :7] = 0.0
    w[1, :256] = 0.0
    return w


def _session(nodes, inputs, outputs, inits):
    import onnxruntime as ort
    from onnx import helper

    from exporters.onnx.graph import OPSETS

    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=OPSETS)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _nbits_inits(w) -> list:
    from onnx import numpy_helper

    rows, cols = w.shape
    inits = [numpy_helper.from_array(w.packed.reshape(rows, -1, w.block_size * w.bits // 8), "B"),
             numpy_helper.from_array(w.scales, "S")]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.stored_zero_points(), "Z"))
    return inits


def run_matmul_nbits(w, a: np.ndarray) -> np.ndarray:
    """``a @ w.T`` by one ``MatMulNBits`` node (accuracy_level 0) on a blockwise matrix ``w``
    (:class:`exporters.onnx.nbits.BlockQuantized`), in ONNX Runtime."""
    from onnx import TensorProto, helper

    rows, cols = w.shape
    inits = _nbits_inits(w)
    node = helper.make_node("MatMulNBits", ["A"] + [i.name for i in inits], ["Y"], domain="com.microsoft",
                            K=cols, N=rows, bits=w.bits, block_size=w.block_size, accuracy_level=0)
    session = _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], rows])], inits)
    return session.run(None, {"A": a})[0]


def run_gather_block_quantized(w, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of the blockwise table ``w``, looked up by ``GatherBlockQuantized`` in ONNX Runtime."""
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = w.shape
    inits = _nbits_inits(w)
    inits[0] = numpy_helper.from_array(w.packed, "B")
    node = helper.make_node("GatherBlockQuantized", ["B", "I", *[i.name for i in inits[1:]]], ["Y"], domain="com.microsoft",
                            bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)
    session = _session([node], [helper.make_tensor_value_info("I", TensorProto.INT64, list(ids.shape))],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [*ids.shape, cols])], inits)
    return session.run(None, {"I": ids})[0]


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / b


def assert_same_model(runtime: dict, simulated: dict, ppl: float = 0.01, kld: float = 0.1) -> None:
    """Two qualities of the same bytes (a runtime's and the torch simulation's, say) agree: perplexity
    within ``ppl``, KL divergence from full precision within ``kld``, both relative."""
    assert relative_gap(runtime["ppl"], simulated["ppl"]) < ppl, (runtime, simulated)
    assert relative_gap(runtime["kld"], simulated["kld"]) < kld, (runtime, simulated)


def assert_runs_as_simulated(quality: dict) -> None:
    """A build's GGUF in llama.cpp and its torch simulation agree: perplexity within 1%, and KL
    divergence from full precision within 10% or within what llama.cpp adds to a float file by
    itself (its F16 KV cache and 8-bit activation blocks, an absolute 1.5e-4: a Q8_0 build's own
    KL is about 1e-4). The simulation is the one with llama.cpp's 8-bit activation blocks where the
    family's adapter asks for it (``gguf_sim_a8``)."""
    runtime, simulated = quality["gguf"], quality.get("gguf_sim_a8", quality["gguf_sim"])
    assert_same_model(runtime, simulated, kld=float("inf"))
    assert abs(runtime["kld"] - simulated["kld"]) < max(1.5e-4, 0.1 * simulated["kld"]), (runtime, simulated)


TINY = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048,
        "tie_word_embeddings": True, "initializer_range": 0.05}  # at 4.5 bpw: KLD ~0.02, top-1 agreement ~0.5


def write_tiny_model(folder, model_type: str = "llama", seed: int = 0, **config):
    """A small random ``model_type`` model (llama, mistral, qwen2, qwen3) with the first
    ``vocab_size`` tokens of the default model's tokenizer, saved as a Hugging Face folder. Its widths
    (256, 768, heads of 64) are multiples of 256 or 32 as ggml's blocks need; ``config`` overrides any
    of :data:`TINY`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**TINY, **config}
    torch.manual_seed(seed)
    made = AutoConfig.for_model(model_type, **config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # a family's defaults (phi3's 32000) past the vocabulary
        if isinstance(getattr(made, key, None), int) and getattr(made, key) >= made.vocab_size:
            setattr(made, key, None)
    model = AutoModelForCausalLM.from_config(made)
    perturbed = (".bias", "norm.weight") if model_type.startswith("gemma") else (".bias", "q_norm.weight", "k_norm.weight")
    with torch.no_grad():  # biases (qwen2), per-head q/k norms (qwen3), gemma's (1 + w) norms away from their neutral init
        for name, p in model.named_parameters():
            if name.endswith(perturbed):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    write_first_tokens(folder, config["vocab_size"])
    return folder


def write_first_tokens(folder, vocab: int) -> None:
    """The default model's byte-level BPE cut to its first ``vocab`` tokens, into ``folder``: its
    merges are ranked in the order of the ids they make, so the first ``vocab`` tokens and the merges
    that make them are a tokenizer of their own (same pre-tokenizer, special tokens and template)."""
    import json
    import shutil

    from edgequant.assets import default_model_dir

    source = default_model_dir()
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = spec["model"]
    first_merged = len(bpe["vocab"]) - len(bpe["merges"])  # the ids before it are bytes and special tokens
    bpe["vocab"] = {token: i for token, i in bpe["vocab"].items() if i < vocab}
    bpe["merges"] = bpe["merges"][: max(0, vocab - first_merged)]
    (Path(folder) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    shutil.copy(source / "tokenizer_config.json", Path(folder) / "tokenizer_config.json")


def write_spm_tokenizer(folder, vocab: int = 3000) -> None:
    """A Llama-2-style SentencePiece BPE tokenizer (byte fallback, digits split, "▁" for spaces)
    trained on the built-in c4 text, written over ``folder``'s tokenizer as ``tokenizer.model``
    and the ``tokenizer.json`` transformers makes of it."""
    import json
    import tempfile

    import sentencepiece
    from transformers import AutoTokenizer

    from edgequant.assets import read_text

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c4.txt"
        corpus.write_text(read_text("c4.utf8")[:400_000], encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab, model_type="bpe",
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer.json").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)


# ------------------------------------------------------------------------- README's commands

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.DOTALL)


def commands(block: str) -> list[list[str]]:
    """The edgequant command lines of a bash block, comments dropped; ``a && edgequant ...`` keeps
    the edgequant part (the install step before it is CI's own)."""
    out = []
    for line in block.splitlines():
        line = line.split("#")[0].strip()
        if "edgequant " in line:
            out.append(shlex.split(line[line.index("edgequant "):]))
    return out


FIRST = commands(blocks("bash")[0])  # the newcomer's build (the other line of that block is the test command)
QUICKSTART = commands(blocks("bash")[1])
PYTHON = blocks("python")[0]


def float_file_in_llama_cpp_and_torch(folder, tmp_path) -> dict:
    """The model in ``folder`` written as a float32 GGUF and scored in llama.cpp and in torch on
    the same two 512-token windows of the evaluation text, torch the reference: {runtime: quality}."""
    import torch

    from edgequant.assets import EVALUATION_TEXT, read_text
    from edgequant.evaluation import score, token_windows
    from edgequant.models import load_model
    from exporters.gguf import write_gguf
    from runtimes.llamacpp import LlamaCppLogits

    loaded = load_model(str(folder))
    path = Path(tmp_path) / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    windows = token_windows(loaded.tokenizer, read_text(EVALUATION_TEXT), 1024, 512)

    def torch_logits(window):
        with torch.inference_mode():
            return loaded.model(torch.from_numpy(window)[None], use_cache=False).logits[0].numpy()

    return score({"torch": torch_logits, "llama.cpp": LlamaCppLogits(path, 512)}, windows, reference=torch_logits)


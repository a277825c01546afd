"""What an ONNX folder costs in ONNX Runtime: its memory and its speed, from its plan's own bytes.

The llama.cpp model (:mod:`edgequant.budget`) memory-maps a GGUF and reads it as it is. ONNX
Runtime does not, and these rules were read off it (onnxruntime 1.32, CPU provider, x86-64 AVX2
host; ``python bench/ort_memory.py``):

* **weights**: the external data is memory-mapped, then MLAS *prepacks* every ``MatMulNBits``
  into an allocation of its own (the codes, plus 12 bytes a block) and lets the mapped codes go;
  the float32 scales and the zero points stay mapped. So a matrix holds its stored bytes plus
  ``12`` a block: 1.60x its stored bytes at 4-bit blocks of 32, 1.33x at 64, 1.18x at 128,
  1.09x at 256, 1.33x at 8-bit blocks of 32. A tied embedding's codes stay mapped too (the
  ``GatherBlockQuantized`` lookup reads them) and prepacking reads all of them.
* **KV cache**: float32 (the CPU ``GroupQueryAttention``), twice over as ``edgequant bench``
  runs it: the past fed in and the present returned. (onnxruntime-genai holds it once, for its
  whole ``max_length``.)
* **activations**: the float32 logits of every prompt token dominate; with the layers'
  activations and the arena's rounding they come to ``1.25x`` the logits (the default model at
  prompts of 64 to 512 tokens: 1.18x to 1.29x).
* **process**: Python, numpy and onnxruntime (47.0 MB) and a session's fixed 10.5 MB.

Speed, read off the same host (``python bench/ort_memory.py --speed``: the default model's plan and
Qwen2.5-Coder-1.5B from its GGUF's codes, 2 threads): a decoded token costs a fixed time per block
(the graph's kernels launched one by one: ``LAYER_WORK`` int8 operations' worth of the device's
time, 0.116 ms a block here) plus reading the stored weights and the float32 KV cache at
``DECODE_EFFICIENCY`` times the profile's llama.cpp bandwidth. Prefill is compute bound, at
``PREFILL_EFFICIENCY`` of the device's int8 rate over two operations per weight a
``MatMulNBits`` multiplies (0.575 on the default model, 0.716 on the 1.5B: their geometric mean). On a board, where ARM's MLAS packs and computes differently, these are this host's
ratios: ``edgequant bench`` there shows how far they hold.
"""

from __future__ import annotations

import json
from pathlib import Path

from .devices import Device
from .errors import EdgequantError
from .fleet import Fleet
from .ggml_quants import get_type
from .planning import EMBEDDING_NAMES, Plan

PACKED_BYTES_PER_BLOCK = 12  # what MLAS's prepacked buffer adds to the stored codes, per block
PROCESS_BYTES = 57_500_000  # Python + numpy + onnxruntime (47.0 MB) and a session's fixed 10.5 MB
KV_COPIES = 2  # the past fed in and the present returned
ACTIVATION_LOGITS = 1.25  # peak activations over the prompt's float32 logits
N_PROMPT = 512  # the prompt the device prediction makes room for (as llama.cpp's micro-batch)
LAYER_WORK = 4.64e7  # a decoded token's fixed cost per block, in int8 operations of the device's time
DECODE_EFFICIENCY = 1.18  # the bandwidth ORT reads weights at, over the profile's llama.cpp rate
PREFILL_EFFICIENCY = 0.64  # ORT's prefill rate over the device's int8 rate, at 2 operations a multiplied weight
SOURCE = "python bench/ort_memory.py on the host (AMD EPYC, 2 threads, onnxruntime 1.32)"


def weight_bytes(plan: Plan) -> int:
    """The bytes ONNX Runtime holds for ``plan``'s tensors: each matrix's stored bytes, the extra of
    its prepacked blocks where a ``MatMulNBits`` computes with it (a tied table's codes then stay
    mapped for the lookup as well; an untied table is only looked up), the float32 tensors."""
    total = 4 * plan.other_params
    for m in plan.matrices:
        qtype = get_type(plan.types[m.name])
        total += plan.matrix_bytes(m)
        if _multiplied(plan, m.name):
            total += PACKED_BYTES_PER_BLOCK * m.rows * (m.cols // qtype.block)
        if m.name in EMBEDDING_NAMES and _tied(plan):
            total += m.params * qtype.bits // 8
    return total


def decode_read_bytes(plan: Plan) -> int:
    """Stored bytes of the matrices a decoded token multiplies (an embedding lookup reads one row)."""
    return sum(plan.matrix_bytes(m) for m in plan.matrices if _multiplied(plan, m.name))


def _tied(plan: Plan) -> bool:
    return "output.weight" not in plan.types


def _multiplied(plan: Plan, name: str) -> bool:
    """Whether a ``MatMulNBits`` computes with the matrix (all but an untied input embedding)."""
    return name != "token_embd.weight" or _tied(plan)


def kv_bytes(shape, ctx: int) -> int:
    """The float32 KV cache at ``ctx`` positions, as many times as it is held (or a recurrent state)."""
    return KV_COPIES * _kv_read_per_token(shape) * ctx + shape.state_bytes


def _kv_read_per_token(shape) -> int:
    return 2 * shape.kv_heads * shape.head_dim * 4


def runtime_bytes(shape, ctx: int) -> int:
    """Memory besides the weights: the process, the KV cache, a prompt's activations."""
    return PROCESS_BYTES + kv_bytes(shape, ctx) + int(ACTIVATION_LOGITS * 4 * shape.n_vocab) * min(N_PROMPT, ctx)


def max_read_bytes(device: Device | Fleet, shape, ctx: int, tok_s: float) -> float:
    """The weights' bytes a token may read for ``device`` to decode ``tok_s`` tokens a second."""
    seconds = 1 / tok_s - _fixed_seconds(device, shape.layers)
    return DECODE_EFFICIENCY * device.effective_bandwidth * seconds - _kv_read_per_token(shape) * ctx


def _fixed_seconds(device: Device | Fleet, layers: int) -> float:
    return layers * LAYER_WORK / device.int8_ops_per_s


def rule(device: Device | Fleet, shape, plan: Plan, positions: int) -> dict:
    """The prediction's terms, so that it can be evaluated at any context and prompt (:func:`at`);
    ``positions``: the rotary tables' rows (float32 cosines and sines of half a head each)."""
    computed = sum(m.params for m in plan.matrices if _multiplied(plan, m.name))
    rope = 4 * positions * shape.head_dim
    return _terms(device, weight_bytes(plan) + rope, decode_read_bytes(plan), computed, shape.layers,
                  _kv_read_per_token(shape), shape.n_vocab, shape.state_bytes)


def folder_terms(folder: Path, device: Device | Fleet) -> dict:
    """:func:`rule`'s terms read off an ONNX folder's own graph and genai_config.json (any folder:
    ours, one made from a GGUF's codes, onnxruntime-genai's builder's): every initializer's
    stored bytes, 12 a ``MatMulNBits`` block, a lookup table shared with the output matrix again."""
    import onnx
    from onnx import helper

    model = onnx.load(Path(folder) / "model.onnx", load_external_data=False)
    stored = {t.name: _stored_bytes(t) for t in model.graph.initializer}
    weights, read, computed, matmul_weights = sum(stored.values()), 0, 0, set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            weights += PACKED_BYTES_PER_BLOCK * a["N"] * -(-a["K"] // a["block_size"])
            read += sum(stored.get(i, 0) for i in node.input[1:4])
            computed += a["N"] * a["K"]
            matmul_weights.add(node.input[1])
    weights += sum(stored[n.input[0]] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in matmul_weights)
    config = json.loads((Path(folder) / "genai_config.json").read_text())["model"]
    kv_heads = [helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "GroupQueryAttention"
                for a in n.attribute if a.name == "kv_num_heads"]  # each block's own (a pruned model's differ)
    kv_token = 2 * sum(kv_heads) * config["decoder"]["head_size"] * 4
    return _terms(device, weights, read, computed, len(kv_heads), kv_token, config["vocab_size"])


def _terms(device: Device | Fleet, weights: int, read: int, computed: int, layers: int, kv_token: int, vocab: int,
           state_bytes: int = 0) -> dict:
    """``weights``: bytes held; ``read``: stored bytes a decoded token reads; ``computed``: the
    weights a prompt token multiplies; ``kv_token``: the float32 KV cache's bytes a position."""
    return {"weights_bytes": weights, "process_bytes": PROCESS_BYTES, "kv_bytes_per_token": KV_COPIES * kv_token,
            "state_bytes": state_bytes, "prompt_bytes_per_token": int(ACTIVATION_LOGITS * 4 * vocab),
            "decode_read_bytes": read, "kv_read_bytes_per_token": kv_token, "fixed_seconds": _fixed_seconds(device, layers),
            "bandwidth": DECODE_EFFICIENCY * device.effective_bandwidth,
            "prefill_tok_s": PREFILL_EFFICIENCY * device.int8_ops_per_s / (2 * computed), "source": SOURCE}


def _stored_bytes(tensor) -> int:
    external = {e.key: int(e.value) for e in tensor.external_data if e.key == "length"}
    if external:
        return external["length"]
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).nbytes


def at(terms: dict, ctx: int, prompt: int) -> dict:
    """Memory and decode speed of the folder holding ``ctx`` positions after a ``prompt``-token prefill."""
    kv = terms["kv_bytes_per_token"] * ctx + terms["state_bytes"]
    activations = terms["prompt_bytes_per_token"] * prompt
    seconds = terms["fixed_seconds"] + (terms["decode_read_bytes"] + terms["kv_read_bytes_per_token"] * ctx) / terms["bandwidth"]
    return {"memory_bytes": terms["process_bytes"] + terms["weights_bytes"] + kv + activations,
            "kv_cache_bytes": kv, "activation_bytes": activations,
            "decode_tok_s": 1 / seconds, "prefill_tok_s": terms["prefill_tok_s"]}


def predict(device: Device | Fleet, shape, plan: Plan, file_bytes: int, ctx: int, positions: int | None = None) -> dict:
    """The folder on ``device`` with ``ctx`` positions and a prompt of up to ``N_PROMPT`` tokens,
    with the same keys as :func:`edgequant.budget.predict` (and ``terms``, for ``edgequant bench``);
    ``positions``: the rows of its rotary tables (default ``ctx``)."""
    terms = rule(device, shape, plan, positions or ctx)
    now = at(terms, ctx, min(N_PROMPT, ctx))
    return {
        "runtime": "onnxruntime",
        "file_bytes": file_bytes,
        "weights_resident_bytes": terms["weights_bytes"],
        "kv_cache_bytes": now["kv_cache_bytes"],
        "runtime_overhead_bytes": now["memory_bytes"] - terms["weights_bytes"] - now["kv_cache_bytes"],
        "memory_bytes": now["memory_bytes"],
        "usable_bytes": device.usable_bytes,
        "fits": now["memory_bytes"] <= device.usable_bytes,
        "decode_tok_s": now["decode_tok_s"],
        "prefill_tok_s": now["prefill_tok_s"],
        "ctx": ctx,
        "terms": terms,
    }


def check(predicted: dict, device: str, what: str, min_tok_s: float | None = None) -> None:
    """A one-line error when ``what`` does not fit in ``device``'s memory as ONNX Runtime holds
    it, or decodes slower there than ``min_tok_s``."""
    if not predicted["fits"]:
        raise EdgequantError(f"does not fit: ONNX Runtime would hold {predicted['memory_bytes'] / 1e6:.1f} MB for {what} "
                             f"on {device}, {predicted['usable_bytes'] / 1e6:.1f} MB usable")
    if min_tok_s is not None and predicted["decode_tok_s"] < min_tok_s:
        raise EdgequantError(f"--min-tok-s cannot be met: {what} decodes at {predicted['decode_tok_s']:.1f} tok/s "
                             f"in ONNX Runtime on {device} (predicted)")

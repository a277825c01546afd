"""Export a GGUF file as an ONNX Runtime model folder that onnxruntime-genai can also run.

The ONNX weights come from the GGUF file's own bytes (see :mod:`exporters.onnx.nbits`), so the
ONNX model runs the codes that were evaluated in llama.cpp. The folder holds ``model.onnx``
(graph) + ``model.onnx.data`` (weights), ``genai_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from edgequant.atomic import atomic_dir
from edgequant.errors import EdgequantError, check_number
from edgequant.ggml_quants import TYPES
from edgequant.adapters import head_dim
from edgequant.adapters.base import permute_qk, qk_heads
from edgequant.models import gguf_config, gguf_tokenizer, read_gguf, read_tensor_data

from .graph import ExternalData, decoder
from .nbits import BlockQuantized, from_ggml

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: ORT's fast CPU path


def export_onnx(gguf_path: Path, out_dir: Path, tokenizer=None, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                context: int | None = None) -> dict:
    """Write the ONNX folder ``out_dir`` (atomically) from ``gguf_path``; return what was written.

    ``tokenizer`` (a transformers tokenizer) defaults to the one stored in the GGUF file.
    ``context``: the most tokens a sequence may hold (the rotary tables' rows, and genai's
    ``max_length``, for which it allocates its KV cache); default the model's own limit. A build
    passes the context its plan budgeted."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_number("--accuracy-level", accuracy_level, at_least=0, at_most=4)
    reader = read_gguf(gguf_path)
    family, config = gguf_config(reader)
    if family.onnx_refusal:
        raise EdgequantError(family.onnx_refusal)
    floats, matrices = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if len(t.shape) == 1 or kind in ("F32", "F16"):
            if len(t.shape) != 1:
                raise EdgequantError(f"{t.name} is {kind}; the ONNX export needs every matrix quantized")
            floats[t.name] = np.asarray(t.data, np.float32)
        elif kind not in TYPES:
            raise EdgequantError(f"{t.name} has ggml type {kind}, which the ONNX export does not convert")
        else:
            matrices[t.name] = t
    weights = _ConvertedWeights(gguf_path, matrices, config, family.permute_qk)
    out_features = {name: int(t.shape[1]) for name, t in matrices.items()}  # gguf-py lists dimensions innermost first
    positions = min(context or config.max_position_embeddings, config.max_position_embeddings)
    tokenizer = tokenizer or gguf_tokenizer(gguf_path)
    with atomic_dir(out_dir) as stage:
        with open(stage / DATA_FILE, "wb") as data:
            model = decoder(config, weights, out_features, floats, rope_cache(config, positions), accuracy_level,
                            ExternalData(data, DATA_FILE))
        if left := sorted(matrices.keys() - weights.converted.keys()):
            raise EdgequantError(f"the ONNX graph has no place for {', '.join(left)}")
        onnx.save_model(model, stage / MODEL_FILE)
        tokenizer.save_pretrained(stage)
        (stage / "genai_config.json").write_text(json.dumps(genai_config(config, tokenizer, positions), indent=1))
    return summary(out_dir, weights.converted, accuracy_level)


@dataclass
class _Converted:
    """What the summary keeps of a converted matrix once its arrays are written and let go."""

    ggml_type: str
    bits: int
    block_size: int
    zero_points: bool
    max_abs_error: float
    nbytes: int
    n_weights: int


class _ConvertedWeights(Mapping):
    """The GGUF's matrices, each converted to ORT's layout when the graph asks for it (once);
    only the record of what was converted stays (``converted``)."""

    def __init__(self, gguf_path: Path, tensors: dict, config, permute_qk: bool):
        self.gguf_path, self.tensors, self.config, self.permute_qk = gguf_path, tensors, config, permute_qk
        self.converted: dict[str, _Converted] = {}

    def __getitem__(self, name: str) -> BlockQuantized:
        assert name not in self.converted, f"{name} converted twice"
        t = self.tensors[name]
        w = from_ggml(t.tensor_type.name, read_tensor_data(self.gguf_path, t))  # not through the reader's map, whose pages would stay
        heads = qk_heads(self.config, name, w.shape[0])
        if self.permute_qk and heads:  # back to Hugging Face's rotary layout
            w = _permuted_rows(w, heads)
        self.converted[name] = _Converted(w.ggml_type, w.bits, w.block_size, w.zero_points is not None,
                                          w.max_abs_error, w.nbytes, int(np.prod(w.shape)))
        return w

    def __contains__(self, name) -> bool:  # Mapping's own would convert the matrix
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _permuted_rows(w: BlockQuantized, heads: int) -> BlockQuantized:
    def rows(a):
        return None if a is None else np.ascontiguousarray(permute_qk(a, heads, to_gguf=False))

    return BlockQuantized(w.ggml_type, w.bits, w.block_size, rows(w.packed), rows(w.scales), rows(w.zero_points),
                          w.max_abs_error)


def rope_cache(config, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables (positions, head_dim / 2) from the architecture's own rotary module,
    so every rope scaling that transformers knows is applied the same way."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary_cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    with torch.no_grad():
        cos, sin = rotary_cls(config)(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def genai_config(config, tokenizer, positions: int) -> dict:
    """What onnxruntime-genai needs to drive the decoder and its KV cache."""
    dim = head_dim(config)
    eos = tokenizer.eos_token_id if config.eos_token_id is None else config.eos_token_id
    bos = tokenizer.bos_token_id if config.bos_token_id is None else config.bos_token_id
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            "vocab_size": config.vocab_size,
            "context_length": positions,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": dim,
                "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": positions,
                   "past_present_share_buffer": True, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "repetition_penalty": 1.0, "min_length": 0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0},
    }


def summary(out_dir: Path, converted: dict[str, _Converted], accuracy_level: int) -> dict:
    """Files, sizes and the ggml -> MatMulNBits mapping of an exported folder."""
    mapping = {}
    for w in converted.values():
        m = mapping.setdefault(w.ggml_type, {"bits": w.bits, "block_size": w.block_size, "tensors": 0,
                                             "zero_points": w.zero_points, "max_abs_error": 0.0})
        m["tensors"] += 1
        m["max_abs_error"] = max(m["max_abs_error"], w.max_abs_error)
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    weight_bytes = sum(w.nbytes for w in converted.values())
    return {
        "format": "onnx",
        "path": str(out_dir),
        "bytes": sum(p.stat().st_size for p in files),
        "weight_bytes": weight_bytes,
        "bits_used": sorted(Counter(w.bits for w in converted.values())),
        "accuracy_level": accuracy_level,
        "mapping": mapping,
        "bpw": weight_bytes * 8 / sum(w.n_weights for w in converted.values()),
        "files": [p.name for p in files],
    }

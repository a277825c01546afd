"""ONNX Runtime model folders that onnxruntime-genai can also run.

Two sources: a build's own ONNX plan (:func:`export_planned`: every matrix rounded to a
``MatMulNBits`` configuration of :mod:`edgequant.ort_quants`), or a GGUF file's bytes
(:func:`export_onnx`, ``edgequant export-onnx``: the very codes llama.cpp runs, converted by
:mod:`exporters.onnx.nbits`). The folder holds ``model.onnx`` (graph) + ``model.onnx.data``
(weights), ``genai_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import importlib
import json
import tempfile
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
from .nbits import BlockQuantized, from_ggml, from_ort

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: ORT's fast CPU path


def export_onnx(gguf_path: Path, out_dir: Path, tokenizer=None, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                context: int | None = None) -> dict:
    """Write the ONNX folder ``out_dir`` (atomically) from ``gguf_path``'s codes; return what was written.

    ``tokenizer`` (a transformers tokenizer) defaults to the one stored in the GGUF file.
    ``context``: the most tokens a sequence may hold (the rotary tables' rows, and genai's
    ``max_length``, for which it allocates its KV cache); default the model's own limit."""
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
    weights = _ConvertedWeights(matrices, lambda t: from_ggml(t.tensor_type.name, read_tensor_data(gguf_path, t)),
                                config if family.permute_qk else None)  # not through the reader's map, whose pages would stay
    out_features = {name: int(t.shape[1]) for name, t in matrices.items()}  # gguf-py lists dimensions innermost first
    return _write_folder(out_dir, config, weights, out_features, floats, tokenizer or gguf_tokenizer(gguf_path),
                         context, accuracy_level)


def export_planned(loaded, encoded: Mapping, out_dir: Path, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                   context: int | None = None) -> dict:
    """Write the ONNX folder ``out_dir`` (atomically) from an ONNX plan's own codes: ``encoded``
    maps GGUF names to tensors in ONNX Runtime's configurations (:mod:`edgequant.ort_quants`, rows
    in Hugging Face's order); norms and biases come from ``loaded``, the model they were rounded from."""
    check_number("--accuracy-level", accuracy_level, at_least=0, at_most=4)
    if loaded.adapter.onnx_refusal:
        raise EdgequantError(loaded.adapter.onnx_refusal)
    floats = {loaded.gguf_name(n): t.float().numpy() for n, t in loaded.state() if t.ndim == 1}
    weights = _ConvertedWeights(encoded, lambda e: from_ort(e.ggml_type, e.data))
    out_features = {name: encoded[name].data.shape[0] for name in encoded}
    return _write_folder(Path(out_dir), loaded.config, weights, out_features, floats, loaded.tokenizer, context,
                         accuracy_level)


def _write_folder(out_dir: Path, config, weights: _ConvertedWeights, out_features: dict[str, int],
                  floats: dict[str, np.ndarray], tokenizer, context: int | None, accuracy_level: int) -> dict:
    """The graph, its weights file, genai_config.json and the tokenizer, atomically in ``out_dir``."""
    positions = min(context or config.max_position_embeddings, config.max_position_embeddings)
    with atomic_dir(out_dir) as stage:
        with open(stage / DATA_FILE, "wb") as data:
            model = decoder(config, weights, out_features, floats, rope_cache(config, positions), accuracy_level,
                            ExternalData(data, DATA_FILE))
        if left := sorted(weights.keys() - weights.converted.keys()):
            raise EdgequantError(f"the ONNX graph has no place for {', '.join(left)}")
        onnx.save_model(model, stage / MODEL_FILE)
        tokenizer.save_pretrained(stage)
        (stage / "genai_config.json").write_text(json.dumps(genai_config(config, tokenizer, positions), indent=1))
    return summary(out_dir, weights.converted, accuracy_level)


GRAPH_BYTES = 16384  # model.onnx besides its weights: this much, plus GRAPH_BYTES_PER_BLOCK a block (nodes and
GRAPH_BYTES_PER_BLOCK = 8192  # initializer records; measured ~4.5 KB a block for SmolLM2's, so this is an upper bound)
GENAI_CONFIG_BYTES = 4096


def overhead_bytes(loaded, context: int) -> int:
    """Bytes of an ONNX folder besides its matrices and float tensors: the tokenizer files (written
    to measure them), genai_config.json, the rotary tables for ``context`` positions and the graph."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        tokenizer_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
    config = loaded.config
    positions = min(context, config.max_position_embeddings)
    rope = 2 * positions * (head_dim(config) // 2) * 4
    return tokenizer_bytes + GENAI_CONFIG_BYTES + rope + GRAPH_BYTES + GRAPH_BYTES_PER_BLOCK * config.num_hidden_layers


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
    """Matrices, each converted to ORT's layout by ``convert`` when the graph asks for it (once);
    only the record of what was converted stays (``converted``). ``permuted_config``: q/k rows
    are in llama.cpp's rotary order (put back to Hugging Face's), for a model of that config."""

    def __init__(self, tensors: Mapping, convert, permuted_config=None):
        self.tensors, self.convert, self.config = tensors, convert, permuted_config
        self.converted: dict[str, _Converted] = {}

    def __getitem__(self, name: str) -> BlockQuantized:
        assert name not in self.converted, f"{name} converted twice"
        w = self.convert(self.tensors[name])
        heads = qk_heads(self.config, name, w.shape[0]) if self.config is not None else None
        if heads:  # back to Hugging Face's rotary layout
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

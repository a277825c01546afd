"""The decoder as an ONNX graph for ONNX Runtime, built node by node with ``onnx.helper``.

The graph follows the layout onnxruntime-genai expects of a llama-family decoder:

    inputs   input_ids [batch, seq] int64, attention_mask [batch, total] int64,
             past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim] float32
    outputs  logits [batch, seq, vocab], present.{i}.key/.value [batch, kv_heads, total, head_dim]

Per block: RMSNorm -> q/k/v ``MatMulNBits`` (+ bias for qwen2, per-head q/k RMSNorm for qwen3) ->
``GroupQueryAttention`` (rotary inside, from a cos/sin cache; past and present KV) -> o
``MatMulNBits`` -> residual + RMSNorm -> gate/up ``MatMulNBits`` -> SiLU(gate) * up -> down
``MatMulNBits`` -> residual + the next RMSNorm. The token embedding is a ``GatherBlockQuantized``
table; with tied embeddings it reads the very bytes of the output ``MatMulNBits`` (one copy in the
file).

What ONNX Runtime can run as one kernel is written as one node, as onnxruntime-genai's builder
does (ORT does not fuse these itself): each residual add and the norm after it are one
``SkipSimplifiedLayerNormalization``, whose fourth output carries the residual on; q, k and v are
one ``MatMulNBits`` over their rows stacked (and their biases as its bias input) when their
layouts match (input width, bits, block size, zero points or none; biases on all three or none),
feeding ``GroupQueryAttention`` as a packed query; gate and up likewise, then a ``Split``.
Matrices whose layouts differ keep a node each.

Initializers go to the external data file as they are made (:class:`ExternalData`), and the
matrices are asked for a block's q/k/v or gate/up at a time (``weights`` may convert lazily), so a
model's weights are never in memory whole, neither as arrays nor as protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgequant.adapters import head_dim

from .nbits import BlockQuantized

MS = "com.microsoft"
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]


EXTERNAL_THRESHOLD = 1024  # initializers of this many bytes or more live in the data file


class ExternalData:
    """The weights file beside ``model.onnx``: each array is appended as it is made and its
    initializer only points at it (location, offset, length)."""

    def __init__(self, file, location: str):
        self.file, self.location = file, location

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        offset = self.file.tell()
        self.file.write(memoryview(array).cast("B"))
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        return t


class _Graph:
    """Collects nodes and initializers; every helper returns the name of its output."""

    def __init__(self, accuracy_level: int, data: ExternalData | None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.accuracy_level = accuracy_level
        self.data = data

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        external = self.data is not None and array.nbytes >= EXTERNAL_THRESHOLD
        self.inits.append(self.data.tensor(name, array) if external else numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", outputs: list[str] | None = None, **attrs):
        """Add a node; its output is named after the node unless ``outputs`` names several."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs or [name], name=name, domain=domain, **attrs))
        return outputs or name

    def rms_norm(self, x: str, weight: np.ndarray, name: str, eps: float) -> str:
        w = self.const(f"{name}.weight", weight.astype(np.float32))
        return self.op("SimplifiedLayerNormalization", [x, w], name, epsilon=eps, axis=-1, stash_type=1)

    def skip_rms_norm(self, x: str, skip: str, weight: np.ndarray, name: str, eps: float,
                      residual: str | None = None) -> str | list[str]:
        """RMSNorm(x + skip) in one node; with ``residual``, also x + skip under that name."""
        w = self.const(f"{name}.weight", weight.astype(np.float32))
        outputs = [name, "", "", residual] if residual else None
        return self.op("SkipSimplifiedLayerNormalization", [x, skip, w], name, MS, outputs=outputs, epsilon=eps)

    def nbits_weight(self, name: str, w: BlockQuantized) -> list[str]:
        """Initializers of one blockwise matrix: packed codes, scales (and zero points)."""
        rows, cols = w.shape
        blob = w.block_size * w.bits // 8
        inputs = [self.const(f"{name}.qweight", w.packed.reshape(rows, cols // w.block_size, blob)),
                  self.const(f"{name}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(self.const(f"{name}.zero_points", w.stored_zero_points()))
        return inputs

    def matmul(self, x: str, name: str, w: BlockQuantized, bias: np.ndarray | None = None) -> str:
        inputs = self.nbits_weight(name, w)
        if bias is not None:  # inputs 3 and 4 (zero points, g_idx) may be absent: named ""
            inputs = inputs + [""] * (4 - len(inputs)) + [self.const(f"{name}.bias", bias.astype(np.float32))]
        return self.matmul_of(x, name, inputs, w.shape, w.bits, w.block_size)

    def matmul_of(self, x: str, name: str, weight_inputs: list[str], shape: tuple[int, int], bits: int, block: int) -> str:
        """``MatMulNBits`` on initializers already made (the tied head reads the embedding's)."""
        rows, cols = shape
        return self.op("MatMulNBits", [x, *weight_inputs], name, MS,
                       K=cols, N=rows, bits=bits, block_size=block, accuracy_level=self.accuracy_level)

    def attention_inputs(self, h: str, p: str, weights: Mapping[str, BlockQuantized], floats: dict[str, np.ndarray],
                         dim: int, eps: float) -> list[str]:
        """GroupQueryAttention's query, key and value from ``h``: a packed query (key and value
        "") when q/k/v are one node, else three."""
        parts = ("q", "k", "v")
        ws = [weights[f"{p}.attn_{part}.weight"] for part in parts]
        biases = [floats.get(f"{p}.attn_{part}.bias") for part in parts]
        normed = f"{p}.attn_q_norm.weight" in floats  # qwen3: RMSNorm per head of q and k
        if same_layout(ws) and (all(b is None for b in biases) or all(b is not None for b in biases)):
            bias = None if biases[0] is None else np.concatenate(biases)
            qkv = self.matmul(h, f"{p}.attn_qkv", stacked(ws), bias)
            if not normed:
                return [qkv, "", ""]
            sizes = self.const(f"{p}.qkv_sizes", np.array([w.shape[0] for w in ws], np.int64))
            outputs = self.op("Split", [qkv, sizes], f"{p}.qkv_split", axis=-1, outputs=[f"{p}.attn_{part}" for part in parts])
        else:
            outputs = [self.matmul(h, f"{p}.attn_{part}", w, b) for part, w, b in zip(parts, ws, biases)]
        if normed:
            outputs[:2] = [self.head_norm(y, p, part, floats, dim, eps) for part, y in zip(("q", "k"), outputs)]
        return outputs

    def gate_and_up(self, h: str, p: str, weights: Mapping[str, BlockQuantized]) -> list[str]:
        """The MLP's gate and up projections of ``h``: one node and a Split when their layouts match."""
        ws = [weights[f"{p}.ffn_gate.weight"], weights[f"{p}.ffn_up.weight"]]
        if not same_layout(ws):
            return [self.matmul(h, f"{p}.ffn_{part}", w) for part, w in zip(("gate", "up"), ws)]
        both = self.matmul(h, f"{p}.ffn_gate_up", stacked(ws))
        sizes = self.const(f"{p}.gate_up_sizes", np.array([w.shape[0] for w in ws], np.int64))
        return self.op("Split", [both, sizes], f"{p}.gate_up_split", axis=-1, outputs=[f"{p}.ffn_gate", f"{p}.ffn_up"])

    def head_norm(self, y: str, p: str, part: str, floats: dict[str, np.ndarray], dim: int, eps: float) -> str:
        heads = self.op("Reshape", [y, self.const(f"{p}.{part}_heads_shape", np.array([0, 0, -1, dim], np.int64))], f"{p}.{part}_heads")
        y = self.rms_norm(heads, floats[f"{p}.attn_{part}_norm.weight"], f"{p}.attn_{part}_norm", eps)
        return self.op("Reshape", [y, self.const(f"{p}.{part}_flat_shape", np.array([0, 0, -1], np.int64))], f"{p}.{part}_flat")


def same_layout(ws: list[BlockQuantized]) -> bool:
    """Whether the matrices can be one ``MatMulNBits``: same input width, bits, block and zero points."""
    return len({(w.shape[1], w.bits, w.block_size, w.zero_points is not None) for w in ws}) == 1


def stacked(ws: list[BlockQuantized]) -> BlockQuantized:
    """One matrix of ``ws``'s rows, in order."""
    def rows(arrays):
        return None if arrays[0] is None else np.concatenate(arrays)

    return BlockQuantized("+".join(w.ggml_type for w in ws), ws[0].bits, ws[0].block_size, rows([w.packed for w in ws]),
                          rows([w.scales for w in ws]), rows([w.zero_points for w in ws]), max(w.max_abs_error for w in ws))


def decoder(config, weights: Mapping[str, BlockQuantized], out_features: Mapping[str, int], floats: dict[str, np.ndarray],
            rope_cos_sin: tuple[np.ndarray, np.ndarray], accuracy_level: int = 4,
            data: ExternalData | None = None) -> onnx.ModelProto:
    """The whole decoder. ``weights``/``floats`` are keyed by GGUF tensor names
    (``blk.0.attn_q.weight``, ``output_norm.weight`` ...), each matrix read once; ``out_features``
    gives the matrices' output widths; ``rope_cos_sin`` are (max_pos, head_dim/2). With ``data``, large
    initializers are written there as they are made."""
    c = config
    dim = head_dim(c)
    n_heads = [out_features[f"blk.{i}.attn_q.weight"] // dim for i in range(c.num_hidden_layers)]  # per block:
    n_kv_heads = [out_features[f"blk.{i}.attn_k.weight"] // dim for i in range(c.num_hidden_layers)]  # pruned ones differ
    eps = float(c.rms_norm_eps)
    g = _Graph(accuracy_level, data)
    cos = g.const("cos_cache", rope_cos_sin[0].astype(np.float32))
    sin = g.const("sin_cache", rope_cos_sin[1].astype(np.float32))

    # Attention bookkeeping from the mask, as GroupQueryAttention wants it.
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], np.int64))], "mask_sum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one", np.array(1, np.int64))], "seqlens_minus_1")],
                     "seqlens_k", to=TensorProto.INT32)
    total = g.op("Gather", [g.op("Shape", ["attention_mask"], "mask_shape"), g.const("index_1", np.array(1, np.int64))],
                 "total_len_i64", axis=0)
    total = g.op("Cast", [total], "total_sequence_length", to=TensorProto.INT32)

    tied = "output.weight" not in out_features
    x, embedding = _embedding(g, weights, tied)
    h = g.rms_norm(x, floats["blk.0.attn_norm.weight"], "blk.0.attn_norm", eps)
    for i in range(c.num_hidden_layers):
        p = f"blk.{i}"
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*g.attention_inputs(h, p, weights, floats, dim, eps), f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             seqlens_k, total, cos, sin],
            f"{p}.attention", MS, outputs=[f"{p}.attention", f"present.{i}.key", f"present.{i}.value"],
            num_heads=n_heads[i], kv_num_heads=n_kv_heads[i], scale=dim**-0.5,
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        )
        o = g.matmul(attn, f"{p}.attn_output", weights[f"{p}.attn_output.weight"])
        h, x = _skip_norm(g, x, o, floats[f"{p}.ffn_norm.weight"], f"{p}.ffn_norm", eps, f"{p}.attn_residual")
        gate, up = g.gate_and_up(h, p, weights)
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.ffn_sigmoid")], f"{p}.ffn_silu")
        y = g.matmul(g.op("Mul", [act, up], f"{p}.ffn_gated"), f"{p}.ffn_down", weights[f"{p}.ffn_down.weight"])
        if i + 1 < c.num_hidden_layers:
            nxt = f"blk.{i + 1}.attn_norm"
            h, x = _skip_norm(g, x, y, floats[f"{nxt}.weight"], nxt, eps, f"{p}.ffn_residual")
        else:
            h = g.skip_rms_norm(x, y, floats["output_norm.weight"], "output_norm", eps)
    if tied:
        g.matmul_of(h, "logits", embedding.inputs, embedding.shape, embedding.bits, embedding.block_size)
    else:
        g.matmul(h, "logits", weights["output.weight"])

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", c.vocab_size])]
    for i in range(c.num_hidden_layers):
        kv_shape = ["batch_size", n_kv_heads[i], "{}", dim]
        for kind in ("key", "value"):
            past = [d.format("past_sequence_length") if isinstance(d, str) else d for d in kv_shape]
            present = [d.format("total_sequence_length") if isinstance(d, str) else d for d in kv_shape]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, past))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
    graph = helper.make_graph(g.nodes, "edgequant_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=OPSETS, producer_name="edgequant", ir_version=10)


def _skip_norm(g: _Graph, x: str, skip: str, weight: np.ndarray, name: str, eps: float, residual: str) -> tuple[str, str]:
    """(the normed sum, the sum): the residual stream's next value and its normed view."""
    normed, _, _, summed = g.skip_rms_norm(x, skip, weight, name, eps, residual)
    return normed, summed


class _Initialized(NamedTuple):
    """A blockwise matrix already in the graph: its initializers' names and its layout."""

    inputs: list[str]
    shape: tuple[int, int]
    bits: int
    block_size: int


def _embedding(g: _Graph, weights: Mapping[str, BlockQuantized], tied: bool) -> tuple[str, _Initialized]:
    """The token embedding lookup, and the embedding's initializers (a tied output head reads them)."""
    w = weights["token_embd.weight"]
    rows, cols = w.shape
    shared = g.nbits_weight("logits" if tied else "token_embd", w)
    table = g.op("Reshape", [shared[0], g.const("token_embd.table_shape", np.array([rows, cols * w.bits // 8], np.int64))],
                 "token_embd.table")
    x = g.op("GatherBlockQuantized", [table, "input_ids", *shared[1:]], "token_embd", MS,
             bits=w.bits, block_size=w.block_size, gather_axis=0, quantize_axis=1)
    return x, _Initialized(shared, w.shape, w.bits, w.block_size)

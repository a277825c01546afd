"""Write a quantized model as a GGUF file that stock llama.cpp loads and chats with.

Every 2-D weight is stored in the ggml type the plan gave it (one type per tensor, so a
file can mix types); norms stay float32. Architecture metadata comes from the Hugging Face
config, the tokenizer (vocab, merges, special tokens, chat template) from the model's own
tokenizer files, and ``general.*`` says the file was made by edgequant and how.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np

from edgequant import __version__
from edgequant.atomic import atomic_path
from edgequant.errors import EdgequantError
from edgequant.ggml_quants import EncodedTensor
from edgequant.adapters import head_dim
from edgequant.models import LoadedModel, block_shapes, sizes_differ



def write_gguf(path: Path, loaded: LoadedModel, encoded: dict[str, EncodedTensor] | None, method: str,
               float_type: type = np.float32) -> None:
    """Write ``path`` atomically. ``encoded`` maps GGUF names of 2-D weights to their bytes; None
    stores every weight unquantized, as ``float_type`` (the full-precision file llama.cpp's own
    quantizer starts from). The header lists every tensor first; their data follows one tensor at
    a time, read from the model as they are written (a streamed block is mapped only then)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf_arch(loaded))
        _add_metadata(writer, loaded, method)
        _add_tokenizer(writer, loaded)
        extra = [*(("rope_freqs.weight", f) for f in [llama3_rope_factors(loaded)] if f is not None),
                 *loaded.adapter.gguf_tensors(loaded.config)]
        for name, data in extra:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
        shapes = {hf_name: tuple(t.shape) for hf_name, t in loaded.model.state_dict(keep_vars=True).items()
                  if _is_stored(loaded, hf_name)}  # shapes only: a streamed block's tensors are on the meta device here
        tensors = file_tensors(loaded, list(shapes))
        for name, parts in tensors:
            writer.add_tensor_info(*_info(loaded, name, parts, shapes, encoded, float_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in extra:
            writer.write_tensor_data(data)
        whole_of = {part: (name, parts) for name, parts in tensors for part in parts}
        pending: dict[str, dict[str, np.ndarray]] = {}
        for hf_name, t in loaded.state():
            if hf_name not in whole_of:
                continue
            name, parts = whole_of[hf_name]
            pending.setdefault(name, {})[hf_name] = _data(loaded, hf_name, t, encoded, float_type)
            if len(pending[name]) == len(parts):  # a fused matrix is written when its last part is read
                done = pending.pop(name)
                writer.write_tensor_data(np.concatenate([done[p] for p in parts]) if len(parts) > 1 else done[hf_name])
        writer.close()


def file_tensors(loaded: LoadedModel, hf_names: list[str]) -> list[tuple[str, list[str]]]:
    """The file's tensors in the order they are written, each with the state-dict entries it
    holds: one, or the parts of a matrix the family stores fused (in row order), written where
    the last of them comes."""
    family, whole_of = loaded.adapter, {}
    for block in range(len(family.layers(loaded.model))):
        for whole, parts in family.fused.items():
            names = [family.in_block(block, f"{p}.weight") for p in parts]
            for name in names:
                whole_of[name] = (loaded.gguf_name(family.in_block(block, f"{whole}.weight")), names)
    position = {hf_name: i for i, hf_name in enumerate(hf_names)}
    out = []
    for i, hf_name in enumerate(hf_names):
        name, parts = whole_of.get(hf_name, (loaded.gguf_name(hf_name), [hf_name]))
        if max(position[p] for p in parts) == i:
            out.append((name, parts))
    return out


def _is_stored(loaded: LoadedModel, hf_name: str) -> bool:
    return not (hf_name == "lm_head.weight" and loaded.config.tie_word_embeddings)


def _info(loaded: LoadedModel, name: str, parts: list[str], shapes: dict, encoded, float_type):
    """(name, shape, dtype, bytes, ggml type) of a tensor's entry in the file, from the shapes of
    the state-dict entries it holds alone (their rows one after another)."""
    shape = (sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:])
    if len(shape) != 2:  # norms, biases, a convolution: float32, in the layout the family's file has
        shape = loaded.adapter.to_gguf(name, np.zeros(shape, np.float32), loaded.config).shape
        return name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)), None
    if encoded is None:
        dtype = np.dtype(float_type)
        return name, shape, dtype, dtype.itemsize * int(np.prod(shape)), None
    codes = [encoded[loaded.gguf_name(p)] for p in parts]
    if len({c.ggml_type for c in codes}) > 1:
        raise EdgequantError(f"{name} is one tensor in the file, but its parts were given the types "
                             f"{', '.join(c.ggml_type for c in codes)}")
    data = codes[0].data
    rows = sum(c.data.shape[0] for c in codes)
    return name, (rows, *data.shape[1:]), data.dtype, data.nbytes // data.shape[0] * rows, gguf.GGMLQuantizationType[codes[0].ggml_type]


def _data(loaded: LoadedModel, hf_name: str, t, encoded, float_type) -> np.ndarray:
    """The bytes of one tensor as the file stores them (q/k rows in llama.cpp's rotary order)."""
    name = loaded.gguf_name(hf_name)
    if t.ndim != 2:
        data = t.float().numpy()
    else:
        data = t.float().numpy().astype(float_type, copy=False) if encoded is None else encoded[name].data
    return np.ascontiguousarray(loaded.adapter.to_gguf(name, data, loaded.config))


def overhead_bytes(loaded: LoadedModel) -> int:
    """Bytes of a GGUF file besides tensor data: metadata, tokenizer, tensor infos, alignment.

    Measured by writing the metadata alone; each tensor adds its info record and, at worst,
    alignment padding (estimated as half the alignment)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "header.gguf"
        writer = gguf.GGUFWriter(path, gguf_arch(loaded))
        _add_metadata(writer, loaded, "edgequant")
        _add_tokenizer(writer, loaded)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        size = path.stat().st_size
    for hf_name, t in loaded.model.state_dict().items():
        if not (hf_name == "lm_head.weight" and loaded.config.tie_word_embeddings):
            size += 8 + len(loaded.gguf_name(hf_name)) + 4 + 8 * t.ndim + 4 + 8 + gguf.GGUF_DEFAULT_ALIGNMENT // 2
    return size


def gguf_arch(loaded: LoadedModel) -> str:
    """The file's architecture: the model's own, or the one that sizes every block on its own
    when its blocks differ in size (``deci`` for Llama: its ``llama`` loader sizes every block
    like the first)."""
    if not sizes_differ(loaded.model):
        return loaded.adapter.gguf_name
    if not loaded.adapter.per_block_sizes_arch:
        raise EdgequantError(f"blocks of different sizes export to GGUF for llama-family models only, "
                             f"not {loaded.adapter.model_type}")
    return loaded.adapter.per_block_sizes_arch


def _add_metadata(w: gguf.GGUFWriter, loaded: LoadedModel, method: str) -> None:
    c = loaded.config
    w.add_name(loaded.name)
    w.add_string("general.quantized_by", f"edgequant {__version__}")
    w.add_string("edgequant.method", method)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    if not loaded.adapter.recurrent:
        _add_attention_metadata(w, loaded)
    loaded.adapter.gguf_metadata(w, c)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_attention_metadata(w: gguf.GGUFWriter, loaded: LoadedModel) -> None:
    """What llama.cpp reads of a transformer's blocks: context, FFN width, heads (per block when
    they differ), head and rotary dimensions, rope base and scaling, norm epsilon, vocabulary."""
    c = loaded.config
    dim = head_dim(c)
    w.add_context_length(c.max_position_embeddings)
    per_block = sizes_differ(loaded.model)
    if per_block:  # one entry per block
        sizes = block_shapes(loaded.model)
        w.add_feed_forward_length([s.ffn for s in sizes])
        w.add_head_count([s.heads for s in sizes])
        w.add_head_count_kv([s.kv_heads for s in sizes])
    else:
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(loaded.adapter.rope_dimensions(c))
    if dim * c.num_attention_heads != c.hidden_size or per_block:
        w.add_key_length(dim)
        w.add_value_length(dim)
    rope = loaded.adapter.rope_parameters(c)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    w.add_vocab_size(c.vocab_size)


def llama3_rope_factors(loaded: LoadedModel) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.x rope scaling (llama.cpp reads them as rope_freqs)."""
    config = loaded.config
    rope = loaded.adapter.rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    old_ctx = rope["original_max_position_embeddings"]
    low_wl, high_wl = old_ctx / rope["low_freq_factor"], old_ctx / rope["high_freq_factor"]
    smooth = (old_ctx / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
    factors = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, rope["factor"], 0.0))
    mid = (wavelen >= high_wl) & (wavelen <= low_wl)
    factors[mid] = 1.0 / ((1 - smooth[mid]) / rope["factor"] + smooth[mid])
    return factors.astype(np.float32)


# ------------------------------------------------------------------------------- tokenizer

def _add_tokenizer(w: gguf.GGUFWriter, loaded: LoadedModel) -> None:
    """The model's tokenizer as llama.cpp reads it: a byte-level BPE vocabulary ("gpt2", with its
    merges) or a SentencePiece one ("llama", with scores)."""
    with tempfile.TemporaryDirectory() as tmp:
        loaded.tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text())
        n_vocab = loaded.config.vocab_size
        sentencepiece = tokenizer_kind(spec) == "llama"
        if sentencepiece:
            tokens, scores, types = sentencepiece_vocab(spec, n_vocab, loaded.tokenizer.unk_token_id)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(tokens)
            w.add_token_scores(scores)
            w.add_token_types(types)
            w.add_add_space_prefix(_adds_space_prefix(spec))
        else:
            tokens, types = _vocab(spec, n_vocab)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(bpe_pre_tokenizer(spec))
            w.add_token_list(tokens)
            w.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=not sentencepiece, n_vocab=len(tokens))
        if sentencepiece:  # transformers 5 keeps add_bos in the post-processor, where gguf-py does not look
            first = loaded.tokenizer("a").input_ids
            special.add_special_token["bos"] = bool(first) and first[0] == loaded.tokenizer.bos_token_id
        special.add_to_gguf(w, quiet=True)
        template = Path(tmp) / "chat_template.jinja"
        if special.chat_template is None and template.is_file():
            w.add_chat_template(template.read_text())


def _vocab(spec: dict, n_vocab: int) -> tuple[list[str], list[gguf.TokenType]]:
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in spec["model"]["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, types


def tokenizer_kind(spec: dict) -> str:
    """llama.cpp's name for the kind of a tokenizer.json: "gpt2" (byte-level BPE: SmolLM, Llama 3,
    Qwen) or "llama" (SentencePiece BPE, which spells spaces "▁" and falls back to byte tokens:
    Llama 2, Mistral v0.1, Gemma); anything else is refused."""
    model = spec["model"]
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")], ensure_ascii=False)
    if model["type"] == "BPE" and "ByteLevel" in text:
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback") and ("Metaspace" in text or "\u2581" in text):
        return "llama"
    raise EdgequantError(f"a {model['type']} tokenizer cannot be written to GGUF; byte-level BPE and SentencePiece BPE can")


def sentencepiece_vocab(spec: dict, n_vocab: int, unknown: int | None) -> tuple[list[str], list[float], list[gguf.TokenType]]:
    """(tokens, scores, types) of a SentencePiece BPE tokenizer.json (``unknown``: the id of its
    unknown token). llama.cpp merges the pair
    whose joined piece scores highest; a piece scores minus the rank of the first merge that makes
    it, which is the order the Hugging Face tokenizer merges in. Added tokens are cut out of the
    text first: special ones as control tokens, the others as user-defined text (spaces as spaces)."""
    tokens, types = _vocab(spec, n_vocab)
    merges = spec["model"].get("merges", [])
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(a + b, r)
    scores = [-1000.0] * n_vocab
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == gguf.TokenType.NORMAL:
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                scores[i], types[i] = 0.0, gguf.TokenType.BYTE
            else:
                scores[i] = -float(rank.get(token, len(merges) + i))
        elif kind == gguf.TokenType.USER_DEFINED:
            tokens[i] = token.replace("\u2581", " ")
    if unknown is not None and unknown < n_vocab:
        types[unknown] = gguf.TokenType.UNKNOWN
    return tokens, scores, types


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Metaspace that prepends, or a Prepend normalizer)."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, json.dumps(spec.get("normalizer"))
    parts = pre.get("pretokenizers", [pre]) if pre else []
    metaspace = [p for p in parts if p.get("type") == "Metaspace"]
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always") in ("first", "always")
    return '"Prepend"' in normalizer


def bpe_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (the regex that splits text before BPE)."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in text:
        return "qwen2"
    if '"Digits"' in text:
        return "smollm"
    return "gpt-2"

"""Load a causal LM, from a Hugging Face folder or a GGUF file, as a float32 transformers model.

The registry below is the list of supported architectures: the Hugging Face ``model_type``,
the llama.cpp architecture it exports to, and whether llama.cpp wants the q/k rows reordered
for its rotary kernel (the ``llama`` architecture does, qwen2/qwen3 do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from .errors import EdgequantError


@dataclass(frozen=True)
class Architecture:
    model_type: str  # Hugging Face config.model_type
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's "llama" arch stores q/k with interleaved rotary halves

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES = {
    a.model_type: a
    for a in (
        Architecture("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Architecture("mistral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
        Architecture("qwen3", gguf.MODEL_ARCH.QWEN3, permute_qk=False),
    )
}
_FROM_GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise EdgequantError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        ) from None


@dataclass
class LoadedModel:
    """A float32 model in eval mode, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    path: Path

    @property
    def config(self):
        return self.model.config

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def gguf_name(self, hf_name: str) -> str:
        """GGUF tensor name of a state-dict entry, e.g. model.layers.0.mlp.down_proj.weight -> blk.0.ffn_down.weight."""
        return gguf_name(self.arch, self.config.num_hidden_layers, hf_name)

    def matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(GGUF name, weight) of every 2-D weight that gets quantized, in state-dict order."""
        for hf_name, t in self.model.state_dict().items():
            if t.ndim == 2 and not (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
                yield self.gguf_name(hf_name), t


def gguf_name(arch: Architecture, n_layers: int, hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    name = gguf.get_tensor_name_map(arch.gguf_arch, n_layers).get_name(base)
    if name is None:
        raise EdgequantError(f"no GGUF name for tensor {hf_name!r} of a {arch.model_type} model")
    return f"{name}.{suffix}"


def permute_qk(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """Reorder q/k rows between Hugging Face's half-split rotary layout and llama.cpp's interleaved one."""
    half = w.shape[0] // n_heads // 2
    if to_gguf:
        return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(config, gguf_tensor_name: str) -> int | None:
    """Number of heads to permute by, for q/k projection weights, else None."""
    if gguf_tensor_name.endswith("attn_q.weight"):
        return config.num_attention_heads
    if gguf_tensor_name.endswith("attn_k.weight"):
        return config.num_key_value_heads
    return None


# ------------------------------------------------------------------------------ loading


def load_model(spec: str | Path | None = None) -> LoadedModel:
    """``None``/"default" -> the built-in model; a folder -> Hugging Face; a ``.gguf`` file -> GGUF."""
    if spec is None or str(spec) == "default":
        from .assets import default_model_dir

        spec = default_model_dir()
    path = Path(spec)
    if not path.exists():
        raise EdgequantError(f"model not found: {path}")
    if path.is_file():
        return load_gguf(path)
    return load_hf_folder(path)


def load_hf_folder(path: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise EdgequantError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "?")
    except json.JSONDecodeError as e:
        raise EdgequantError(f"{config_file} is not valid JSON: {e}") from None
    arch = architecture(model_type)
    if not any(path.glob("*.safetensors")):
        raise EdgequantError(f"{path} has no .safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EdgequantError(f"cannot load {path}: {_first_line(e)}") from None
    return LoadedModel(model.eval(), tokenizer, arch, path)


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning any parse failure into a one-line error."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors... on bad files
        raise EdgequantError(f"{path} is not a readable GGUF file ({_first_line(e)})") from None


def load_gguf(path: Path) -> LoadedModel:
    """Dequantize every tensor of a GGUF file into a float32 transformers model."""
    from transformers import AutoModelForCausalLM

    reader = read_gguf(path)
    arch, config = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = gguf_name(arch, config.num_hidden_layers, hf_name)
        if name not in tensors:
            raise EdgequantError(f"{path} lacks tensor {name}")
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        heads = qk_heads(config, name)
        if arch.permute_qk and heads:
            w = permute_qk(w, heads, to_gguf=False)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return LoadedModel(model.eval(), gguf_tokenizer(path), arch, path)


def gguf_config(reader: gguf.GGUFReader):
    """(Architecture, transformers config) described by a GGUF file's metadata."""
    from transformers import AutoConfig

    meta = _gguf_metadata(reader)
    gguf_arch = meta.get("general.architecture", "?")
    if gguf_arch not in _FROM_GGUF_ARCH:
        raise EdgequantError(
            f"unsupported GGUF architecture {gguf_arch!r}; supported: {', '.join(_FROM_GGUF_ARCH)}"
        )
    arch = architecture(_FROM_GGUF_ARCH[gguf_arch])
    tensors = {t.name: t for t in reader.tensors}
    return arch, AutoConfig.for_model(arch.model_type, **_config_from_gguf(meta, tensors))


def gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF file, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise EdgequantError(f"cannot read the tokenizer of {path}: {_first_line(e)}") from None


def _gguf_metadata(reader: gguf.GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue  # large arrays; the tokenizer is read by transformers
        try:
            out[key] = field.contents()
        except Exception:
            continue
    return out


def _config_from_gguf(meta: dict, tensors: dict) -> dict:
    a = meta["general.architecture"]

    def get(key, default=None):
        return meta.get(f"{a}.{key}", default)

    n_head = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size") or tensors["token_embd.weight"].data.shape[0]
    cfg = dict(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=int(n_head),
        num_key_value_heads=int(get("attention.head_count_kv", n_head)),
        head_dim=int(get("attention.key_length", hidden // n_head)),
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    if a == "qwen2":
        cfg.pop("head_dim")
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

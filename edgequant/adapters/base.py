"""What edgequant knows of one architecture family, in one place: the adapter.

Every module that walks a model's blocks asks its adapter for them (:meth:`Adapter.layers`), names
a matrix by its *role* (``"q"``, ``"down"``...) rather than by the family's module path, and takes
the groups of matrices that share an input (for scaling maps, rotations and GPTQ's shared
Hessians) from :attr:`Adapter.groups`. The GGUF side is the adapter's too: the llama.cpp
architecture it writes, the ones it reads, and the tensor fix-ups between the two layouts.

An adapter registers itself by subclassing: its ``model_types`` (Hugging Face ``config.model_type``)
and its GGUF architectures become names :func:`adapter` and :func:`adapter_for_gguf` know. Adding
a llama-like family is a subclass of a few lines (see :mod:`.qwen`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np
import torch

from ..errors import EdgequantError


@dataclass(frozen=True)
class Group:
    """Matrices of a block that read one input. ``into`` is the role of what produces that input,
    where a per-channel scale of the input can be folded: a norm (its weight is divided) or a
    linear layer (its output rows are divided)."""

    key: str
    consumers: tuple[str, ...]  # roles
    into: str


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one transformer block: FFN width, query heads, KV heads."""

    ffn: int
    heads: int
    kv_heads: int

    @classmethod
    def of_config(cls, config) -> "BlockShape":
        return cls(config.intermediate_size, config.num_attention_heads, config.num_key_value_heads)


_BY_MODEL_TYPE: dict[str, "Adapter"] = {}
_BY_GGUF_ARCH: dict[str, "Adapter"] = {}


class Adapter:
    """A decoder-only transformer whose blocks are attention (q/k/v/o) then a gated MLP
    (gate/up/down), each after an RMSNorm: the layout of Llama and the families derived from it.
    A family with another layout overrides what differs."""

    model_types: ClassVar[tuple[str, ...]] = ()  # Hugging Face config.model_type values
    gguf_arch: ClassVar[gguf.MODEL_ARCH]  # the llama.cpp architecture it exports to
    reads_gguf: ClassVar[tuple[str, ...]] = ()  # further GGUF architectures it loads
    permute_qk: ClassVar[bool] = False  # llama.cpp wants q/k rows in its interleaved rotary order
    per_block_sizes_arch: ClassVar[str | None] = None  # the GGUF architecture that holds pruned blocks
    rotations: ClassVar[bool] = True  # a rotation of the residual stream passes through its blocks
    onnx_refusal: ClassVar[str | None] = None  # why the family has no ONNX export, if it has none
    # llama.cpp's 8-bit activation blocks move the family's outputs by more than parity allows:
    # --parity also runs the simulation with them (gguf_sim_a8)
    activation_sensitive: ClassVar[bool] = False
    # matrices the checkpoint and the GGUF file hold as one (path in a block -> the parts' paths, in
    # row order); inside edgequant they are split into the parts (:meth:`split_fused`)
    fused: ClassVar[dict[str, tuple[str, ...]]] = {}
    names_arch: ClassVar[gguf.MODEL_ARCH | None] = None  # GGUF names of what ``gguf_arch``'s map lacks (the parts)
    renames: ClassVar[dict[str, str]] = {}  # state-dict name endings -> the names gguf-py's map knows them by
    recurrent: ClassVar[bool] = False  # no attention: a fixed recurrent state instead of a KV cache (Mamba-2)

    layers_path: ClassVar[str] = "model.layers"
    roles: ClassVar[dict[str, str]] = {  # role -> module path inside a block
        "attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.o_proj", "attn": "self_attn",
        "ffn_norm": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    groups: ClassVar[tuple[Group, ...]] = (
        Group("attn_in", ("q", "k", "v"), into="attn_norm"),
        Group("attn_out", ("o",), into="v"),  # a value channel feeds one o column per query head
        Group("ffn_in", ("gate", "up"), into="ffn_norm"),
        Group("ffn_out", ("down",), into="up"),  # SiLU(gate) * up is linear in up
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.model_types:
            instance = cls()
            for t in cls.model_types:
                _BY_MODEL_TYPE[t] = instance
            for a in (gguf.MODEL_ARCH_NAMES[cls.gguf_arch], *cls.reads_gguf):
                _BY_GGUF_ARCH.setdefault(a, instance)

    def __repr__(self) -> str:
        return f"<adapter {self.model_type}>"

    @property
    def model_type(self) -> str:
        return self.model_types[0]

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # --- the model's parts ------------------------------------------------------------------------

    def layers(self, model) -> torch.nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def embedding(self, model) -> torch.nn.Embedding:
        return model.get_input_embeddings()

    def final_norm(self, model) -> torch.nn.Module:
        return model.model.norm

    def head(self, model) -> torch.nn.Linear:
        return model.get_output_embeddings()

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The head's output for the last block's output ``hidden``."""
        return self.head(model)(self.final_norm(model)(hidden))

    def computed_buffers(self, model) -> None:
        """Make the buffers a model computes rather than stores (the rotary tables) on a model
        built on the meta device."""
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=model.config)

    def split_fused(self, model) -> None:
        """On a model built on the meta device: each matrix in :attr:`fused` replaced by its parts,
        new linear layers beside it in the same module, and by a :class:`Concat` of them where the
        family's forward pass calls it. Every other module then sees the roles it knows."""
        for layer in self.layers(model):
            for whole, parts in self.fused.items():
                parent_path, _, name = whole.rpartition(".")
                parent = layer.get_submodule(parent_path)
                fused = getattr(parent, name)
                if fused.bias is not None:
                    raise EdgequantError(f"{self.model_type}: a fused {name} with a bias is not supported")
                delattr(parent, name)
                names = [part.rpartition(".")[2] for part in parts]
                for part, rows in zip(names, self.part_rows(model.config, whole)):
                    setattr(parent, part, torch.nn.Linear(fused.in_features, rows, bias=False,
                                                          device=fused.weight.device, dtype=fused.weight.dtype))
                object.__setattr__(parent, name, Concat(parent, names))  # not a submodule: no weights of its own

    def part_rows(self, config, whole: str) -> tuple[int, ...]:
        """Rows of each part of the fused matrix ``whole`` (a key of :attr:`fused`)."""
        raise NotImplementedError

    def scale_norm(self, norm, s: torch.Tensor) -> None:
        """Divide the channels a norm puts out by ``s`` (through its weight)."""
        norm.weight.div_(s)

    def module(self, layer, role: str) -> torch.nn.Module:
        return layer.get_submodule(self.roles[role])

    def set_module(self, layer, role: str, module: torch.nn.Module) -> None:
        parent, _, name = self.roles[role].rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, module)

    def path(self, block: int, role: str) -> str:
        """Module path in the model, e.g. (3, "down") -> ``model.layers.3.mlp.down_proj``."""
        return self.in_block(block, self.roles[role])

    def in_block(self, block: int, sub: str) -> str:
        """The model's path of ``sub``, a path inside block ``block``."""
        return f"{self.layers_path}.{block}.{sub}"

    def weight_name(self, block: int, role: str) -> str:
        return f"{self.path(block, role)}.weight"

    def block_index(self, hf_name: str) -> int:
        """The block a state-dict entry belongs to (``model.layers.3.…`` -> 3), else -1."""
        prefix = self.layers_path + "."
        return int(hf_name[len(prefix):].split(".", 1)[0]) if hf_name.startswith(prefix) else -1

    @property
    def residual_groups(self) -> list[Group]:
        """The groups that read the residual stream, through a norm (q/k/v, gate/up)."""
        return [g for g in self.groups if g.into.endswith("norm")]

    def readers(self, layer) -> list[torch.nn.Linear]:
        """The matrices of a block that read the residual stream (through a norm)."""
        return [self.module(layer, r) for g in self.residual_groups for r in g.consumers]

    def writers(self, layer) -> list[torch.nn.Linear]:
        """The matrices of a block that write to the residual stream."""
        return [self.module(layer, "o"), self.module(layer, "down")]

    # --- block sizes (pruned models) ----------------------------------------------------------------

    def block_shape(self, layer, config) -> BlockShape:
        """The sizes of one block as its matrices have them."""
        dim = head_dim(config)
        return BlockShape(self.module(layer, "gate").out_features, self.module(layer, "q").out_features // dim,
                          self.module(layer, "k").out_features // dim)

    def resize_block(self, layer, config, size: BlockShape) -> None:
        """New matrices of the sizes ``size`` (created where the old ones are, ``meta`` included)."""
        dim, hidden = head_dim(config), config.hidden_size
        like = self.module(layer, "q").weight
        outputs = {"q": size.heads * dim, "k": size.kv_heads * dim, "v": size.kv_heads * dim, "o": hidden,
                   "gate": size.ffn, "up": size.ffn, "down": hidden}
        inputs = {"o": size.heads * dim, "down": size.ffn}
        for role, n_out in outputs.items():
            bias = self.module(layer, role).bias is not None
            self.set_module(layer, role, torch.nn.Linear(inputs.get(role, hidden), n_out, bias=bias,
                                                         device=like.device, dtype=like.dtype))

    # --- GGUF ---------------------------------------------------------------------------------------

    def to_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        """A tensor (a weight, a norm, a bias) in the layout llama.cpp wants for this architecture."""
        return self._qk(gguf_tensor_name, w, config, to_gguf=True)

    def from_gguf(self, gguf_tensor_name: str, w: np.ndarray, config) -> np.ndarray:
        return self._qk(gguf_tensor_name, w, config, to_gguf=False)

    def _qk(self, name: str, w: np.ndarray, config, to_gguf: bool) -> np.ndarray:
        heads = qk_heads(config, name, w.shape[0])
        return permute_qk(w, heads, to_gguf=to_gguf) if self.permute_qk and heads else w

    def rope_parameters(self, config) -> dict:
        """The rotary settings of the model's (global) attention layers: ``rope_theta``, ``rope_type`` and scaling."""
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        return params

    def gguf_metadata(self, w: gguf.GGUFWriter, config) -> None:
        """Hook: the architecture's own GGUF keys, beyond the ones every family writes."""

    def config_from_gguf(self, settings: dict, meta: dict, tensors: dict) -> dict:
        """Hook: the transformers config settings read from a GGUF (``meta``: its metadata,
        ``tensors``: gguf-py's tensors by name), adjusted for this family."""
        return settings

    def gguf_tensors(self, config) -> list[tuple[str, np.ndarray]]:
        """Hook: float32 tensors the family's GGUF holds besides the model's own (rope factors)."""
        return []

    def state_bytes(self, config) -> int:
        """Bytes of a recurrent state per sequence (0: the family has a KV cache instead)."""
        return 0

    def rope_dimensions(self, config) -> int:
        """How many of a head's dimensions the rotary embedding turns."""
        return head_dim(config)


class Concat:
    """Stands where a fused linear layer was: the outputs of its parts, called by name on their
    module at each call (so a part replaced later, by a wrapper or a smaller layer, is the one used)."""

    def __init__(self, parent: torch.nn.Module, names: list[str]):
        self.parent, self.names = parent, names

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.parent, n)(x) for n in self.names], dim=-1)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def qk_heads(config, gguf_tensor_name: str, rows: int) -> int | None:
    """Number of heads to permute by, for q/k projection weights of ``rows`` rows, else None
    (counted from the rows: a pruned block has fewer heads than the config says)."""
    if gguf_tensor_name.endswith(("attn_q.weight", "attn_k.weight")):
        return rows // head_dim(config)
    return None


def permute_qk(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """Reorder q/k rows between Hugging Face's half-split rotary layout and llama.cpp's interleaved one."""
    half = w.shape[0] // n_heads // 2
    if to_gguf:
        return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adapter(model_type: str) -> Adapter:
    """The adapter of a Hugging Face ``model_type``."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise EdgequantError(f"unsupported architecture {model_type!r}; supported: {', '.join(_BY_MODEL_TYPE)}") from None


def adapter_of(model) -> Adapter:
    """The adapter of a transformers model."""
    return adapter(model.config.model_type)


def adapter_for_gguf(gguf_arch) -> Adapter:
    """The adapter that loads a GGUF file of llama.cpp architecture ``gguf_arch``."""
    if not isinstance(gguf_arch, str) or gguf_arch not in _BY_GGUF_ARCH:
        raise EdgequantError(f"unsupported GGUF architecture {gguf_arch!r:.60}; supported: {', '.join(_BY_GGUF_ARCH)}")
    return _BY_GGUF_ARCH[gguf_arch]


def supported() -> list[str]:
    return list(_BY_MODEL_TYPE)

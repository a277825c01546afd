"""Load a causal LM, from a Hugging Face folder or a GGUF file, as a float32 transformers model.

What each architecture family needs is its adapter's (:mod:`edgequant.adapters`); this module
reads the files, one tensor at a time, and checks them before anything is allocated.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import mmap
import os
import struct
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from .adapters import Adapter, BlockShape, adapter, adapter_for_gguf, adapter_of
from .blocks import BlockStore
from .errors import EdgequantError


PER_BLOCK_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv")


@dataclass
class LoadedModel:
    """A float32 model in eval mode, its tokenizer, and where it came from. A *streamed* model
    keeps its decoder blocks on disk (``store``, :mod:`edgequant.blocks`): code that reads a
    block's weights does it inside ``with loaded.block(i)``, or through :meth:`state`."""

    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    path: Path
    store: BlockStore | None = None

    @property
    def config(self):
        return self.model.config

    def copy(self) -> "LoadedModel":
        """The same model with its own weights (transforms change the copy; the original stays the reference)."""
        if self.store is not None:
            raise EdgequantError("a streamed model is not copied; the methods that need a copy load it whole")
        return LoadedModel(copy.deepcopy(self.model), self.tokenizer, self.adapter, self.path)

    def block(self, i: int):
        """A context in which block ``i``'s weights are real tensors (always, unless streamed)."""
        return self.store.block(i) if self.store is not None and i >= 0 else nullcontext()

    def state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(state-dict name, tensor) of every parameter, in state-dict order; a streamed block is
        mapped while its tensors are handed out (use each before asking for the next block's)."""
        names = list(self.model.state_dict(keep_vars=True))
        for block, group in itertools.groupby(names, key=self.adapter.block_index):
            with self.block(block):
                live = self.model.state_dict(keep_vars=True)
                for name in group:
                    yield name, live[name].detach()

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    def gguf_name(self, hf_name: str) -> str:
        """GGUF tensor name of a state-dict entry, e.g. model.layers.0.mlp.down_proj.weight -> blk.0.ffn_down.weight."""
        return gguf_name(self.adapter, self.config.num_hidden_layers, hf_name)

    def linear_weight_name(self, module_path: str) -> str:
        """GGUF name of the weight a linear layer uses, e.g. ``lm_head`` -> ``output.weight``
        (``token_embd.weight`` when the head is tied to the embedding)."""
        hf_name = f"{module_path}.weight"
        if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
            hf_name = "model.embed_tokens.weight"
        return self.gguf_name(hf_name)

    def ties(self) -> list[tuple[str, ...]]:
        """GGUF names of the matrices the file holds as one (Phi-3's q/k/v, gate/up): they share a type."""
        return [tuple(self.gguf_name(self.adapter.in_block(b, f"{part}.weight")) for part in parts)
                for b in range(len(self.adapter.layers(self.model))) for parts in self.adapter.fused.values()]

    def matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(GGUF name, weight) of every 2-D weight that gets quantized, in state-dict order."""
        for hf_name, t in self.state():
            if t.ndim == 2 and not (hf_name == "lm_head.weight" and self.config.tie_word_embeddings):
                yield self.gguf_name(hf_name), t


@functools.lru_cache(maxsize=None)
def gguf_name(family: Adapter, n_layers: int, hf_name: str) -> str:
    key = functools.reduce(lambda k, ending: k.removesuffix(ending[0]) + ending[1] if k.endswith(ending[0]) else k,
                           family.renames.items(), hf_name)
    suffixes = (".weight", ".bias")  # a name without one is mapped whole (Mamba-2's A_log -> ssm_a)
    name = _name_map(family.gguf_arch, n_layers).get_name(key, try_suffixes=suffixes)
    if name is None and family.names_arch is not None:  # a part of a fused matrix (Phi-3's ffn_gate)
        name = _name_map(family.names_arch, n_layers).get_name(key, try_suffixes=suffixes)
    if name is None:
        raise EdgequantError(f"no GGUF name for tensor {hf_name!r} of a {family.model_type} model")
    return name


@functools.lru_cache(maxsize=None)
def _name_map(gguf_arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's name map (building one takes milliseconds, and names are asked for per tensor)."""
    return gguf.get_tensor_name_map(gguf_arch, n_layers)


def block_shapes(model) -> list[BlockShape]:
    """Each block's sizes, read from its matrices (a pruned model's blocks differ)."""
    family = adapter_of(model)
    return [family.block_shape(layer, model.config) for layer in family.layers(model)]


def sizes_differ(model) -> bool:
    """Whether any block's sizes differ from the config's (the file then needs per-block sizes)."""
    if adapter_of(model).recurrent:
        return False
    full = BlockShape.of_config(model.config)
    return any(s != full for s in block_shapes(model))


def resize_blocks(model, sizes: list[BlockShape]) -> None:
    """Give each block new matrices of the sizes ``sizes`` (a pruned model's skeleton, to load
    its weights into)."""
    family = adapter_of(model)
    for layer, size in zip(family.layers(model), sizes):
        family.resize_block(layer, model.config, size)


# ------------------------------------------------------------------------------ loading


def load_model(spec: str | Path | None = None, streamed: bool = False) -> LoadedModel:
    """``None``/"default" or another built-in name -> that model; a folder -> Hugging Face; a
    ``.gguf`` file -> GGUF. ``streamed``: the decoder blocks, the embedding and the head go to disk
    (:mod:`edgequant.blocks`) as they are read; only the norms stay in memory."""
    from .assets import model_location

    path = model_location(spec)
    if path.is_file():
        return load_gguf(path, streamed)
    return load_hf_folder(path, streamed)


def load_hf_folder(path: Path, streamed: bool = False) -> LoadedModel:
    """A Hugging Face folder, read one tensor at a time through safetensors' lazy access."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise EdgequantError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "?")
    except json.JSONDecodeError as e:
        raise EdgequantError(f"{config_file} is not valid JSON: {e}") from None
    family = adapter(model_type)
    if not any(path.glob("*.safetensors")):
        raise EdgequantError(f"{path} has no .safetensors weights")
    try:
        config = AutoConfig.from_pretrained(path)
        model = _skeleton(config)
        check_memory(model, streamed)
        shards = _Shards(path)
        stored, fetch = _parts_of_fused(model, shards.shape, shards.get)
        _check_shapes(path, model, stored)
        store = _fill(model, fetch, streamed)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, SafetensorError) as e:  # missing, truncated or corrupt files
        raise EdgequantError(f"cannot load {path}: {_first_line(e)}") from None
    check_tokenizer(path, len(tokenizer), model.config.vocab_size)
    return LoadedModel(model.eval(), tokenizer, family, path, store)


class _Shards:
    """The tensors of a folder's safetensors files (one file, or the shards its index lists)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise EdgequantError(f"{path} lacks the shard {shard} (listed in {index.name})")
            files = {name: path / shard for name, shard in weight_map.items()}
        else:
            files = {}
            for f in sorted(path.glob("*.safetensors")):
                with safe_open(f, "pt") as h:
                    files |= dict.fromkeys(h.keys(), f)
        self.files = files

    def shape(self, name: str) -> tuple[int, ...] | None:
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(self.files[name], "pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """One tensor in float32, the file opened for it alone (an open file's memory map keeps
        every page read through it in the process)."""
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as h:
            return h.get_tensor(name).to(torch.float32, copy=True).numpy()


def _fill(model, fetch, streamed: bool) -> BlockStore | None:
    """Give ``model`` (on the meta device) its float32 weights, each read with ``fetch(name)``,
    one tensor at a time: if ``streamed``, the blocks and the 2-D parts (embedding, head) to disk
    (:class:`BlockStore`), the norms into memory; else everything into memory."""
    config, family = model.config, adapter_of(model)
    store = BlockStore.create(model, fetch) if streamed else None
    for name in list(model.state_dict(keep_vars=True)):
        if streamed and family.block_index(name) >= 0 or name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module_path, _, pname = name.rpartition(".")
        array = np.asarray(fetch(name), dtype=np.float32)  # fetched into memory of its own
        data = store.keep(name, array) if store is not None and array.ndim == 2 else torch.from_numpy(array)
        model.get_submodule(module_path)._parameters[pname] = torch.nn.Parameter(data)
    family.computed_buffers(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return store


def check_tokenizer(path: Path, n_tokens: int, vocab_size: int) -> None:
    """A tokenizer that is not the model's own: more tokens than embedding rows, or far fewer (models
    pad their embedding by a few hundred rows at most, so a tenth fewer means another vocabulary)."""
    if n_tokens > vocab_size or n_tokens < 0.9 * vocab_size:
        raise EdgequantError(f"{path}: the tokenizer has {n_tokens} tokens but the model's embedding has "
                             f"{vocab_size} rows; is it this model's tokenizer?")


class _Reader(gguf.GGUFReader):
    """gguf-py's reader, reading through a plain array view of its memory map. Reading a tokenizer
    means hundreds of thousands of small slices, and each slice of numpy's ``memmap`` subclass
    costs several times a plain one: a GGUF with a 49152-token vocabulary opened in 2.4 s, now in
    0.6 s. What it reads is the same (``tests/test_gguf_fuzz.py`` compares it with gguf-py's)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file, turning any parse failure into a one-line error.

    gguf-py trusts the counts and lengths in the header: a corrupt array length can make it loop
    for ever. So the header is walked first (:func:`gguf_tensor_infos`): the magic is b"GGUF", the
    version 2 or 3, the key/value and tensor counts, every string and array fit in the file,
    value and tensor types are known, and every tensor's data ends inside the file.
    """
    gguf_tensor_infos(path)
    try:
        return _Reader(path)
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct errors... on bad files
        raise EdgequantError(f"{path} is not a readable GGUF file ({_first_line(e)})") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    n_elements: int
    n_bytes: int


def gguf_tensor_infos(path: Path) -> list[TensorInfo]:
    """The tensors of a GGUF file, from a checked walk of its header alone (fast: no metadata is
    decoded); a corrupt or truncated file is a one-line error."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:  # magic, version, tensor count, key/value count
                raise EdgequantError(f"{path} is truncated: {size} bytes is too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _check_gguf_header(_GGUFCursor(path, buf))
    except EdgequantError:
        raise
    except Exception as e:
        raise EdgequantError(f"{path} is not a readable GGUF file ({_first_line(e)})") from None


_GGUF_SCALARS = {  # GGUF value type -> struct format of one value
    gguf.GGUFValueType.UINT8: "B", gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H", gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I", gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.UINT64: "Q", gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT32: "f", gguf.GGUFValueType.FLOAT64: "d", gguf.GGUFValueType.BOOL: "?",
}
_GGML_MAX_DIMS = 4


class _GGUFCursor:
    """Reads a GGUF file's bytes in order, refusing to read past the end of the file."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos, self.order = path, buf, 0, "<"

    def error(self, what: str) -> EdgequantError:
        return EdgequantError(f"{self.path} is corrupt: {what}")

    def skip(self, n: int, what: str) -> int:
        """Move past ``n`` bytes of ``what``; returns where they start."""
        if n > len(self.buf) - self.pos:
            raise EdgequantError(f"{self.path} is truncated: {what} runs past the end of the file")
        self.pos += n
        return self.pos - n

    def read(self, fmt: str, what: str):
        fmt = self.order + fmt
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.read("Q", what)
        start = self.skip(n, what)
        return _printable(self.buf[start : start + n])


def _check_gguf_header(c: _GGUFCursor) -> list[TensorInfo]:
    """Walk the header (see ``read_gguf``), raising EdgequantError at the first problem."""
    magic = c.buf[:4]
    if magic != b"GGUF":
        raise EdgequantError(f"{c.path} is not a GGUF file (magic {magic!r})")
    if not int.from_bytes(c.buf[4:8], "little") & 0xFFFF:
        c.order = ">"  # a big-endian file, as gguf-py guesses it
    c.pos = 4
    version = c.read("I", "the version")
    if version not in (2, 3):
        raise EdgequantError(f"{c.path} has GGUF version {version}; only versions 2 and 3 are supported")
    n_tensors, n_kv = c.read("Q", "the tensor count"), c.read("Q", "the key/value count")
    if n_kv * 13 + n_tensors * 24 > len(c.buf) - c.pos:  # the smallest key/value and tensor info
        raise c.error(f"{n_kv} key/values and {n_tensors} tensors cannot fit in {len(c.buf)} bytes")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = c.string("a metadata key")
        value = _skip_gguf_value(c, c.read("I", f"the type of {key}"), key)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise c.error(f"general.alignment is {value!r}, not a power of two")
            alignment = value
    tensors = [_gguf_tensor_info(c) for _ in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    for info, offset in tensors:
        if data_start + offset + info.n_bytes > len(c.buf):
            raise EdgequantError(f"{c.path} is truncated: tensor {info.name} ends past the end of the file")
    return [info for info, _ in tensors]


def _skip_gguf_value(c: _GGUFCursor, vtype: int, key: str, in_array: bool = False):
    """Move past one metadata value; returns it if it is a number."""
    if vtype in _GGUF_SCALARS:
        return c.read(_GGUF_SCALARS[vtype], key)
    if vtype == gguf.GGUFValueType.STRING:
        c.skip(c.read("Q", key), key)
    elif vtype == gguf.GGUFValueType.ARRAY and not in_array:
        item_type, n = c.read("I", key), c.read("Q", key)
        if item_type in _GGUF_SCALARS:
            c.skip(n * struct.calcsize(_GGUF_SCALARS[item_type]), key)
        else:  # each string takes at least 8 bytes, so a corrupt n soon runs past the end
            for _ in range(n):
                _skip_gguf_value(c, item_type, key, in_array=True)
    else:
        raise c.error(f"metadata {key} has an unsupported value type {vtype}")


def _gguf_tensor_info(c: _GGUFCursor) -> tuple[TensorInfo, int]:
    """Move past one tensor info; returns it and the offset of its data."""
    name = c.string("a tensor name")
    n_dims = c.read("I", f"tensor {name}")
    if n_dims > _GGML_MAX_DIMS:
        raise c.error(f"tensor {name} has {n_dims} dimensions")
    dims = [c.read("Q", f"tensor {name}") for _ in range(n_dims)]
    ggml_type = c.read("I", f"tensor {name}")
    if ggml_type not in gguf.GGML_QUANT_SIZES:
        raise c.error(f"tensor {name} has an unknown type {ggml_type}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    n = math.prod(dims)
    return TensorInfo(name, n, n * block_bytes // block), c.read("Q", f"tensor {name}")


def _printable(raw: bytes, limit: int = 60) -> str:
    """A key or tensor name from a file, safe to put in a one-line message."""
    text = raw.decode("utf-8", "replace")
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


def load_gguf(path: Path, streamed: bool = False) -> LoadedModel:
    """A GGUF file, every tensor dequantized to float32 as it is read from the memory-mapped file."""
    reader = read_gguf(path)
    family, config = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    model = _skeleton(config)

    matrix = {name for name, p in model.state_dict().items() if p.ndim == 2}

    def stored(hf_name):
        name = gguf_name(family, config.num_hidden_layers, hf_name)
        if name not in tensors:
            return None
        shape = tuple(int(d) for d in reversed(tensors[name].shape))  # ggml lists the row length first
        if hf_name in matrix:
            return shape
        # norms, biases, a convolution: small, in the family's file layout (Mamba-2's A is a column)
        with np.errstate(all="ignore"):  # only the shape counts (Mamba-2's A is read through a log)
            return family.from_gguf(name, np.zeros(shape, np.float32), config).shape

    def fetch(hf_name):
        name = gguf_name(family, config.num_hidden_layers, hf_name)
        return family.from_gguf(name, _dequantized(read_tensor_data(path, tensors[name]), tensors[name].tensor_type), config)

    stored, fetch = _parts_of_fused(model, stored, fetch)
    _check_shapes(path, model, stored, lambda hf_name: gguf_name(family, config.num_hidden_layers, hf_name))
    check_memory(model, streamed)
    store = _fill(model, fetch, streamed)
    return LoadedModel(model.eval(), gguf_tokenizer(path, reader.fields["general.architecture"].contents()), family, path, store)


def _dequantized(raw: np.ndarray, qtype, chunk_bytes: int = 1 << 22) -> np.ndarray:
    """gguf-py's dequantization, a few rows at a time into the result (whole, its temporaries
    for a 151936 x 1536 embedding took several GB)."""
    if raw.ndim < 2:
        return gguf.quants.dequantize(raw, qtype)
    step = max(1, chunk_bytes // max(1, raw[0].nbytes))
    first = gguf.quants.dequantize(raw[:step], qtype)
    out = np.empty((len(raw), *first.shape[1:]), np.float32)
    out[:step] = first
    for r in range(step, len(raw), step):
        out[r : r + step] = gguf.quants.dequantize(raw[r : r + step], qtype)
    return out


def read_tensor_data(path: Path, t) -> np.ndarray:
    """A tensor's stored data, read from the file rather than through the reader's memory map
    (whose pages, once read, would stay in the process until the map is closed: the whole file)."""
    raw = np.fromfile(path, np.uint8, count=int(t.n_bytes), offset=int(t.data_offset))
    return raw.view(t.data.dtype).reshape(t.data.shape)


def check_memory(skeleton, streamed: bool) -> None:
    """Refuse, before reading any weight, a model this machine cannot hold: whole, its float32
    weights; streamed, the largest of the mapped parts (the head, read whole by every forward pass),
    the norms and two blocks (one worked on, one copy of it), against the memory the system says is
    available."""
    sizes = [(name, p.numel() * 4, p.ndim) for name, p in skeleton.named_parameters()]
    family = adapter_of(skeleton)
    if streamed:
        block = max(sum(p.numel() for p in layer.parameters()) for layer in family.layers(skeleton)) * 4
        outside = [(n, ndim) for name, n, ndim in sizes if family.block_index(name) < 0]
        needed = max(n for n, ndim in outside if ndim == 2) + sum(n for n, ndim in outside if ndim == 1) + 2 * block
    else:
        needed = sum(n for _, n, _ in sizes)
    available = available_memory()
    if available is not None and needed > available:
        how = "streamed (the head and two blocks in float32)" if streamed else "in float32"
        raise EdgequantError(f"the model needs {needed / 1e9:.1f} GB of memory {how}; this machine has "
                             f"{available / 1e9:.1f} GB available")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _skeleton(config):
    """The model of ``config`` on the meta device (fused matrices split, blocks resized as the config says)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        adapter_of(model).split_fused(model)
        _resize_blocks(model)
    return model


def _parts_of_fused(skeleton, stored, fetch):
    """``stored`` (name -> shape or None) and ``fetch`` (name -> array) for a file that may hold
    matrices fused (a Phi-3 checkpoint's qkv_proj and gate_up_proj, a phi3 GGUF's attn_qkv and
    ffn_up): a part the file lacks at its own shape is read as its rows of the whole, when the
    whole has the parts' rows."""
    family, shapes = adapter_of(skeleton), {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    rows_in: dict[str, tuple[str, slice]] = {}  # part -> (whole, its rows)
    for block in range(len(family.layers(skeleton))):
        for whole, parts in family.fused.items():
            names = [family.in_block(block, f"{part}.weight") for part in parts]
            whole_name, start = family.in_block(block, f"{whole}.weight"), 0
            for name in names:
                rows_in[name] = (whole_name, slice(start, start + shapes[name][0]))
                start += shapes[name][0]
    if not rows_in:
        return stored, fetch

    def from_whole(name: str) -> bool:
        whole, rows = rows_in.get(name, (None, None))
        if whole is None or stored(name) == shapes[name]:
            return False
        last = max(r.stop for w, r in rows_in.values() if w == whole)
        return stored(whole) == (last, *shapes[name][1:])

    @functools.lru_cache(maxsize=1)  # the parts of a whole are read one after another
    def whole_array(whole: str) -> np.ndarray:
        return fetch(whole)

    def part_stored(name):
        return shapes[name] if from_whole(name) else stored(name)

    def part_fetch(name):
        return whole_array(rows_in[name][0])[rows_in[name][1]].copy() if from_whole(name) else fetch(name)

    return part_stored, part_fetch


def _check_shapes(path: Path, skeleton, stored, file_name=lambda hf_name: hf_name) -> None:
    """Every weight the config implies is in the file (``stored(name)`` gives its shape, or None)
    with that shape, checked on the model still on the meta device, so metadata that lies about
    sizes fails before any allocation."""
    for hf_name, param in skeleton.state_dict().items():
        if hf_name == "lm_head.weight" and skeleton.config.tie_word_embeddings:
            continue
        shape = stored(hf_name)
        if shape is None:
            raise EdgequantError(f"{path} lacks tensor {file_name(hf_name)}")
        if shape != tuple(param.shape):
            raise EdgequantError(f"{path}: tensor {file_name(hf_name)} is {shape} but the metadata implies {tuple(param.shape)}")


def gguf_config(reader: gguf.GGUFReader):
    """(adapter, transformers config) described by a GGUF file's metadata; EdgequantError
    if the architecture is unsupported or a size the config needs is missing or not positive."""
    from transformers import AutoConfig

    meta = _gguf_metadata(reader)
    family = adapter_for_gguf(meta.get("general.architecture", "?"))
    tensors = {t.name: t for t in reader.tensors}
    where = getattr(reader.data, "filename", None) or "the GGUF file"
    settings = family.config_from_gguf({} if family.recurrent else _config_from_gguf(meta, tensors, where), meta, tensors)
    try:
        return family, AutoConfig.for_model(family.model_type, **settings)
    except Exception as e:  # transformers checks the sizes agree, e.g. heads divide the hidden size
        raise EdgequantError(f"{where} has inconsistent model metadata ({_first_line(e.__cause__ or e)})") from None


def gguf_tokenizer(path: Path, architecture: str | None = None):
    """The tokenizer stored in a GGUF file (of ``architecture``, read from it if not given), as a
    transformers tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        with _readable_by_transformers(path, architecture) as readable, _fast_gguf_reader():
            return AutoTokenizer.from_pretrained(readable.parent, gguf_file=readable.name)
    except Exception as e:
        raise EdgequantError(f"cannot read the tokenizer of {path}: {_first_line(e)}") from None


@contextmanager
def _fast_gguf_reader():
    """transformers reads a GGUF's tokenizer with ``gguf.GGUFReader``, imported when it is called:
    while inside, that name is :class:`_Reader` (12 s -> 3 s for a 49152-token vocabulary)."""
    stock = gguf.GGUFReader
    gguf.GGUFReader = _Reader
    try:
        yield
    finally:
        gguf.GGUFReader = stock


TOKENIZER_STAND_IN = ("deci", "mamba2")  # GGUF architectures whose tokenizer transformers will not read


@contextmanager
def _readable_by_transformers(path: Path, architecture: str | None):
    """``path``, or for an architecture transformers does not know (``deci``, ``mamba2``), a temporary GGUF
    holding only its tokenizer under the ``llama`` architecture. (A large vocabulary takes seconds
    to parse: the file is read here only when its architecture is not given or needs the stand-in.)"""
    reader = None
    if architecture is None:
        reader = read_gguf(path)
        architecture = reader.fields["general.architecture"].contents()
    if architecture not in TOKENIZER_STAND_IN:
        yield path
        return
    reader = reader or read_gguf(path)
    with tempfile.TemporaryDirectory() as tmp:
        header = Path(tmp) / "tokenizer.gguf"
        writer = gguf.GGUFWriter(header, "llama")
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        yield header


def _gguf_metadata(reader: gguf.GGUFReader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and not key.endswith(("model", "_token_id")):
            continue  # large arrays (the tokenizer is read by transformers); the special ids are kept
        try:
            out[key] = field.contents()
        except Exception:
            continue
    return out


def _resize_blocks(model) -> None:
    """Give each block the sizes the file's per-block metadata says (a pruned model). The list
    stays in the config, which the shape check's skeleton and the model share; everything after
    loading reads the sizes from the matrices (:func:`block_shapes`)."""
    sizes = getattr(model.config, "edgequant_block_shapes", None)
    if sizes:
        resize_blocks(model, [BlockShape(*s) for s in sizes])


def _config_from_gguf(meta: dict, tensors: dict, where: str = "the GGUF file") -> dict:
    a = meta["general.architecture"]
    per_block = {}
    for key in PER_BLOCK_KEYS:  # arrays (one entry per block): the config takes the largest
        value = meta.get(f"{a}.{key}")
        if isinstance(value, list):
            if not value or not all(isinstance(v, int) and v > 0 for v in value):
                raise EdgequantError(f"{where} has a bad {a}.{key} ({value!r:.40}; expected positive numbers)")
            per_block[key] = value

    def get(key, default=None, kind=int):
        value = max(per_block[key]) if key in per_block else meta.get(f"{a}.{key}", default)
        if value is None:
            raise EdgequantError(f"{where} lacks the metadata {a}.{key}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise EdgequantError(f"{where} has a bad {a}.{key} ({value!r:.40}; expected a positive number)")
        return kind(value)

    n_head = get("attention.head_count")
    hidden = get("embedding_length")
    embd = tensors.get("token_embd.weight")
    cfg = dict(
        vocab_size=get("vocab_size", embd.data.shape[0] if embd is not None and embd.data.ndim == 2 else None),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=get("attention.head_count_kv", n_head),
        head_dim=get("attention.key_length", hidden // n_head),
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6, float),
        rope_theta=get("rope.freq_base", 10000.0, float),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),  # the file's, not the family's default
    )
    if per_block:
        cfg["edgequant_block_shapes"] = _block_shapes(per_block, cfg, where)
    return cfg


def _block_shapes(per_block: dict, cfg: dict, where: str) -> list[list[int]]:
    """[FFN width, heads, KV heads] of each block, from the arrays (or the scalars) of the file."""
    n = cfg["num_hidden_layers"]
    columns = []
    for key, scalar in zip(PER_BLOCK_KEYS, ("intermediate_size", "num_attention_heads", "num_key_value_heads")):
        values = per_block.get(key, [cfg[scalar]] * n)
        if len(values) != n:
            raise EdgequantError(f"{where}: {key} has {len(values)} entries for {n} blocks")
        columns.append(values)
    ratio = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    if any(h != kv * ratio for h, kv in zip(columns[1], columns[2])):
        raise EdgequantError(f"{where}: every block must keep {ratio} query heads per KV head")
    return [list(s) for s in zip(*columns)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

"""llama.cpp's own quantizer, as a baseline: the stock GGUF files (Q4_K_M, Q3_K_M, IQ4_NL...).

A thin wrapper over ``llama_model_quantize`` from llama-cpp-python's ctypes API, i.e. the
same code path as the ``llama-quantize`` tool. In the llama.cpp vendored by llama-cpp-python
0.3.x (checked against 0.3.36's ``include/llama.h``, ``src/llama-quant.cpp`` and
``tools/quantize/quantize.cpp``) every list in ``llama_model_quantize_params`` is a plain C
array ended by a sentinel, so everything llama-quantize can do is reachable from Python:

- ``imatrix``: ``llama_model_imatrix_data[]`` = {name, float *data, size}, ended by name NULL.
  llama-quantize fills it from its imatrix file (sums divided by counts) and also records
  ``quantize.imatrix.entries_count`` through ``kv_overrides``; we do the same.
- ``kv_overrides``: ``llama_model_kv_override[]``, ended by an empty key.
- ``tt_overrides``: ``llama_model_tensor_override[]`` = {regex, ggml_type}, ended by pattern
  NULL; llama.cpp ``std::regex_search``-es each tensor name, first match wins (``--tensor-type``).

``write_f32_copy`` turns any GGUF (e.g. a packaged Q4_1 model) into the F32 input the
quantizer wants.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from edgequant.atomic import atomic_path

log = logging.getLogger(__name__)

_STOCK_NAMES = (  # llama-quantize's presets, largest first
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S",
    "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)
STOCK_FTYPES: dict[str, int] = {n: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{n}") for n in _STOCK_NAMES}
"""Stock llama.cpp file types (``llama-quantize`` names) -> ``llama_ftype`` value."""

_IMATRIX_N_ENTRIES_KEY = b"quantize.imatrix.entries_count"  # what llama-quantize records


def quantize_stock(
    src: Path,
    dst: Path,
    ftype: str,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    type_overrides: dict[str, str] | None = None,
    nthread: int = 2,
) -> None:
    """Run llama.cpp's quantizer on an F32/F16 GGUF ``src``, writing ``dst`` atomically.

    ``ftype`` is a key of ``STOCK_FTYPES``. ``imatrix`` maps GGUF tensor names
    ('blk.0.attn_q.weight') to per-input-column importance (mean squared activation,
    length = row length), as llama-quantize passes it after reading ``--imatrix``.
    ``type_overrides`` maps a regex searched in tensor names to a ggml type name
    ('Q8_0', 'q4_k'...), like ``--tensor-type REGEX=TYPE``; the first matching regex wins.
    Raises RuntimeError (one line, llama.cpp's reason) if llama.cpp fails.
    """
    src, dst = Path(src), Path(dst)
    with _params(src, ftype, imatrix, type_overrides, nthread) as params, atomic_path(dst) as tmp, \
            _llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to quantize {src.name} to {ftype}: {_failure_reason(lines)}")


def stock_size(src: Path, ftype: str, *, imatrix: dict[str, np.ndarray] | None = None) -> int:
    """Bytes of tensor data in the file ``quantize_stock(src, ..., ftype, imatrix=...)`` would
    write, from llama.cpp's dry run (the types chosen, nothing quantized or written). Raises
    RuntimeError when the mix needs an importance matrix and none is given."""
    return sum(t.nbytes for t in stock_tensors(src, ftype, imatrix=imatrix))


@dataclass(frozen=True)
class StockTensor:
    """One tensor of a stock file, as llama.cpp's dry run chose it."""

    name: str
    shape: tuple[int, ...]  # ggml's order: the row length first
    ggml_type: str  # gguf-py's name ("Q4_K", "IQ2_XXS", "F32")

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.ggml_type]]
        return int(np.prod(self.shape[1:])) * self.shape[0] // block * size


def stock_tensors(src: Path, ftype: str, *, imatrix: dict[str, np.ndarray] | None = None) -> list[StockTensor]:
    """Every tensor of the file ``quantize_stock(src, ..., ftype, imatrix=...)`` would write, with
    the type llama.cpp's mix gives it, from its dry run (nothing quantized or written). Raises
    RuntimeError when the mix needs an importance matrix and none is given."""
    src = Path(src)
    with _params(src, ftype, imatrix, None, 1) as params, _llama_log() as lines:
        params.dry_run = True
        if llama_cpp.llama_model_quantize(str(src).encode(), b"", ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp failed to size {src.name} as {ftype}: {_failure_reason(lines)}")
    if not imatrix and any("will require an imatrix" in line for line in lines):
        raise ImatrixRequired(f"{ftype} needs an importance matrix")
    return _dry_run_tensors(lines)


class ImatrixRequired(RuntimeError):
    """The preset quantizes some tensors to types llama.cpp makes only with an importance matrix."""


@contextlib.contextmanager
def _params(src: Path, ftype: str, imatrix, type_overrides, nthread: int) -> Iterator[ctypes.Structure]:
    """``llama_model_quantize_params`` for these options; the C arrays it points into (and their
    float buffers) live until the context ends."""
    if ftype.upper() not in STOCK_FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; expected one of {', '.join(STOCK_FTYPES)}")
    if not src.is_file():
        raise FileNotFoundError(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = STOCK_FTYPES[ftype.upper()]
    params.nthread = nthread
    keep = []
    if imatrix:
        imatrix_arrays = _imatrix_array(imatrix)
        kv_array = _kv_int_overrides({_IMATRIX_N_ENTRIES_KEY: len(imatrix)})
        params.imatrix, params.kv_overrides = imatrix_arrays[0], kv_array
        keep += [imatrix_arrays, kv_array]
    if type_overrides:
        tt_arrays = _tensor_type_array(type_overrides)
        params.tt_overrides = tt_arrays[0]
        keep.append(tt_arrays)
    yield params
    del keep


def _dry_run_tensors(lines: list[str]) -> list[StockTensor]:
    """The tensors of a dry run, from the line llama.cpp logs for each
    (``[ 3/ 30] blk.0.attn_q.weight - [576, 576, 1, 1], type = f32, size = ... (q4_K)``)."""
    tensors, count = [], None
    for line in "".join(lines).splitlines():
        found = _TENSOR_LINE.search(line)
        if found:
            kind = getattr(gguf.GGMLQuantizationType, (found["new"] or found["old"]).upper(), None)
            if kind is None:
                raise RuntimeError(f"llama.cpp's dry run names a type gguf-py does not know: {line.strip()}")
            shape = tuple(int(n) for n in found["shape"].split(","))
            tensors.append(StockTensor(found["name"], shape, kind.name))
            count = int(found["of"])
    if not tensors or len(tensors) != count:
        raise RuntimeError(f"llama.cpp's dry run listed {len(tensors)} of {count or '?'} tensors in a form read here")
    return tensors


_TENSOR_LINE = re.compile(r"\[\s*\d+/\s*(?P<of>\d+)\]\s+(?P<name>\S+)\s+- \[(?P<shape>[\d, ]+)\], type =\s*(?P<old>\w+), "
                          r"size = [^(]*(?:\((?P<new>\w+)\))?")


def write_f32_copy(src: Path, dst: Path) -> None:
    """Write ``dst``: the GGUF ``src`` with every tensor dequantized to float32, all metadata kept."""
    from edgequant.models import read_gguf  # gguf-py's reader, faster through a large vocabulary

    reader = read_gguf(src)
    arch = reader.fields["general.architecture"].contents()
    with atomic_path(Path(dst)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for t in reader.tensors:  # t.shape is ggml order (ne0 first); numpy order is reversed
            shape = [int(n) for n in reversed(t.shape)]
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(t.n_elements))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # streamed: one tensor in memory at a time
            writer.write_tensor_data(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False))
        writer.close()


# --- ctypes arrays for llama_model_quantize_params ------------------------------------------


def _imatrix_array(imatrix: dict[str, np.ndarray]) -> tuple[ctypes.Array, list[np.ndarray]]:
    """NULL-terminated ``llama_model_imatrix_data[]`` plus the float32 buffers it points into."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    buffers = []
    for entry, (name, values) in zip(entries, imatrix.items()):
        buf = np.ascontiguousarray(values, dtype=np.float32).ravel()
        buffers.append(buf)
        entry.name = name.encode()
        entry.data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = buf.size
    return entries, buffers  # the zero-initialised last entry is the terminator


def _kv_int_overrides(values: dict[bytes, int]) -> ctypes.Array:
    """``llama_model_kv_override[]`` of integer values, ended by an empty key."""
    entries = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for entry, (key, value) in zip(entries, values.items()):
        entry.key = key
        entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        entry.value.val_i64 = value
    return entries


def _tensor_type_array(type_overrides: dict[str, str]) -> tuple[ctypes.Array, list[bytes]]:
    """``llama_model_tensor_override[]`` {regex, ggml_type}, ended by pattern NULL."""
    entries = (llama_cpp.llama_model_tensor_override * (len(type_overrides) + 1))()
    patterns = [p.encode() for p in type_overrides]
    for entry, pattern, type_name in zip(entries, patterns, type_overrides.values()):
        entry.pattern = pattern
        entry.type = _ggml_type(type_name)
    entries[-1].type = llama_cpp.GGML_TYPE_COUNT
    return entries, patterns


def _ggml_type(name: str) -> int:
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise ValueError(f"unknown ggml type {name!r}") from None


# --- plumbing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log messages instead of printing them; restore the previous sink after."""
    messages: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        messages.append(text.decode("utf-8", "replace"))

    previous, previous_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield messages
    finally:
        llama_cpp.llama_log_set(previous, previous_data)
        log.debug("llama.cpp quantize log:\n%s", "".join(messages))


def _failure_reason(messages: list[str]) -> str:
    """The exception text that llama_model_quantize logs as 'failed to quantize: ...'."""
    for text in reversed(messages):
        if "failed to quantize:" in text:
            return " ".join(text.split("failed to quantize:", 1)[1].split())
    return "no reason logged"

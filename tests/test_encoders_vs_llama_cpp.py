"""Our encoders are at least as accurate as llama.cpp's own quantizer on the real model's weights.

llama.cpp quantizes the default model once, with each ggml type given to the ffn_down matrices
(rows of 1536 fit every block size) of a few blocks through per-tensor overrides; we quantize the
same float32 matrices, and compare the squared error, type by type (docs/benchmarks.md gives the
ratios over all 30 blocks, one type at a time). The scalar types are compared without importance.
llama.cpp will not make the codebook i-quants without an importance matrix, so both quantizers get
the same one (E[x^2] of ffn_down's inputs on calibration text) and the error is weighted by it.
"""

import gguf
import pytest

from edgequant.assets import default_gguf
from edgequant.ggml_iquants import CODEBOOK_TYPES
from edgequant.ggml_quants import TYPES
from edgequant.models import read_gguf
from runtimes.llama_quantize import quantize_stock, write_f32_copy

NAMES = sorted(TYPES)
CODEBOOK = sorted(t.name for t in CODEBOOK_TYPES)
BLOCKS = {name: [i for i in range(30) if i % len(NAMES) == k] for k, name in enumerate(NAMES)}  # 2-3 blocks a type


@pytest.fixture(scope="module")
def matrices(tmp_path_factory, default_model, calib_windows):
    """(reference ffn_down matrices, llama.cpp's quantization of them, their importance) by tensor name."""
    from edgequant.calibration import activation_stats

    folder = tmp_path_factory.mktemp("f32")
    write_f32_copy(default_gguf(), folder / "reference-f32.gguf")
    overrides = {rf"blk\.{i}\.ffn_down": name for name, blocks in BLOCKS.items() for i in blocks}
    importance = {k: v for k, v in activation_stats(default_model, calib_windows).importance.items()
                  if k.endswith("ffn_down.weight") and any(k == f"blk.{i}.ffn_down.weight" for n in CODEBOOK for i in BLOCKS[n])}
    quantize_stock(folder / "reference-f32.gguf", folder / "stock.gguf", "Q8_0", imatrix=importance,
                   type_overrides=overrides)
    return ffn_down(folder / "reference-f32.gguf"), ffn_down(folder / "stock.gguf"), importance


def ffn_down(path):
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)
        for t in read_gguf(path).tensors
        if t.name.endswith("ffn_down.weight")
    }


@pytest.mark.parametrize("name", NAMES)
def test_squared_error_within_2_percent_of_llama_cpps(name, matrices):
    reference, stock, importance = matrices
    ours_err = theirs_err = 0.0
    for i in BLOCKS[name]:
        tensor_name = f"blk.{i}.ffn_down.weight"
        w, qtype, imp = reference[tensor_name], TYPES[name], importance.get(tensor_name)
        ours = gguf.quants.dequantize(qtype.quantize(w, imp), qtype.ggml_type).reshape(w.shape)
        weight = 1.0 if imp is None else imp
        ours_err += float((weight * (ours - w) ** 2).sum())
        theirs_err += float((weight * (stock[tensor_name] - w) ** 2).sum())
    print(f"{name}: {'weighted ' if imp is not None else ''}squared error ours {ours_err:.6g}, llama.cpp {theirs_err:.6g}")
    assert ours_err <= 1.02 * theirs_err  # Q4_1 is the source grid: both are exactly 0 there

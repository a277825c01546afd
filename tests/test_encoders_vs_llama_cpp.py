"""Our encoders are at least as accurate as llama.cpp's own quantizer on the real model's weights.

For each type, llama.cpp quantizes every ffn_down matrix (rows of 1536 fit every block size)
to that type through ``llama_model_quantize``; we quantize the same float32 matrices without
importance, and compare mean squared error over all 30 of them.
"""

import gguf
import pytest

from edgequant.assets import default_gguf
from edgequant.ggml_quants import TYPES
from runtimes.llama_quantize import quantize_stock, write_f32_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("f32") / "reference-f32.gguf"
    write_f32_copy(default_gguf(), path)
    return path


def ffn_down(path):
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)
        for t in gguf.GGUFReader(path).tensors
        if t.name.endswith("ffn_down.weight")
    }


@pytest.mark.parametrize("name", sorted(TYPES))
def test_mean_squared_error_within_2_percent_of_llama_cpp(name, f32_gguf, tmp_path):
    stock_path = tmp_path / f"stock-{name}.gguf"
    quantize_stock(f32_gguf, stock_path, "Q8_0", type_overrides={r"ffn_down": name})
    reference, stock = ffn_down(f32_gguf), ffn_down(stock_path)
    ours_err = theirs_err = 0.0
    for tensor_name, w in reference.items():
        qtype = TYPES[name]
        ours = gguf.quants.dequantize(qtype.quantize(w), qtype.ggml_type).reshape(w.shape)
        ours_err += float(((ours - w) ** 2).sum())
        theirs_err += float(((stock[tensor_name] - w) ** 2).sum())
    print(f"{name}: squared error ours {ours_err:.6g}, llama.cpp {theirs_err:.6g}")
    assert ours_err <= 1.02 * theirs_err  # Q4_1 is the source grid: both are exactly 0 there

"""ONNX Runtime's own grids (MatMulNBits configurations): what we pack is what ORT computes with,
what the planner counts is what the file holds, and the rounding beats the plain grid."""

import numpy as np
import pytest
import torch

from edgequant.ggml_quants import get_type
from edgequant.methods.gptq import gptq
from edgequant.ort_quants import CANDIDATES, TYPES
from edgequant.planning import Matrix, fitting_type
from exporters.onnx.nbits import from_ort
from tests.helpers import run_gather_block_quantized, run_matmul_nbits, weights

CONFIGS = sorted(TYPES)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_packed_rows_decode_to_the_grid_values_exactly(name):
    qtype = get_type(name)
    w = weights(rows=16, cols=512)
    grid = qtype.fit(w)
    codes = grid.round(w)
    data = qtype.pack(grid, codes)
    assert data.shape == (16, qtype.row_bytes(512))
    back, back_codes = qtype.unpack(data)
    np.testing.assert_array_equal(back_codes, codes)
    np.testing.assert_array_equal(back.values(back_codes), grid.values(codes))
    assert qtype.tensor_bytes(16, 512) == from_ort(name, data).nbytes  # the planner's bytes are the file's


@pytest.mark.parametrize("name", CONFIGS)
def test_onnx_runtime_computes_with_what_we_decode(name):
    cols = 576 if get_type(name).block <= 64 else 512  # 576 / 64: an odd number of blocks (zero points padded)
    data = get_type(name).quantize(weights(rows=32, cols=cols))
    w = from_ort(name, data)
    grid, codes = get_type(name).unpack(data)
    a = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    expected = a @ grid.values(codes).T
    np.testing.assert_allclose(run_matmul_nbits(w, a), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["MNB4_B32_SYM", "MNB4_B64_ZP", "MNB8_B32_ZP"])
def test_an_embedding_table_in_these_grids_is_looked_up_as_we_decode_it(name):
    data = get_type(name).quantize(weights(rows=40, cols=576))
    grid, codes = get_type(name).unpack(data)
    ids = np.array([[0, 5, 39, 5]], np.int64)
    np.testing.assert_allclose(run_gather_block_quantized(from_ort(name, data), ids), grid.values(codes)[ids],
                               rtol=0, atol=1e-6)


def test_zero_points_fit_an_off_centre_block_better_and_cost_what_orts_layout_costs():
    w = weights(rows=32, cols=512) + 0.03  # every block shifted off zero
    error = {z: float(((get_type(f"MNB4_B32_{z}").dequantized(w) - w) ** 2).sum()) for z in ("SYM", "ZP")}
    assert error["ZP"] < 0.7 * error["SYM"], error
    assert get_type("MNB4_B32_SYM").bpw == 5.0 and get_type("MNB4_B128_SYM").bpw == 4.25
    assert get_type("MNB4_B32_ZP").row_bytes(576) == 576 // 2 + 4 * 18 + 9
    assert get_type("MNB4_B64_ZP").row_bytes(576) == 576 // 2 + 4 * 9 + 5  # nine 4-bit zero points take 5 bytes


def test_a_block_the_row_does_not_divide_falls_back_to_the_next_smaller_one():
    assert fitting_type("MNB4_B256_SYM", 576) == "MNB4_B64_SYM"
    assert fitting_type("MNB8_B128_ZP", 1536) == "MNB8_B128_ZP"
    sizes = [get_type(t).tensor_bytes(64, 1536) for t in CANDIDATES]
    assert sizes == sorted(sizes)  # the menu runs smallest first


def test_gptq_on_these_grids_beats_nearest_rounding_on_the_layer_output():
    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 256)) * np.linspace(0.2, 3, 256)
    x = torch.from_numpy((rng.standard_normal((2048, 64)) @ mix + 0.1 * rng.standard_normal((2048, 256))).astype(np.float32))
    # correlated inputs (64 directions and a little noise), as a layer's activations are: where error feedback pays
    hessian = x.T @ x / len(x)
    w = torch.from_numpy(weights(rows=64, cols=256))
    for name in ("MNB4_B32_SYM", "MNB4_B128_ZP"):
        qtype = get_type(name)
        codes, grid = gptq(w, hessian, qtype)
        near = qtype.fit(w.numpy(), importance=torch.diag(hessian).numpy())
        errors = [float(((x @ (torch.from_numpy(g.values(c)) - w).T) ** 2).mean()) for g, c in
                  ((grid, codes), (near, near.round(w.numpy())))]
        assert errors[0] < 0.7 * errors[1], (name, errors)


def test_plans_count_matrix_bytes_from_the_configuration():
    m = Matrix("blk.0.ffn_down.weight", 576, 1536)
    assert get_type("MNB4_B128_SYM").tensor_bytes(m.rows, m.cols) == 576 * (768 + 4 * 12)

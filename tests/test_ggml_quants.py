"""The encoders write exactly what llama.cpp reads, and search their scales well."""

import gguf
import numpy as np
import pytest

from edgequant.ggml_quants import TYPES, get_type

ALL = sorted(TYPES)


def weights(rows=48, cols=512, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(rows, cols)).astype(np.float32) * 0.02
    w[0, :7] = 0.0  # a few exact zeros and one all-zero block exercise the edge cases
    w[1, :256] = 0.0
    return w


def decode(qtype, data, shape):
    return gguf.quants.dequantize(data, qtype.ggml_type).reshape(shape)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("with_importance", [False, True])
def test_bytes_decode_in_gguf_py_exactly_to_the_grid_values(name, with_importance):
    qtype, w = TYPES[name], weights()
    imp = np.random.default_rng(1).gamma(1.0, size=w.shape[1]).astype(np.float32) if with_importance else None
    grid = qtype.fit(w, imp)
    q = grid.round(w)
    data = qtype.pack(grid, q)
    assert data.shape == (w.shape[0], w.shape[1] // qtype.block * qtype.nbytes)
    np.testing.assert_array_equal(decode(qtype, data, w.shape), grid.values(q))


@pytest.mark.parametrize("name", ALL)
def test_grid_round_is_the_nearest_grid_point(name):
    qtype, w = TYPES[name], weights(rows=8)
    grid = qtype.fit(w)
    q = grid.round(w)
    err = np.abs(grid.values(q) - w)
    for step in (-1, 1):  # no neighbouring code is closer
        other = np.clip(q + step, grid.qmin, grid.qmax)
        assert np.all(err <= np.abs(grid.values(other) - w) + 1e-7)


@pytest.mark.parametrize("name", ALL)
def test_error_shrinks_with_bits_and_stays_small(name):
    qtype, w = TYPES[name], weights()
    rel = ((decode(qtype, qtype.quantize(w), w.shape) - w) ** 2).mean() / (w**2).mean()
    assert rel < 4.0 ** -(qtype.bpw - 2.5)  # e.g. < 0.031 at 5 bpw: a loose sanity bound


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K", "IQ4_NL"])
def test_importance_lowers_the_weighted_error(name):
    qtype, w = TYPES[name], weights(rows=64)
    imp = np.ones(w.shape[1], np.float32)
    imp[::4] = 50.0  # a few columns matter much more

    def weighted_error(importance):
        d = decode(qtype, qtype.quantize(w, importance), w.shape) - w
        return float((d**2 * imp).sum())

    assert weighted_error(imp) < 0.97 * weighted_error(None)


def test_beats_gguf_py_reference_quantizers_on_plain_error():
    w = weights(rows=64)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        qtype = TYPES[name]
        ours = ((decode(qtype, qtype.quantize(w), w.shape) - w) ** 2).mean()
        ref = ((decode(qtype, gguf.quants.quantize(w, qtype.ggml_type), w.shape) - w) ** 2).mean()
        assert ours < ref, name


def test_k_quants_refuse_rows_that_are_not_whole_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        get_type("Q4_K").fit(np.zeros((2, 576), np.float32))


def test_unknown_type_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ggml type"):
        get_type("Q7_K")


@pytest.mark.parametrize("name", ALL)
def test_unpack_reads_back_the_codes_and_grid_that_gguf_py_decodes(name):
    qtype, w = TYPES[name], weights()
    data = qtype.quantize(w)
    grid, q = qtype.unpack(data)
    assert q.min() >= qtype.qmin and q.max() <= qtype.qmax
    np.testing.assert_array_equal(grid.values(q), decode(qtype, data, w.shape))
    np.testing.assert_array_equal(qtype.pack(qtype.fit(w), q), data)  # the same codes pack to the same bytes

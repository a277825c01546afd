"""The encoders write exactly what llama.cpp reads, and search their scales well."""

import gguf
import numpy as np
import pytest

from edgequant.ggml_iquants import CODEBOOK_TYPES
from edgequant.ggml_quants import TYPES, get_type
from tests.helpers import weights

ALL = sorted(TYPES)
CODEBOOK = sorted(t.name for t in CODEBOOK_TYPES)  # a vector per group of weights, not a code per weight
SCALAR = [name for name in ALL if name not in CODEBOOK]


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


@pytest.mark.parametrize("name", SCALAR)
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


@pytest.mark.parametrize("name", CODEBOOK)
def test_a_groups_vector_is_the_codebooks_nearest_under_the_importance(name):
    """(IQ1_S's groups share their shift by fours: there, the nearest of those with the shift chosen.)"""
    qtype, w = TYPES[name], weights(rows=8)
    imp = np.random.default_rng(1).gamma(1.0, size=w.shape[1]).astype(np.float32)
    grid = qtype.fit(w, imp)
    codes, vectors, group = grid.round(w), qtype.table, qtype.codebook.group
    weight = np.broadcast_to(imp, w.shape)
    target, _ = qtype.targets(w, weight)
    scale = grid._columns(grid.scale, 0, w.shape[1])
    u = np.where(scale != 0, target / np.where(scale != 0, scale, 1), 0).reshape(-1, group)
    every = (weight.reshape(-1, group)[:, None, :] * (u[:, None, :] - vectors[None]) ** 2).sum(-1)
    chosen = codes.index.reshape(-1)
    if name == "IQ1_S":
        half = len(vectors) // 2
        every = np.where((np.arange(len(vectors)) >= half)[None, :] == (chosen >= half)[:, None], every, np.inf)
    ours, best = every[np.arange(len(u)), chosen], every.min(1)
    np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_unpack_reads_back_the_codes_and_grid_that_gguf_py_decodes(name):
    qtype, w = TYPES[name], weights()
    data = qtype.quantize(w)
    grid, q = qtype.unpack(data)
    if name in CODEBOOK:
        assert 0 <= q.index.min() and q.index.max() < len(qtype.table)
    else:
        assert q.min() >= qtype.qmin and q.max() <= qtype.qmax
    np.testing.assert_array_equal(grid.values(q), decode(qtype, data, w.shape))
    np.testing.assert_array_equal(qtype.pack(qtype.fit(w), q), data)  # the same codes pack to the same bytes


def test_iq4_nl_stands_in_for_q2_k_and_q3_k_because_it_rounds_real_rows_better_than_q4_0(default_model):
    """Rows that are not whole 256-blocks cannot hold Q2_K/Q3_K. llama.cpp falls back to Q4_0 there;
    we take IQ4_NL, the same 4.5 bits per weight (measured on all 576-wide matrices of the default
    model with 2048 calibration tokens: 0.63x Q4_0's importance-weighted squared error)."""
    from edgequant.assets import read_text
    from edgequant.calibration import activation_stats
    from edgequant.evaluation import token_windows
    from edgequant.planning import fitting_type

    assert fitting_type("Q3_K", 576) == fitting_type("Q2_K", 576) == "IQ4_NL"
    assert TYPES["IQ4_NL"].bpw == TYPES["Q4_0"].bpw
    importance = activation_stats(default_model, token_windows(default_model.tokenizer, read_text("c4.utf8"), 512)).importance
    error = {"Q4_0": 0.0, "IQ4_NL": 0.0}
    for name, w in default_model.matrices():
        if name.startswith(("blk.0.", "blk.15.", "blk.29.")) and w.shape[1] % 256:
            w = w.detach().numpy()
            for t in error:
                error[t] += float((importance[name] * (decode(TYPES[t], TYPES[t].quantize(w, importance[name]), w.shape) - w) ** 2).sum())
    print(f"IQ4_NL / Q4_0 importance-weighted squared error: {error['IQ4_NL'] / error['Q4_0']:.3f}")
    assert error["IQ4_NL"] < 0.8 * error["Q4_0"]

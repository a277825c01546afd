"""The transforms of SpecQuant, RUQuant and the Hadamard baseline: orthogonal or invertible, and
folded into a model without changing what it computes (float32; tiny random models)."""

from __future__ import annotations

import pytest
import torch

from edgequant import rotations as R
from edgequant.errors import EdgequantError
from edgequant.fakequant import Setting, fake_quantize, quantize, quantize_rows
from edgequant.methods import ruquant, specquant

GEN = lambda seed=0: torch.Generator().manual_seed(seed)  # noqa: E731
TUNED = 0.98  # stage 2's best loss against its start on the outlier example below (measured: 0.958)


@pytest.mark.parametrize("n", [2, 12, 64, 72, 576, 1536])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitudes(n):
    h = R.hadamard(n)
    assert R.is_orthogonal(h)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_there_is_no_hadamard_matrix_of_order_nine():
    with pytest.raises(ValueError, match="order 9"):
        R.hadamard(9)


def test_householder_reflection_is_orthogonal_symmetric_and_sends_u_to_the_target():
    u, t = torch.randn(64, generator=GEN(), dtype=torch.float64), torch.rand(64, generator=GEN(1), dtype=torch.float64)
    h = R.householder(R.reflection_onto(u, t))
    assert R.is_orthogonal(h) and torch.allclose(h, h.T) and torch.allclose(h @ h, torch.eye(64, dtype=torch.float64))
    assert torch.allclose(h @ u, t * u.norm() / t.norm())


def test_givens_rotations_are_orthogonal_and_turn_each_pair_toward_its_target():
    u, t = torch.randn(16, generator=GEN(), dtype=torch.float64), torch.rand(16, generator=GEN(1), dtype=torch.float64)
    g = R.givens_onto(u, t)
    assert R.is_orthogonal(g) and torch.linalg.det(g) > 0
    turned, pairs_t = (g @ u).reshape(-1, 2), t.reshape(-1, 2)
    assert torch.allclose(turned / turned.norm(dim=1, keepdim=True), pairs_t / pairs_t.norm(dim=1, keepdim=True))


def test_ruquant_block_rotation_is_orthogonal_and_shrinks_the_largest_value():
    x = torch.randn(4096, 64, generator=GEN(), dtype=torch.float64)
    x[:, 3] *= 30  # an outlier channel, as in real activations
    r = ruquant.block_rotation(x.T, GEN())
    assert R.is_orthogonal(r)
    assert (x @ r.T).abs().max() < 0.5 * x.abs().max()


def test_ruquant_tuned_site_transform_with_zigzag_is_orthogonal():
    x = torch.randn(512, 256, generator=GEN(), dtype=torch.float64)
    x[:, :5] *= 20
    perm = ruquant.zigzag(x.abs().amax(0), 64)
    assert sorted(perm.tolist()) == list(range(256))
    w = torch.randn(96, 256, generator=GEN(1), dtype=torch.float64)
    m, _ = ruquant.tuned_site_transform(x, w, 64, Setting(4, 4), GEN())
    assert R.is_orthogonal(m)


def test_tuning_the_householder_lowers_the_quantized_output_error_and_keeps_the_best():
    x = torch.randn(256, 128, generator=GEN())
    x[:, 7] *= 25
    w = torch.randn(96, 128, generator=GEN(1))
    start = ruquant.initial_reflection(x, GEN())
    best, losses = ruquant.tune_reflection(start, [(x, w)], Setting(4, 4))
    assert len(losses) == ruquant.TUNE_STEPS + 1
    assert min(losses) < TUNED * losses[0], losses  # AdamW through straight-through rounding makes progress
    _, again = ruquant.tune_reflection(best, [(x, w)], Setting(4, 4), steps=0)
    assert again[0] == pytest.approx(min(losses), rel=1e-4)  # the vector returned is the best one seen


def test_spectral_truncation_keeps_the_asked_energy_and_is_the_identity_at_one():
    w = torch.randn(32, 576, generator=GEN(), dtype=torch.float64)
    assert torch.equal(specquant.bins_kept(w, 1.0), torch.full((32,), 289))
    assert torch.allclose(specquant.truncate(w, specquant.bins_kept(w, 1.0)), w)
    cut = specquant.truncate(w, specquant.bins_kept(w, 0.9))
    kept = cut.pow(2).sum(1) / w.pow(2).sum(1)  # Parseval: the energy left in the weights
    assert (kept >= 0.9 - 1e-9).all() and (kept < 0.95).all()


def test_per_row_truncation_never_rounds_worse_than_no_truncation():
    w = torch.randn(64, 576, generator=GEN(), dtype=torch.float64)
    rounding = lambda m: quantize_rows(m.float(), 4).double()  # noqa: E731
    best, share = specquant.low_pass(w, rounding, None)
    assert ((rounding(best) - w).pow(2).sum(1) <= (rounding(w) - w).pow(2).sum(1) + 1e-9).all()
    assert set(share.tolist()) <= set(specquant.ENERGIES)


def test_quantizers_use_at_most_two_to_the_bits_levels_per_row():
    x = torch.randn(8, 1000, generator=GEN())
    for bits in (4, 6):
        q = quantize(x, bits)
        assert all(len(torch.unique(row)) <= 2**bits for row in q)
        assert (q - x).abs().max() < (x.amax() - x.amin()) / 2**bits


@pytest.mark.parametrize("group", [None, 32])
def test_gptq_rounds_on_exactly_the_grids_of_round_to_nearest(group):
    from edgequant.fakequant import RowGrid

    w = torch.randn(16, 256, generator=GEN())
    grid = RowGrid(4, group).fit(w.numpy())
    assert torch.allclose(torch.from_numpy(grid.values(grid.round(w.numpy()))), quantize_rows(w, 4, group), atol=1e-6)


def test_weight_groups_give_every_run_of_a_row_its_own_grid():
    w = torch.randn(4, 64, generator=GEN())
    w[:, :32] *= 100  # a loud first half would set one per-row grid too coarse for the quiet second half
    per_row, per_group = quantize_rows(w, 4), quantize_rows(w, 4, 32)
    assert (per_group - w)[:, 32:].abs().max() < 0.1 * (per_row - w)[:, 32:].abs().max()
    assert all(len(torch.unique(run)) <= 16 for run in per_group.reshape(-1, 32))
    with pytest.raises(EdgequantError, match="do not divide"):
        quantize_rows(w, 4, 48)


def _max_logit_difference(a, b, window) -> float:
    with torch.no_grad():
        ids = torch.from_numpy(window)[None]
        return float((a(ids, use_cache=False).logits - b(ids, use_cache=False).logits).abs().max())


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """A tiny random llama of 2 blocks (hidden 256, FFN 768, two KV groups of 64-wide heads), the
    calibration windows and ``rotated[method]``: each method's W4A4 transform of it, made once."""
    from edgequant.activation_quant import transform
    from edgequant.assets import read_text
    from edgequant.calibration import Calibration
    from edgequant.evaluation import token_windows
    from edgequant.models import load_model
    from edgequant.progress import Progress

    loaded = load_model(tiny_model())
    windows = token_windows(loaded.tokenizer, read_text("c4.utf8"), 2048)

    class Lazy(dict):
        def __missing__(self, method):
            self[method] = transform(method, loaded, Calibration(windows, {}), Setting(4, 4), Progress())
            return self[method]

    return loaded, windows, Lazy()


def _scale(loaded) -> float:
    """Differences are judged against the logits' own size (a random model's are large)."""
    with torch.no_grad():
        return float(loaded.model(torch.arange(100, 164)[None]).logits.abs().max())


@pytest.mark.parametrize("method", ["hadamard", "ruquant-folded"])
def test_folded_rotations_leave_the_model_unchanged(method, tiny):
    loaded, windows, rotated = tiny
    done = rotated[method]
    assert not done.work.config.tie_word_embeddings
    assert _max_logit_difference(done.work.model, loaded.model, windows[-1]) < 1e-5 * _scale(loaded)


@pytest.mark.parametrize("method, per_block", [("hadamard", 1), ("ruquant", 7)])
def test_online_transforms_are_orthogonal_and_exact_without_rounding(method, per_block, tiny):
    """Hadamard leaves the down input's transform online; RUQuant as published leaves every
    matrix's input transform online (q, k and v share one, as do gate and up)."""
    loaded, windows, rotated = tiny
    done = rotated[method]
    n = loaded.config.num_hidden_layers
    assert len(done.online) == per_block * n
    if method == "ruquant":
        layer = "model.layers.1."
        shared = [done.online[layer + m] for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
        assert shared[0] is shared[1] is shared[2]
        assert done.online[layer + "mlp.gate_proj"] is done.online[layer + "mlp.up_proj"]
        assert len({id(m) for m in done.online.values()}) == 4 * n
    assert all(R.is_orthogonal(m) for m in done.online.values())
    sim = fake_quantize(done.work.model, Setting(None, None), done.online)
    assert _max_logit_difference(sim, loaded.model, windows[-1]) < 1e-5 * _scale(loaded)


def test_smoothing_alone_leaves_the_model_unchanged(tiny):
    from edgequant.calibration import Calibration
    from edgequant.progress import Progress

    loaded, windows, _ = tiny
    done = specquant.transform(loaded, Calibration(windows, {}), Setting(4, 4), Progress(), energy=1.0)
    assert done.details["mean_bins_kept"] == 1.0
    assert _max_logit_difference(done.work.model, loaded.model, windows[-1]) < 1e-5 * _scale(loaded)


def test_ruquant_block_size_falls_back_to_a_common_divisor_and_refuses_tiny_blocks():
    assert ruquant.site_block(576, 64) == 64 and ruquant.site_block(1536, 128) == 128
    assert ruquant.site_block(4864, 128) == 128 and ruquant.site_block(1120, 64) == 32
    with pytest.raises(EdgequantError, match="577-wide"):
        ruquant.site_block(577, 64)

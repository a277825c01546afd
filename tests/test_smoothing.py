"""Activation scaling maps are folded into the weights without changing the model's function, and the
calibration statistics of the folded model follow from the scales."""

import numpy as np
import torch

from edgequant.assets import read_text
from edgequant.calibration import activation_stats
from edgequant.evaluation import token_windows
from edgequant.smoothing import smooth


def test_folding_leaves_full_precision_logits_unchanged_and_shrinks_activation_outliers(default_model):
    calib = token_windows(default_model.tokenizer, read_text("c4.utf8"), 1024)
    before = activation_stats(default_model, calib)
    smoothed = default_model.copy()
    folded = smooth(smoothed, before.absmax, alpha=0.5)
    ids = torch.from_numpy(calib[0][None, :256])
    with torch.no_grad():
        diff = (default_model.model(ids).logits - smoothed.model(ids).logits).abs().max()
    assert float(diff) < 1e-3

    after = activation_stats(smoothed, calib)

    def outlier_ratio(stats, name):  # largest channel range over the median channel range
        r = stats.absmax[name]
        return float(r.max() / r.median())

    for name in ("blk.3.attn_q.weight", "blk.3.ffn_gate.weight", "blk.3.ffn_down.weight", "blk.3.attn_output.weight"):
        assert outlier_ratio(after, name) < outlier_ratio(before, name)
    assert default_model.model.model.layers[0].input_layernorm.weight is not smoothed.model.model.layers[0].input_layernorm.weight
    # the statistics of the smoothed model follow from the scales, without running it again
    derived = folded.importance(before.importance)
    for name, measured in after.importance.items():
        np.testing.assert_allclose(derived[name], measured, rtol=2e-3, atol=1e-6 * measured.max())

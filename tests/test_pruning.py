"""Structural pruning: smaller blocks in torch, in GGUF (llama.cpp's per-block ``deci``
architecture) and in ONNX, computing the same thing in all three (on a tiny random llama)."""

import numpy as np
import pytest
import torch

from edgequant.errors import EdgequantError
from edgequant.adapters import BlockShape
from edgequant.models import block_shapes, load_model, read_gguf
from edgequant.pipeline import BuildOptions
from edgequant.pruning import Pruning, prune, refit
from tests.helpers import assert_same_model

# A tiny llama of 4 blocks: FFN 768, 4 query heads in 2 KV groups.
MODEL = {"num_hidden_layers": 4}
# FFN of block 1 to 384 channels (every other one), of block 2 to 256; block 2 keeps KV group 1
# (2 query heads); block 3 goes.
PRUNING = Pruning(ffn={1: list(range(0, 768, 2)), 2: list(range(256))}, kv_groups={2: [1]}, removed=(3,))
BUILD = {"config": MODEL, "bpw": 4.5}


def test_refit_is_the_least_squares_fit_of_the_original_output():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 24, generator=gen, dtype=torch.float64) @ torch.randn(24, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    kept = torch.arange(0, 24, 2)
    fitted = refit(w, z.T @ z / len(z), kept, damp=0.0)
    best = torch.linalg.lstsq(z[:, kept], z @ w.T).solution.T
    assert torch.allclose(fitted, best, atol=1e-8)
    assert torch.equal(refit(w, None, kept), w[:, kept])


def test_a_pruning_that_names_missing_blocks_or_leaves_nothing_is_refused(tiny_model):
    model = load_model(tiny_model(**MODEL)).model
    for bad in (Pruning(removed=tuple(range(4))), Pruning(ffn={4: [0]}), Pruning(kv_groups={2: []}),
                Pruning(kv_groups={2: [2]}), Pruning(ffn={1: [0, 0]}), Pruning(ffn={1: [0.5]}),
                Pruning(removed=("3",))):
        with pytest.raises(EdgequantError):
            bad.check(model)
    with pytest.raises(EdgequantError, match="Pruning"):
        BuildOptions(pruning={"removed": [3]})


def test_qwen_models_are_refused_before_any_work(tiny_model, tmp_path):
    with pytest.raises(EdgequantError, match="llama-family"):
        from edgequant.pipeline import build

        build(BuildOptions(model=str(tiny_model("qwen2")), out=tmp_path / "out", method="rtn",
                           pruning=Pruning(removed=(1,))))
    assert not (tmp_path / "out").exists()


def test_refitting_brings_the_pruned_model_closer_to_the_original(default_model, calib_windows):
    ids = torch.from_numpy(calib_windows[0])[None]
    pruning = Pruning(ffn={b: list(range(768)) for b in range(0, 30, 3)}, kv_groups={b: [0, 1] for b in range(1, 30, 3)})

    def kl(model):
        with torch.no_grad():
            p = torch.log_softmax(default_model.model(ids).logits, -1)
            q = torch.log_softmax(model(ids).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    plain = prune(default_model, pruning, calib_windows[1:], refitted=False)
    fitted = prune(default_model, pruning, calib_windows[1:])
    assert block_shapes(fitted.model)[0] == BlockShape(768, 9, 3) and block_shapes(fitted.model)[1] == BlockShape(1536, 6, 2)
    assert kl(fitted.model) < 0.8 * kl(plain.model)


def test_a_pruned_gguf_sizes_every_block_on_its_own(tiny_build):
    out, report = tiny_build(pruning=PRUNING, **BUILD)
    reader = read_gguf(out / "model.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "deci" and field("deci.block_count") == 3
    ffn, heads, kv = field("deci.feed_forward_length"), field("deci.attention.head_count"), field("deci.attention.head_count_kv")
    assert list(ffn) == [768, 384, 256] and list(heads) == [4, 4, 2] and list(kv) == [2, 2, 1]
    assert report["pruning"]["removed"] == [3] and len(report["pruning"]["blocks"]) == 3
    page = (out / "report.html").read_text()
    assert 'id="pruning"' in page and "<td><b>384</b></td>" in page


def test_llama_cpp_and_onnx_runtime_compute_the_pruned_model_as_torch_does(tiny_build):
    _, report = tiny_build(pruning=PRUNING, **BUILD)
    q = report["quality"]
    assert_same_model(q["gguf"], q["gguf_sim"])
    assert_same_model(q["onnx_exact"], q["onnx_sim"])  # the ONNX folder's own plan, on the same pruned model
    assert_same_model(q["onnx"], q["onnx_sim"], kld=0.25)  # as shipped: int8 activations


def test_pruning_costs_quality_against_the_same_build_unpruned(tiny_build):
    pruned = tiny_build(pruning=PRUNING, **BUILD)[1]["quality"]["gguf"]
    whole = tiny_build(**BUILD)[1]["quality"]["gguf"]
    assert pruned["kld"] > whole["kld"] + 10 * (pruned["kld_se"] + whole["kld_se"]), (pruned, whole)


def test_the_pruned_gguf_loads_back_block_by_block(tiny_build):
    out, report = tiny_build(pruning=PRUNING, **BUILD)
    loaded = load_model(out / "model.gguf")
    assert [vars(s) for s in block_shapes(loaded.model)] == report["pruning"]["blocks"]
    with pytest.raises(EdgequantError, match="below 1"):  # block 2 has one KV group left, as loaded
        Pruning(kv_groups={2: [1]}).check(loaded.model)
    ids = torch.arange(100, 164)[None]
    assert np.isfinite(loaded.model(ids).logits.detach().numpy()).all()

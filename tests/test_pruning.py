"""Structural pruning: smaller blocks in torch, in GGUF (llama.cpp's per-block ``deci``
architecture) and in ONNX, computing the same thing in all three."""

import numpy as np
import pytest
import torch

from edgequant.errors import EdgequantError
from edgequant.models import BlockShape, block_shapes, load_model, read_gguf
from edgequant.pipeline import BuildOptions, build
from edgequant.pruning import Pruning, prune, refit
from runtimes.llamacpp import chat

from .conftest import CALIB_TOKENS, EVAL_TOKENS, QUESTION

# FFN of block 3 to 768 channels (every other one), of block 10 to 512; block 5 keeps KV groups
# 0 and 2 (6 query heads), block 12 group 1 (3 heads); block 20 goes.
PRUNING = Pruning(ffn={3: list(range(0, 1536, 2)), 10: list(range(512))}, kv_groups={5: [0, 2], 12: [1]},
                  removed=(20,))


def test_refit_is_the_least_squares_fit_of_the_original_output():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 24, generator=gen, dtype=torch.float64) @ torch.randn(24, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    kept = torch.arange(0, 24, 2)
    fitted = refit(w, z.T @ z / len(z), kept, damp=0.0)
    best = torch.linalg.lstsq(z[:, kept], z @ w.T).solution.T
    assert torch.allclose(fitted, best, atol=1e-8)
    assert torch.equal(refit(w, None, kept), w[:, kept])


def test_a_pruning_that_names_missing_blocks_or_leaves_nothing_is_refused(default_model):
    for bad in (Pruning(removed=tuple(range(30))), Pruning(ffn={30: [0]}), Pruning(kv_groups={2: []}),
                Pruning(kv_groups={2: [3]}), Pruning(ffn={1: [0, 0]}), Pruning(ffn={1: [0.5]}),
                Pruning(removed=("3",))):
        with pytest.raises(EdgequantError):
            bad.check(default_model.model)
    with pytest.raises(EdgequantError, match="Pruning"):
        BuildOptions(pruning={"removed": [3]})


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def pruned_build(default_model, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "out"
    opts = BuildOptions(out=out, method="rtn", pruning=PRUNING, bpw=4.5, eval_tokens=EVAL_TOKENS,
                        calib_tokens=CALIB_TOKENS, formats="gguf,onnx")
    return out, build(opts, loaded=default_model, reference=reference)


@pytest.mark.slow
def test_a_pruned_gguf_sizes_every_block_on_its_own(pruned_build):
    out, report = pruned_build
    reader = read_gguf(out / "model.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "deci" and field("deci.block_count") == 29
    ffn, heads, kv = field("deci.feed_forward_length"), field("deci.attention.head_count"), field("deci.attention.head_count_kv")
    assert (ffn[3], ffn[10], ffn[0]) == (768, 512, 1536)
    assert (heads[5], kv[5], heads[12], kv[12], heads[0], kv[0]) == (6, 2, 3, 1, 9, 3)
    assert report["pruning"]["removed"] == [20] and len(report["pruning"]["blocks"]) == 29
    page = (out / "report.html").read_text()
    assert 'id="pruning"' in page and "<td><b>768</b></td>" in page


@pytest.mark.slow
def test_llama_cpp_and_onnx_runtime_compute_the_pruned_model_as_torch_does(pruned_build):
    _, report = pruned_build
    q = report["quality"]
    assert abs(q["gguf"]["ppl"] / q["gguf_sim"]["ppl"] - 1) < 0.01, (q["gguf"], q["gguf_sim"])
    assert abs(q["onnx_exact"]["ppl"] / q["gguf_sim"]["ppl"] - 1) < 0.01, (q["onnx_exact"], q["gguf_sim"])
    assert q["onnx"]["kld"] < 2 * q["gguf"]["kld"]
    assert q["gguf"]["kld"] > q["fp"]["kld"]  # pruning costs something: the files differ from the original


@pytest.mark.slow
def test_the_pruned_gguf_chats_and_loads_back(pruned_build):
    out, report = pruned_build
    assert "Paris" in chat(out / "model.gguf", QUESTION)
    loaded = load_model(out / "model.gguf")
    assert [vars(s) for s in block_shapes(loaded.model)] == report["pruning"]["blocks"]
    with pytest.raises(EdgequantError, match="below 2"):  # checked against the blocks as loaded
        Pruning(kv_groups={5: [2]}).check(loaded.model)
    ids = torch.arange(100, 164)[None]
    assert np.isfinite(loaded.model(ids).logits.detach().numpy()).all()

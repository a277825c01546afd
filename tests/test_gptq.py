"""GPTQ chooses codes on the exact ggml grid, lowers the layer's output error, calibrates block by block."""

import gguf
import numpy as np
import pytest
import torch

from edgequant.assets import read_text
from edgequant.calibration import sequential_hessians
from edgequant.evaluation import token_windows
from edgequant.ggml_quants import get_type
from edgequant.methods.gptq import gptq

GPTQ_TOKENS = 4096


def correlated_layer(rows=64, cols=512, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.rand(cols, generator=g) * 2
    w = torch.randn(rows, cols, generator=g) * 0.02
    return w, x, x.T @ x / tokens


@pytest.mark.parametrize("name", ["Q4_0", "IQ4_NL", "Q4_K", "Q3_K", "Q2_K", "Q6_K",  # a code per weight
                                  "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"])  # a vector per group
def test_codes_are_packed_as_chosen_and_lower_the_output_error(name):
    w, x, h = correlated_layer()
    qtype = get_type(name)
    codes, grid = gptq(w, h, qtype)
    decoded = gguf.quants.dequantize(qtype.pack(grid, codes), qtype.ggml_type).reshape(w.shape)
    np.testing.assert_array_equal(decoded, grid.values(codes))  # no second rounding

    def output_error(q):
        return float(((torch.from_numpy(q) - w) @ x.T).pow(2).mean())

    rtn = gguf.quants.dequantize(qtype.quantize(w.numpy(), torch.diag(h).numpy()), qtype.ggml_type)
    assert output_error(decoded) < 0.9 * output_error(rtn.reshape(w.shape))


def test_calibration_holds_one_block_at_a_time(tiny_model):
    from edgequant.models import load_model

    loaded = load_model(tiny_model())
    windows = token_windows(loaded.tokenizer, read_text("c4.utf8"), 1024)
    blocks = sequential_hessians(loaded, windows)
    seen = []
    for block in blocks:
        names = set(block.hessians)
        if block.index >= 0:
            assert names == {f"blk.{block.index}.{m}.weight" for m in
                             ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        else:
            assert names == {"token_embd.weight"}  # tied output head, from the final hidden states
        for name, h in block.hessians.items():
            assert h.shape[0] == h.shape[1] and torch.allclose(h, h.T)
        seen.append(block.index)
    assert seen == list(range(loaded.config.num_hidden_layers)) + [-1]


@pytest.mark.parametrize("method", ["gptq", "qublast"])
def test_gptq_beats_rtn_at_q3_k_in_llama_cpp(tiny_build, method):
    """On a tiny 4-block llama at Q3_K, 4096 calibration tokens: KLD 0.147 (GPTQ) and 0.141 (QuBLAST)
    against RTN's 0.165 (512 tokens); with 1024 calibration tokens GPTQ was no better. On the default
    model the ladder measures it (docs/benchmarks.md)."""
    options = {"config": {"num_hidden_layers": 4}, "ggml_type": "Q3_K", "calib_tokens": GPTQ_TOKENS, "formats": "gguf"}
    rtn = tiny_build(**options, method="rtn")[1]["quality"]["gguf"]
    ours = tiny_build(**options, method=method)[1]["quality"]["gguf"]
    assert ours["kld"] < 0.92 * rtn["kld"], (ours, rtn)

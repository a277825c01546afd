"""Phi-3 on small random models: its fused q/k/v and gate/up matrices are split for every method
and fused again in the file, and its longrope scaling reaches llama.cpp's phi3 architecture, which
then computes what torch computes."""

import json

import gguf
import numpy as np
import pytest
import torch

from edgequant.models import load_model
from exporters.gguf import write_gguf
from tests.helpers import assert_runs_as_simulated, float_file_in_llama_cpp_and_torch

_rng = np.random.default_rng(0)
# longrope: the short factors apply up to original_max_position_embeddings, the long ones beyond
# (in transformers per forward pass, in llama.cpp per context: the 512-token windows take the long
# ones when the original context is 256)
PHI3 = {"num_hidden_layers": 2, "max_position_embeddings": 2048, "original_max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                            "long_factor": (1 + 3 * _rng.random(32)).round(3).tolist(),
                            "short_factor": (1 + 0.5 * _rng.random(32)).round(3).tolist()}}
LONG = {**PHI3, "original_max_position_embeddings": 256,
        "rope_parameters": {**PHI3["rope_parameters"], "original_max_position_embeddings": 256}}


def test_the_file_holds_phi3s_fused_matrices_and_rope_tables(tiny_model, tmp_path):
    folder = tiny_model("phi3", **PHI3)
    loaded = load_model(str(folder))
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n, _ in loaded.model.named_parameters())  # split inside
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    reader = gguf.GGUFReader(path)
    value = {name: field.contents() for name, field in reader.fields.items()}
    assert value["general.architecture"] == "phi3" and value["phi3.rope.scaling.original_context_length"] == 4096
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert "blk.0.ffn_gate.weight" not in tensors and "blk.0.attn_q.weight" not in tensors
    from safetensors.numpy import load_file

    checkpoint = load_file(folder / "model.safetensors")
    for name, hf in (("blk.0.attn_qkv.weight", "model.layers.0.self_attn.qkv_proj.weight"),
                     ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight")):  # gate rows first, as llama.cpp wants
        np.testing.assert_array_equal(tensors[name], checkpoint[hf])
    np.testing.assert_allclose(tensors["rope_factors_long.weight"], PHI3["rope_parameters"]["long_factor"], rtol=1e-6)


@pytest.mark.parametrize("config", [PHI3, LONG], ids=["short-factors", "long-factors"])
def test_llama_cpp_runs_the_float_file_as_torch_runs_the_model(tiny_model, tmp_path, config):
    q = float_file_in_llama_cpp_and_torch(tiny_model("phi3", **config), tmp_path)
    assert q["llama.cpp"].ppl == pytest.approx(q["torch"].ppl, rel=0.005), q
    assert q["llama.cpp"].top1 > 0.99 and q["llama.cpp"].kld < 1e-4, q


@pytest.mark.parametrize("options", [{"ggml_type": "Q8_0"}, {"method": "gptq", "bpw": 4.5}], ids=["Q8_0", "gptq-4.5"])
def test_a_phi3_build_runs_in_llama_cpp_as_simulated(tiny_build, options):
    out, report = tiny_build("phi3", config=PHI3, formats="gguf", **options)
    assert_runs_as_simulated(report["quality"])
    types = {t["name"]: t["ggml_type"] for t in json.loads((out / "plan.json").read_text())["tensors"]}
    for block in range(PHI3["num_hidden_layers"]):  # one tensor in the file, so one type
        assert len({types[f"blk.{block}.attn_{p}.weight"] for p in "qkv"}) == 1
        assert types[f"blk.{block}.ffn_gate.weight"] == types[f"blk.{block}.ffn_up.weight"]
    if "bpw" in options:
        assert len(set(types.values())) > 1  # a mix


def test_a_phi3_gguf_loads_back_as_the_model_it_was_written_from(tiny_model, tmp_path):
    loaded = load_model(str(tiny_model("phi3", **PHI3)))
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    again = load_model(str(path))  # attn_qkv and ffn_up read as the rows of their parts
    assert again.config.rope_parameters["long_factor"] == pytest.approx(PHI3["rope_parameters"]["long_factor"])
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)

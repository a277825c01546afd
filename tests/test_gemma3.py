"""Gemma 3 on small random models: its (1 + w) norms, post-norms, scaled embedding, GELU MLP and
sliding-window layers with their own rope base reach llama.cpp as its gemma3 architecture, which
then computes what torch computes."""

import json

import gguf
import numpy as np
import pytest
import torch

from edgequant.errors import EdgequantError
from edgequant.models import load_model
from exporters.gguf import write_gguf
from tests.helpers import assert_runs_as_simulated, assert_same_model, float_file_in_llama_cpp_and_torch

# heads of 64 (llama.cpp scales attention by 1/sqrt(head_dim), so query_pre_attn_scalar is 64 too);
# a window of 32 on 512-token windows, so the local layers see far less than the global one
GEMMA = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
         "query_pre_attn_scalar": 64, "sliding_window": 32,
         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}


def test_the_gguf_holds_what_llama_cpp_reads_for_gemma3(tiny_model, tmp_path):
    loaded = load_model(str(tiny_model("gemma3_text", **GEMMA)))
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    reader = gguf.GGUFReader(path)
    value = {name: field.contents() for name, field in reader.fields.items()}
    assert value["general.architecture"] == "gemma3"
    assert value["gemma3.rope.freq_base"] == 1e6 and value["gemma3.rope.freq_base_swa"] == 1e4
    assert value["gemma3.attention.sliding_window"] == 32
    assert value["gemma3.attention.sliding_window_pattern"] == [True, False, True]  # not llama.cpp's period of 6
    norms = {t.name: np.asarray(t.data) for t in reader.tensors if t.name.endswith("norm.weight")}
    assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight"} <= set(norms)
    hf = loaded.model.state_dict()
    np.testing.assert_array_equal(norms["blk.0.ffn_norm.weight"], hf["model.layers.0.pre_feedforward_layernorm.weight"] + 1)


def test_llama_cpp_runs_the_float_file_as_torch_runs_the_model(tiny_model, tmp_path):
    q = float_file_in_llama_cpp_and_torch(tiny_model("gemma3_text", **GEMMA), tmp_path)
    assert q["llama.cpp"].ppl == pytest.approx(q["torch"].ppl, rel=0.005), q
    assert q["llama.cpp"].top1 > 0.99 and q["llama.cpp"].kld < 1.5e-4, q  # F16 KV cache, GELU from an fp16 table


@pytest.mark.parametrize("options", [{"ggml_type": "Q8_0"}, {"bpw": 4.5}], ids=["Q8_0", "mixed-4.5"])
def test_a_gemma3_build_runs_in_llama_cpp_as_simulated(tiny_build, options):
    out, report = tiny_build("gemma3_text", config=GEMMA, formats="gguf", **options)
    assert_runs_as_simulated(report["quality"])
    if "bpw" in options:
        assert len({t["ggml_type"] for t in json.loads((out / "plan.json").read_text())["tensors"]}) > 1  # a mix


def test_what_gemma3_cannot_do_yet_is_one_line(tiny_model, tmp_path):
    from edgequant.pipeline import BuildOptions, build

    folder = str(tiny_model("gemma3_text", **GEMMA))
    with pytest.raises(EdgequantError, match="rotates"):
        build(BuildOptions(model=folder, out=tmp_path / "a", method="hadamard", formats="gguf", calib_tokens=512, eval_tokens=512))
    with pytest.raises(EdgequantError, match="no ONNX export"):
        build(BuildOptions(model=folder, out=tmp_path / "b", formats="gguf,onnx", calib_tokens=512, eval_tokens=512))
    assert list(tmp_path.iterdir()) == []


def test_a_gemma3_gguf_loads_back_as_the_model_it_was_written_from(tiny_model, tmp_path):
    loaded = load_model(str(tiny_model("gemma3_text", **GEMMA)))
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    again = load_model(str(path))
    for key in ("layer_types", "sliding_window", "rope_parameters", "query_pre_attn_scalar", "head_dim", "num_key_value_heads"):
        assert getattr(again.config, key) == getattr(loaded.config, key), key
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ the real gemma3-270m

def test_gemma3_270m_runs_in_llama_cpp_as_its_simulation_with_llama_cpps_activation_rounding(gemma3_270m_q8_0):
    """The real model's perplexity moves by 0.7% from llama.cpp's 8-bit activation blocks alone
    (KLD 0.004), so its parity is checked against the simulation that rounds them too."""
    _, report = gemma3_270m_q8_0
    q = report["quality"]
    assert_same_model(q["gguf"], q["gguf_sim_a8"], ppl=0.01, kld=float("inf"))
    assert q["gguf"]["top1"] > 0.9 and q["gguf"]["ppl"] < 20  # with BOS at the start of every window


def test_the_shipped_gemma3_270m_continues_a_sentence_in_llama_cpp(gemma3_270m_q8_0):
    import llama_cpp

    out, _ = gemma3_270m_q8_0
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    reply = llm("Monday, Tuesday, Wednesday,", max_tokens=6, temperature=0, logprobs=2)["choices"][0]
    assert reply["text"].startswith(" Thursday, Friday, Saturday"), reply["text"]
    first, second = sorted(reply["logprobs"]["top_logprobs"][0].values(), reverse=True)
    assert first - second > 1.0  # the next day, by a wide margin (measured: 1.6 nats)

"""What `edgequant build` writes and how it is checked, on tiny random models: the plan's types in
the file (K-quants where rows allow, stand-ins elsewhere), caps that hold, reports that say what was
measured, the tokenizer, and llama.cpp computing what the torch simulation of the same bytes does."""

import json

import gguf
import pytest

from edgequant.pipeline import gguf_tensor_stats
from tests.helpers import assert_same_model

# hidden 320 is not a multiple of 256: its rows take no K-quant; ffn_down's rows (768) do
NARROW = {"hidden_size": 320, "num_attention_heads": 5, "num_key_value_heads": 1}
Q3_K = {"config": NARROW, "ggml_type": "Q3_K"}
MIXED = {"bpw": 4.5}
Q8_0 = {"ggml_type": "Q8_0"}  # the tiny build several files share


def test_k_quant_files_use_k_quants_where_rows_allow_and_iq4_nl_elsewhere(tiny_build):
    out, _ = tiny_build(**Q3_K)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q3_K"  # rows of 768 = 3 super-blocks
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "IQ4_NL"  # rows of 320 are not
    assert types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("options", [Q3_K, MIXED], ids=["Q3_K", "mixed-4.5"])
def test_llama_cpp_and_the_torch_simulation_agree(tiny_build, options):
    _, report = tiny_build(**options)
    q = report["quality"]
    assert_same_model(q["gguf"], q["gguf_sim"])
    assert q["gguf"]["kld"] > 0.005  # 4-bit and 3-bit files do lose something


@pytest.mark.parametrize("bpw", [5.0, 4.0])
def test_a_bpw_cap_is_never_exceeded_and_the_file_is_measured(tiny_build, bpw):
    out, report = tiny_build(bpw=bpw, formats="gguf")
    n_bytes, n_params = gguf_tensor_stats(out / "model.gguf")
    measured = n_bytes * 8 / n_params
    artifact = report["artifacts"][0]
    assert artifact["bpw"] == pytest.approx(measured, rel=1e-9)
    assert bpw - 0.15 <= measured <= bpw  # a cap, filled: the greedy mix stops one upgrade short of it
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert {t["name"]: t["ggml_type"] for t in report["tensors"]}.items() <= stored.items()
    assert len(set(stored.values()) - {"F32"}) >= 2  # a mixed file


def test_report_and_plan_hold_what_a_reader_needs(tiny_build):
    out, report = tiny_build(**MIXED)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert {"model", "device", "budget", "predicted", "method", "artifacts", "quality", "build", "blocks", "tensors",
            "text"} <= report.keys()
    for runtime in ("fp", "gguf_sim", "gguf", "onnx", "onnx_exact"):
        assert {"ppl", "ppl_se", "kld", "kld_se", "top1", "runtime", "tokens", "ctx"} <= report["quality"][runtime].keys()
    assert report["text"]["evaluation"]["tokens"] == 512 and report["text"]["calibration"]["tokens"] == 512
    gguf_art, onnx_art = report["artifacts"]
    assert {"format", "path", "bytes", "bpw", "sha256", "tensor_bytes", "params"} <= gguf_art.keys()
    assert {"mapping", "bits_used", "accuracy_level"} <= onnx_art.keys()
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["tensors"]) == len(report["tensors"])
    assert len(report["blocks"]) == 2 * 2 + 1  # attention and MLP of each block, and the embedding
    metadata = gguf.GGUFReader(out / "model.gguf").fields
    assert "edgequant" in metadata["general.quantized_by"].contents()
    assert metadata["edgequant.method"].contents() == "rtn"


def test_predicted_file_size_matches_the_exported_file_within_one_percent(tiny_build):
    for options in (MIXED, Q3_K, Q8_0):
        out, report = tiny_build(**options)
        real = (out / "model.gguf").stat().st_size
        assert report["predicted"]["file_bytes"] == pytest.approx(real, rel=0.01)


def test_exported_tokenizer_matches_the_models_own(tiny_build, tiny_model):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgequant.assets import read_text

    out, _ = tiny_build(**MIXED)
    text = read_text("wiki.utf8")[:20000]
    llm = Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    ours = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ours == AutoTokenizer.from_pretrained(tiny_model())(text, add_special_tokens=False)["input_ids"]


# two layout families: 8-weight groups with even signs and 7-bit sign words (IQ2_XXS), 4-weight groups with
# free signs and a 9th index bit (IQ3_S). Every type's bytes are checked against gguf-py's decoder in
# tests/test_ggml_quants.py (IQ2_XS, IQ2_S, IQ3_XXS and IQ4_XS passed here too; the suite's time is tight).
@pytest.mark.parametrize("ggml_type", ["IQ2_XXS", "IQ3_S"])
def test_i_quant_files_run_in_llama_cpp_and_ort_as_simulated(tiny_build, ggml_type):
    out, report = tiny_build(ggml_type=ggml_type)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == ggml_type
    q = report["quality"]
    assert_same_model(q["gguf"], q["gguf_sim"])
    assert_same_model(q["onnx"], q["gguf_sim"])


def test_a_build_scores_llama_cpps_own_mix_of_the_same_size_beside_it(tiny_build):
    out, report = tiny_build(method="gptq", bpw=4.5, formats="gguf", parity=False, twin=True)
    twin, ours = report["stock"], report["artifacts"][0]
    assert twin["imatrix"] and twin["label"] == f"llama.cpp {twin['mix']} + imatrix"
    assert twin["tensor_bytes"] >= ours["tensor_bytes"]  # the same size or the next larger preset
    stock = report["quality"]["stock"]
    assert stock["runtime"] == "llama.cpp" and stock["tokens"] == report["quality"]["gguf"]["tokens"]
    assert 0 < stock["kld"] < 1
    assert not list(out.glob("llama.cpp-*"))  # scored beside ours, not shipped
    assert twin["label"] in (out / "report.html").read_text()


def test_the_twins_source_has_the_head_tied_as_the_model_came_even_after_a_method_untied_it(tiny_model):
    import gguf

    from edgequant.models import load_model
    from edgequant.rotations import untie
    from edgequant.twin import reference_gguf

    loaded = load_model(str(tiny_model("llama", tie_word_embeddings=True)))
    untie(loaded.model)  # what the Hadamard method does before planning
    names = {t.name for t in gguf.GGUFReader(reference_gguf(loaded, tied=True)).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    assert loaded.config.tie_word_embeddings is False  # the model itself stays untied

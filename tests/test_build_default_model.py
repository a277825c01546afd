"""`edgequant build` on the real default model, measured in llama.cpp (slow: minutes)."""

import json

import gguf
import pytest

from edgequant.pipeline import gguf_tensor_stats
from runtimes.llamacpp import chat
from runtimes.ort import OrtDecoder, genai_greedy
from tests.conftest import MIXED, QUESTION, score_stock_mix

pytestmark = pytest.mark.slow


def relative_gap(a, b):
    return abs(a - b) / b


def test_uniform_q8_0_with_scaling_maps_is_within_half_a_percent_in_llama_cpp(build_default):
    _, report = build_default(ggml_type="Q8_0", smooth=0.5)
    q = report["quality"]
    assert q["gguf"]["runtime"] == "llama.cpp"
    assert relative_gap(q["gguf"]["ppl"], q["fp"]["ppl"]) < 0.005
    unsmoothed = build_default(ggml_type="Q8_0")[1]["quality"]["gguf"]
    assert q["gguf"]["kld"] < unsmoothed["kld"]  # the maps are what brings llama.cpp's 8-bit activations in


def test_uniform_q8_0_is_near_full_precision_and_beats_llama_cpps_own_q8_0(build_default, default_model, reference, tmp_path):
    _, report = build_default(ggml_type="Q8_0")
    q = report["quality"]
    assert q["gguf"]["runtime"] == "llama.cpp"
    # the decoded weights alone are within 0.25%; llama.cpp adds its 8-bit activations on top
    assert relative_gap(q["gguf_sim"]["ppl"], q["fp"]["ppl"]) < 0.0025
    assert relative_gap(q["gguf"]["ppl"], q["fp"]["ppl"]) < 0.01
    _, stock = score_stock_mix(tmp_path, "Q8_0", default_model.tokenizer, reference,
                               report["text"]["evaluation"]["tokens"])
    assert q["gguf"]["kld"] < stock.kld


Q3_K = {"ggml_type": "Q3_K", "calib_tokens": 16384}  # the same build serves the GPTQ comparison


@pytest.mark.parametrize("options", [Q3_K, MIXED], ids=["Q3_K", "mixed-4.5"])
def test_llama_cpp_and_the_torch_simulation_agree(build_default, options):
    _, report = build_default(**options)
    q = report["quality"]
    assert relative_gap(q["gguf"]["ppl"], q["gguf_sim"]["ppl"]) < 0.01
    assert q["gguf"]["ppl"] > q["fp"]["ppl"]  # 4-bit and 3-bit files do lose something


def test_k_quant_files_use_k_quants_where_rows_allow_and_llama_cpp_fallbacks_elsewhere(build_default):
    out, _ = build_default(**Q3_K)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q3_K"  # rows of 1536 = 6 super-blocks
    assert types["blk.0.attn_q.weight"] == "IQ4_NL"  # rows of 576 are not
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_bpw_target_is_met_and_reported_as_measured_from_the_file(build_default):
    out, report = build_default(**MIXED)
    n_bytes, n_params = gguf_tensor_stats(out / "model.gguf")
    measured = n_bytes * 8 / n_params
    artifact = report["artifacts"][0]
    assert artifact["bpw"] == pytest.approx(measured, rel=1e-9)
    assert abs(measured - 4.5) <= 0.1
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert {t["name"]: t["ggml_type"] for t in report["tensors"]}.items() <= stored.items()
    assert len(set(stored.values()) - {"F32"}) >= 2  # a mixed file


def test_report_and_plan_hold_what_a_reader_needs(build_default):
    out, report = build_default(**MIXED)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert {"model", "method", "artifacts", "quality", "tensors", "text"} <= report.keys()
    for key in ("ppl", "kld", "top1", "runtime", "tokens", "ctx"):
        assert key in report["quality"]["gguf"]
    assert report["text"]["evaluation"]["tokens"] == 4096
    art = report["artifacts"][0]
    assert {"format", "path", "bytes", "bpw", "sha256"} <= art.keys()
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["tensors"]) == len(report["tensors"])
    metadata = gguf.GGUFReader(out / "model.gguf").fields
    assert "edgequant" in metadata["general.quantized_by"].contents()
    assert metadata["edgequant.method"].contents() == "rtn"


def test_exported_tokenizer_matches_the_models_own(build_default, default_model):
    from llama_cpp import Llama

    from edgequant.assets import read_text

    out, _ = build_default(**MIXED)
    text = read_text("wiki.utf8")[:20000]
    llm = Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    ours = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ours == default_model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_readme_build_command_makes_files_llama_cpp_and_onnxruntime_genai_chat_with(readme_build, default_model):
    out = readme_build
    assert {p.name for p in out.iterdir()} == {"model.gguf", "onnx", "report.json", "report.html", "plan.json",
                                                "manifest.json"}
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out.parent / "stdout.json").read_text()) == report  # --json: the report, on stdout
    assert report["device"]["name"] == "jetson-orin-nano-8gb" and report["method"]["name"] == "qublast"
    predicted = report["predicted"]
    assert predicted["fits"] and predicted["decode_tok_s"] > 0
    assert report["quality"]["gguf"]["kld"] < 0.01  # the budget does not bind: Q8_0 everywhere
    answer = chat(out / "model.gguf", QUESTION)
    assert "Paris" in answer
    # the ONNX folder: onnxruntime-genai answers too, with exactly the tokens of our own ORT loop
    prompt = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"]
    genai = genai_greedy(out / "onnx", prompt, 32)
    ours = OrtDecoder(out / "onnx").greedy(prompt, 32, eos=default_model.tokenizer.eos_token_id)
    assert genai == ours
    assert "Paris" in default_model.tokenizer.decode(genai)

"""Weight-and-activation quantization on the real default model: the simulation ranks the methods
as the issue asks, and the folded RUQuant build runs in llama.cpp and ONNX Runtime as simulated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgequant.evaluation import TorchLogits, evaluate
from edgequant.fakequant import Setting, fake_quantize

SIM_TOKENS = 2048
pytestmark = pytest.mark.slow  # the real default model, transformed and simulated


@pytest.fixture(scope="module")
def eval_windows(default_model):
    from edgequant.assets import EVALUATION_TEXT, load_text
    from edgequant.evaluation import token_windows

    return token_windows(default_model.tokenizer, load_text(None, EVALUATION_TEXT)[1], SIM_TOKENS)


@pytest.fixture(scope="module")
def w4a4(default_model, calib_windows, eval_windows, reference, rotated):
    """KLD at W4A4 of each method, same harness, same windows."""
    from edgequant.activation_quant import transform
    from edgequant.calibration import Calibration
    from edgequant.progress import Progress

    kld = {}
    for method in ("rtn", "smoothquant", "specquant", "ruquant"):
        done = rotated[method] if method == "ruquant" else transform(
            method, default_model, Calibration(calib_windows, {}), Setting(4, 4), Progress())
        sim = fake_quantize(done.work.model, Setting(4, 4), done.online)
        kld[method] = evaluate(TorchLogits(sim), eval_windows, reference).kld
    return kld


@pytest.mark.parametrize("method", ["specquant", "ruquant"])
@pytest.mark.parametrize("baseline", ["rtn", "smoothquant"])
def test_at_w4a4_specquant_and_ruquant_beat_rtn_and_smoothquant(w4a4, method, baseline):
    assert w4a4[method] < w4a4[baseline] - 0.1, w4a4  # KLD's standard error here is about 0.05


def test_ruquant_at_w6a6_keeps_most_of_full_precision_top1_accuracy(default_model, calib_windows, eval_windows,
                                                                     reference, rotated):
    """Issue 9 asks for 99%: bench/activation_quant.py measures 99.0% with weights rounded to
    nearest and 99.2% with GPTQ weights (20480 tokens, KLD 0.034 and 0.033, transforms tuned for
    W6A6). This reuses the session's transform, tuned for W4A4, on 2048 tokens, where the accuracy
    moves by about 1%: 98% is the bound here, and the KLD bound catches a regression."""
    from edgequant.activation_quant import gptq_weights

    done = rotated["ruquant"]
    fp = evaluate(TorchLogits(default_model.model), eval_windows, reference)
    sim = fake_quantize(done.work.model, Setting(6, 6, gptq=True), done.online)
    gptq_weights(sim, calib_windows, 6)
    q = evaluate(TorchLogits(sim), eval_windows, reference)
    assert q.accuracy >= 0.98 * fp.accuracy, (q.accuracy, fp.accuracy, q.top1)
    assert q.kld < 0.05, q.kld


def test_kv_cache_quantization_costs_quality_and_8_bits_costs_little(default_model, eval_windows, reference):
    kld = {bits: evaluate(TorchLogits(fake_quantize(default_model.model, Setting(None, None, bits))), eval_windows,
                          reference).kld for bits in (8, 4)}
    assert 0 < kld[8] < 0.05 < kld[4], kld


def test_eval_simulates_a_method_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "edgequant.cli", "eval", "--method", "hadamard", "--wbits", "6",
                           "--abits", "6", "--kv-bits", "8", "--eval-tokens", "1024", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["setting"] == "W6A6KV8" and result["online_transforms"] == 30
    assert 0 < result["quality"]["kld"] < 0.5 and result["text"]["tokens"] == 1024


def test_the_folded_ruquant_build_runs_in_llama_cpp_and_ort_as_simulated(build_default):
    out, report = build_default(method="ruquant", ggml_type="Q4_0", formats="gguf,onnx")
    q = report["quality"]
    assert abs(q["gguf"]["ppl"] / q["gguf_sim_a8"]["ppl"] - 1) < 0.01, (q["gguf"], q["gguf_sim_a8"])
    assert abs(q["onnx_exact"]["ppl"] / q["gguf_sim"]["ppl"] - 1) < 0.01
    assert q["onnx"]["kld"] < 2 * q["gguf"]["kld"]
    assert "output.weight" not in {t["name"] for t in report["tensors"]}  # the tied head stays tied
    assert report["transform"]["residual"] is False and report["transform"]["online"].startswith("none")

"""The Python API: the command line's commands as functions that return what --json prints (the
README's own example runs in test_readme.py)."""

import pytest

import edgequant
from edgequant.errors import EdgequantError


def test_plan_returns_the_budget_and_bit_map_and_writes_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = edgequant.plan(str(tiny_model()), device="raspberry-pi-4-4gb", bpw=4.5, method="rtn", calib_tokens=512)
    assert plan["device"] == "raspberry-pi-4-4gb" and plan["bpw"] <= 4.5
    assert len(plan["blocks"]) == 2 * 2 + 1 and plan["predicted"]["fits"]
    assert list(tmp_path.iterdir()) == []


def test_bad_input_raises_the_one_line_error():
    with pytest.raises(EdgequantError, match="unknown device 'pi-zero'"):
        edgequant.plan(device="pi-zero")
    with pytest.raises(EdgequantError, match="--eval-tokens must be >= 1"):
        edgequant.build(eval_tokens=0)


def test_simulate_returns_the_quality_of_a_weight_and_activation_setting(default_model):
    result = edgequant.simulate("rtn", wbits=8, abits=8, eval_tokens=512)
    assert result["setting"] == "W8A8" and result["text"]["tokens"] == 512
    assert 0 < result["quality"]["kld"] < 0.02, result["quality"]
    with pytest.raises(EdgequantError, match="omniquant"):
        edgequant.simulate("omniquant")


def test_verify_evaluate_and_report_on_a_build(tiny_build, tiny_model):
    out, report = tiny_build(ggml_type="Q8_0")
    assert edgequant.verify(out)["ok"]
    result = edgequant.evaluate(out / "model.gguf", str(tiny_model()), eval_tokens=512)
    assert result["quality"]["runtime"] == "llama.cpp"
    assert result["quality"]["kld"] == pytest.approx(report["quality"]["gguf"]["kld"], rel=1e-6)
    assert edgequant.report(out) == out / "report.html"

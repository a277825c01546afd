"""The Python API: the CLI's commands as functions that return what --json prints."""

import pytest

import edgequant
from edgequant.errors import EdgequantError

pytestmark = pytest.mark.slow  # uses the README build


def test_plan_returns_the_budget_and_bit_map_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = edgequant.plan(device="raspberry-pi-4-4gb", bpw=4.5, method="rtn", calib_tokens=512)
    assert plan["device"] == "raspberry-pi-4-4gb" and plan["bpw"] <= 4.5
    assert len(plan["blocks"]) == 61 and plan["predicted"]["fits"]
    assert list(tmp_path.iterdir()) == []


def test_bad_input_raises_the_one_line_error():
    with pytest.raises(EdgequantError, match="unknown device 'pi-zero'"):
        edgequant.plan(device="pi-zero")


def test_simulate_returns_the_quality_of_a_weight_and_activation_setting():
    result = edgequant.simulate("rtn", wbits=8, abits=8, eval_tokens=512)
    assert result["setting"] == "W8A8" and result["text"]["tokens"] == 512
    assert 0 < result["quality"]["kld"] < 0.1
    with pytest.raises(EdgequantError, match="omniquant"):
        edgequant.simulate("omniquant")


def test_verify_evaluate_and_report_on_a_build(readme_build):
    assert edgequant.verify(readme_build)["ok"]
    result = edgequant.evaluate(readme_build / "model.gguf", eval_tokens=512)
    assert result["quality"]["runtime"] == "llama.cpp" and result["quality"]["kld"] < 0.01
    assert edgequant.report(readme_build) == readme_build / "report.html"

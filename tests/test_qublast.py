"""QuBLAST on the default model: measured sensitivity, an exact allocation, scaling maps, in llama.cpp."""

import json

import pytest

from edgequant.pipeline import matrices_of
from edgequant.sensitivity import Part, split_parts

pytestmark = pytest.mark.slow


def test_parts_are_attention_and_mlp_per_block_plus_the_embedding(default_model):
    parts = split_parts(matrices_of(default_model)[0])
    assert len(parts) == 2 * default_model.config.num_hidden_layers + 1
    ffn = next(p for p in parts if p.key == "0.ffn")
    assert [Part.label(t) for t in ffn.options()] == [
        "IQ4_NL/Q2_K", "IQ4_NL/Q3_K", "Q5_0/Q4_K", "Q5_0/Q5_K", "Q8_0/Q6_K", "Q8_0"]


def test_report_holds_the_bit_map_with_the_measured_sensitivity(qublast):
    out, report = qublast
    blocks = report["blocks"]
    assert len(blocks) == 61
    assert {b["ggml_type"] for b in blocks} != {"Q8_0"}  # the budget binds: a real mix
    assert {"index", "part", "ggml_type", "bits", "sensitivity"} <= blocks[0].keys()
    assert all(b["sensitivity"] is not None and b["sensitivity"] >= 0 for b in blocks)
    table = json.loads((out / "plan.json").read_text())["sensitivity"]["entries"]
    assert len(table) == 30 * (3 + 6) + 3  # every option of every part was measured
    by_part = {}
    for e in table:
        by_part.setdefault(e["part"], []).append(e["kl"])
    assert sum(kls[0] > kls[-1] for kls in by_part.values()) >= 55  # more bits, less KL, almost everywhere


def test_at_the_size_of_llama_cpps_q4_k_m_it_has_lower_kld_in_llama_cpp(qublast, stock_q4_k_m):
    _, report = qublast
    bpw, stock = stock_q4_k_m
    assert report["artifacts"][0]["bpw"] <= bpw
    assert report["quality"]["gguf"]["kld"] < stock.kld


def test_scaling_maps_shrink_activation_outliers(qublast):
    _, report = qublast
    maps = report["scaling_maps"]
    assert len(maps) == 4 * 30
    assert all(m["error_ratio"] <= 1.0 for m in maps)  # alpha = 0 is a candidate: never worse on its layer
    scaled = [m for m in maps if m["alpha"] > 0]
    # where each input channel has its own scale, a scale > 0 always lowers max/std there;
    # attn_out's scale is folded into v, so one value channel's scale is shared by the query
    # heads of its group and the ratio may rise a little when the output error falls
    own_scales = [m for m in scaled if m["group"] != "attn_out"]
    assert own_scales and all(m["outlier_after"] < m["outlier_before"] for m in own_scales)
    mean = lambda key: sum(m[key] for m in maps) / len(maps)  # noqa: E731
    assert mean("outlier_after") < 0.9 * mean("outlier_before")

"""QuBLAST: its parts on the default model, a measured sensitivity for every part and option and
the exact knapsack's mix under a budget (on a tiny model), and the scaling maps of the README's
build shrinking the default model's activation outliers. Its quality against llama.cpp's own
mixes at the same sizes is measured by bench/ladder.py (docs/benchmarks.md)."""

import json

import pytest

from edgequant.pipeline import matrices_of
from edgequant.sensitivity import Part, split_parts

BPW = 4.0  # on the tiny model: a cap that binds


@pytest.fixture(scope="module")
def qublast(tiny_build):
    """QuBLAST's measured allocation on a tiny llama within 4 bits per weight, rounded to nearest
    without the maps, its sensitivity measured on the first 256 calibration tokens."""
    return tiny_build(method="qublast-rtn", scaling_maps=False, bpw=BPW, sensitivity_tokens=256, formats="gguf")


def test_parts_are_attention_and_mlp_per_block_plus_the_embedding(default_model):
    parts = split_parts(matrices_of(default_model)[0])
    assert len(parts) == 2 * default_model.config.num_hidden_layers + 1
    ffn = next(p for p in parts if p.key == "0.ffn")
    # gate and up (576-wide rows) fall back as llama.cpp does; down (1536-wide) takes every candidate
    assert [Part.label(t) for t in ffn.options()] == [
        "IQ4_NL/IQ1_S", "IQ4_NL/IQ1_M", "IQ4_NL/IQ2_XXS", "IQ4_NL/IQ2_XS", "IQ4_NL/IQ2_S", "IQ4_NL/Q2_K",
        "IQ4_NL/IQ3_XXS", "IQ4_NL/Q3_K", "IQ4_NL/IQ3_S", "IQ4_NL/IQ4_XS", "Q4_0", "Q5_0/Q4_K", "Q5_0/Q5_K",
        "Q8_0/Q6_K", "Q8_0"]
    attn = next(p for p in parts if p.key == "0.attn")  # Q4_0 beside IQ4_NL: the same size, faster kernels
    assert [Part.label(t) for t in attn.options()] == ["IQ4_NL", "Q4_0", "Q5_0", "Q8_0"]
    embd = next(p for p in parts if p.block < 0)  # no 256-block i-quant, as in llama.cpp's mixes
    assert [Part.label(t) for t in embd.options()] == ["IQ4_NL", "Q4_0", "Q5_0", "Q8_0"]


def test_every_option_of_every_part_is_measured_and_the_bit_map_carries_the_chosen_ones(qublast):
    out, report = qublast
    sensitivity = json.loads((out / "plan.json").read_text())["sensitivity"]
    assert sensitivity["tokens"] == 256  # --sensitivity-tokens
    table = sensitivity["entries"]
    # two blocks' attention and MLP, 15 types each (rows of 256 take them all), and the embedding's 7
    assert len(table) == 4 * 15 + 7
    by_part: dict = {}
    for e in table:
        by_part.setdefault(e["part"], []).append(e["kl"])
    assert all(kls[0] > kls[-1] > 0 for kls in by_part.values())  # more bits, less KL; never free
    measured = {(e["part"], e["option"]): e["kl"] for e in table}
    for b in report["blocks"]:
        key = b["part"] if b["index"] < 0 else f"{b['index']}.{b['part']}"
        assert b["sensitivity"] == measured[(key, b["ggml_type"])]
    # the budget binds: a real mix (which mix turns on near-ties of KL that torch's kernels do not
    # reproduce exactly from one process to the next)
    assert len({b["ggml_type"] for b in report["blocks"]}) >= 2


def test_the_mix_is_the_least_summed_kl_within_the_cap(qublast):
    """The knapsack's choice against every assignment of the table that fits the same bytes, each
    option's KL charged for its kernels' slowdown at the plan's price (plan.json's ``pricing``;
    without a stock twin, the price of a byte)."""
    import itertools

    out, report = qublast
    assert report["budget"]["binding"] == "--bpw" and report["artifacts"][0]["bpw"] <= BPW
    plan = json.loads((out / "plan.json").read_text())
    pricing = plan["pricing"]  # each option's KL plus its kernels' slowdown at the plan's price
    assert pricing["decode_price"] == 0  # no --min-tok-s
    options: dict = {}  # part -> option -> (bytes, KL + slowdown priced)
    for e in plan["sensitivity"]["entries"]:
        slowdown = pricing["slowdown_price"] * pricing["slowdown_bytes"][e["part"]][e["option"]]
        options.setdefault(e["part"], {})[e["option"]] = (e["bytes"], e["kl"] + slowdown)
    picked = [options[b["part"] if b["index"] < 0 else f"{b['index']}.{b['part']}"][b["ggml_type"]] for b in report["blocks"]]
    chosen_bytes = sum(n for n, _ in picked)
    best = min(sum(cost for _, cost in pick) for pick in itertools.product(*(o.values() for o in options.values()))
               if sum(n for n, _ in pick) <= chosen_bytes)
    assert sum(cost for _, cost in picked) == pytest.approx(best)


def test_with_its_stock_twin_the_plan_is_no_slower_than_llama_cpp_s_file_of_its_size(tiny_build):
    """llama.cpp's dry run of the twin's mix gives the speed to hold: the plan's predicted decode
    bytes and prefill work stay within that file's, and the report names it."""
    out, report = tiny_build(method="qublast-rtn", scaling_maps=False, bpw=BPW, sensitivity_tokens=256, formats="gguf",
                             twin=True)
    pricing = json.loads((out / "plan.json").read_text())["pricing"]
    stock = pricing["stock"]
    assert stock["label"].startswith("llama.cpp ") and f"held to {stock['label']}" in report["method"]["plan"]
    assert pricing["decode_bytes"] <= stock["decode_bytes"] and pricing["prefill_work"] <= stock["prefill_work"]
    assert report["stock"]["label"].startswith("llama.cpp ")  # the twin itself, scored beside the build


def test_scaling_maps_shrink_activation_outliers(readme):
    work, _, _ = readme
    maps = json.loads((work / "out" / "report.json").read_text())["scaling_maps"]
    assert len(maps) == 4 * 30
    assert all(m["error_ratio"] <= 1.0 for m in maps)  # alpha = 0 is a candidate: never worse on its layer
    scaled = [m for m in maps if m["alpha"] > 0]
    # where each input channel has its own scale, a scale > 0 lowers max/std there almost always
    # (measured: 89 of 90 groups); attn_out's scale is folded into v, so one value channel's scale
    # is shared by the query heads of its group and the ratio may rise when the output error falls
    own_scales = [m for m in scaled if m["group"] != "attn_out"]
    lowered = [m["outlier_after"] < m["outlier_before"] for m in own_scales]
    assert len(own_scales) > 60 and sum(lowered) >= 0.95 * len(lowered)
    mean = lambda key: sum(m[key] for m in maps) / len(maps)  # noqa: E731
    assert mean("outlier_after") < 0.7 * mean("outlier_before")  # measured 53.8 -> 29.9


def test_the_fisher_estimate_ranks_options_as_the_measured_kl_does(tiny_model):
    """The estimate deep models use (linear in depth) against the measured table (depth squared),
    on a tiny llama's 256 calibration tokens: the same order of every part's options, on the
    same scale. (On the default model: docs/benchmarks.md, `bench/sensitivity.py`.)"""
    import numpy as np

    from edgequant.assets import read_text
    from edgequant.calibration import activation_stats
    from edgequant.evaluation import token_windows
    from edgequant.models import load_model
    from edgequant.sensitivity import estimate, measure, rank_correlation

    loaded = load_model(tiny_model(), streamed=True)
    windows = token_windows(loaded.tokenizer, read_text("c4.utf8"), 256, 256)
    importance = activation_stats(loaded, windows).importance
    parts = [p for p in split_parts(matrices_of(loaded)[0]) if p.block >= 0]
    measured = [e.kl for e in measure(loaded, parts, windows, importance).entries]
    estimated = [e.kl for e in estimate(loaded, parts, windows, importance).entries]
    assert rank_correlation(measured, estimated) > 0.95
    assert 0.5 < np.median(np.array(estimated) / np.array(measured)) < 2


def test_a_stopped_sensitivity_measurement_resumes_at_the_part_it_was_on(tiny_model, monkeypatch):
    """Each part's options are kept on disk as soon as they are measured: a run stopped in its
    second part (Ctrl-C, or the end of a session) leaves the first, and the next run measures only
    the rest, to the table an uninterrupted run makes."""
    from edgequant import sensitivity
    from edgequant.assets import read_text
    from edgequant.calibration import activation_stats
    from edgequant.evaluation import token_windows
    from edgequant.models import load_model

    loaded = load_model(tiny_model(), streamed=True)
    windows = token_windows(loaded.tokenizer, read_text("c4.utf8"), 128, 128)
    importance = activation_stats(loaded, windows).importance
    parts = [p for p in split_parts(matrices_of(loaded)[0]) if p.kind == "attn"]  # block 0's, then block 1's
    first = len(parts[0].options())

    def stop_in_the_second_part(counted=[0]):
        counted[0] += 1
        if counted[0] == first + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sensitivity.cached_measure(loaded, parts, windows, importance, stop_in_the_second_part)
    measured = []
    stock = sensitivity.option_kls
    monkeypatch.setattr(sensitivity, "option_kls", lambda _l, part, *a: measured.append(part.key) or stock(_l, part, *a))
    resumed = sensitivity.cached_measure(loaded, parts, windows, importance)
    assert parts[0].key not in measured and set(measured) == {p.key for p in parts[1:]}
    monkeypatch.setattr(sensitivity, "option_kls", stock)
    whole = sensitivity.measure(loaded, parts, windows, importance)
    assert [(e.part, e.option) for e in resumed.entries] == [(e.part, e.option) for e in whole.entries]
    assert [e.kl for e in resumed.entries] == pytest.approx([e.kl for e in whole.entries], rel=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_the_embedding_and_head_are_measured_as_if_rounded_whole(tiny_model, tied):
    """The embedding/head part's KL, measured without a copy of either matrix (the rows the text
    reads rounded in place, the head rounded a slice of the vocabulary at a time), is the KL of
    the model with both matrices rounded whole, from references held in memory or on disk."""
    import torch

    from edgequant.assets import read_text
    from edgequant.calibration import activation_stats
    from edgequant.evaluation import HeldReferences, Reference, SpilledReferences, token_windows
    from edgequant.ggml_quants import get_type
    from edgequant.models import load_model
    from edgequant.sensitivity import output_kl

    loaded = load_model(tiny_model(tie_word_embeddings=tied))
    model, family = loaded.model, loaded.adapter
    windows = token_windows(loaded.tokenizer, read_text("c4.utf8"), 512, 256)
    importance = activation_stats(loaded, windows).importance
    tokens = torch.from_numpy(windows)
    with torch.inference_mode():
        logits = [model(t[None], use_cache=False).logits[0] for t in tokens]
    held, spilled = HeldReferences(Reference.of_logits(z) for z in logits), SpilledReferences(logits)
    embd = next(p for p in split_parts(matrices_of(loaded)[0]) if p.block < 0)
    types = embd.types_for("Q3_K")
    assert len(types) == (1 if tied else 2)
    streamed = [output_kl(loaded, ref, tokens, types, importance) for ref in (held, spilled)]

    with torch.no_grad():  # the same rounding, whole matrices, into the model itself
        before = {name: m.weight.detach().clone() for name, m in
                  {"token_embd.weight": family.embedding(model), "output.weight": family.head(model)}.items()}
        for name, m in (("token_embd.weight", family.embedding(model)), ("output.weight", family.head(model))):
            if name in types:
                m.weight.copy_(torch.from_numpy(get_type(types[name]).dequantized(before[name].numpy(), importance.get(name))))
        whole = sum(r.mean_kl(model(t[None], use_cache=False).logits[0]) for r, t in zip(held, tokens)) / len(held)
    assert whole > 1e-3  # the rounding is felt
    assert streamed == pytest.approx([whole, whole], rel=1e-4)

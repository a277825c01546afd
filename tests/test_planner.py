"""The planner: memory and speed arithmetic against llama.cpp, budgets, and the exact knapsack."""

import itertools
import json
import random
import re
import subprocess
import sys

import pytest

from edgequant.budget import Shape, predict, resolve
from edgequant.devices import load_device
from edgequant.models import load_model
from edgequant.pipeline import matrices_of
from edgequant.kernels import KernelCosts, from_measurements
from edgequant.planning import Matrix, Speed, for_budget, knapsack, knapsack_with_speed
from tests.helpers import assert_clean_failure, edgequant, in_process


def test_knapsack_is_exact_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        items = [[(rng.randint(1, 50), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(4)]
        budget = rng.randint(10, 150)
        feasible = [c for c in itertools.product(*[range(len(o)) for o in items])
                    if sum(items[i][j][0] for i, j in enumerate(c)) <= budget]
        chosen = knapsack(items, budget)
        if not feasible:
            assert chosen is None
            continue
        cost = lambda c: sum(items[i][j][1] for i, j in enumerate(c))  # noqa: E731
        assert sum(items[i][j][0] for i, j in enumerate(chosen)) <= budget
        assert cost(chosen) == pytest.approx(min(cost(c) for c in feasible))


def _shape(loaded):
    matrices, other = matrices_of(loaded)
    return Shape.of(loaded.model, sum(m.params for m in matrices) + other)


def llama_cpp_buffers(path, n_ctx: int) -> tuple[float, float]:
    """(KV cache, compute buffer) in MiB as llama.cpp allocates them for ``path`` at ``n_ctx``,
    loaded the way edgequant bench's probe loads it, read from its log."""
    script = ("import llama_cpp, sys; llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=int(sys.argv[2]), "
              "n_threads=1, flash_attn=True, verbose=True)")
    log = subprocess.run([sys.executable, "-c", script, str(path), str(n_ctx)], capture_output=True, text=True).stderr
    kv = float(re.search(r"KV buffer size =\s*([\d.]+) MiB", log).group(1))
    compute = float(re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", log).group(1))
    return kv, compute


# The compute buffer is modelled as one micro-batch's logits and hidden states: true when the
# vocabulary dominates, as in every real model (32k to 262k tokens), so these models carry one of 49152.
@pytest.mark.parametrize("config, n_ctx", [({}, 256), ({}, 4096), ({"hidden_size": 512, "num_attention_heads": 8}, 2048)],
                         ids=["tiny-256", "tiny-4096", "wider-2048"])
def test_kv_cache_and_compute_buffer_match_what_llama_cpp_allocates(tiny_build, tiny_model, config, n_ctx):
    config = {**config, "vocab_size": 49152}
    out, _ = tiny_build(config=config, ggml_type="Q8_0", formats="gguf", parity=False)
    kv_mib, compute_mib = llama_cpp_buffers(out / "model.gguf", n_ctx)
    shape = _shape(load_model(tiny_model(**config)))
    assert shape.kv_bytes(n_ctx) / 2**20 == pytest.approx(kv_mib, rel=0.01)
    assert shape.compute_buffer_bytes(n_ctx) / 2**20 == pytest.approx(compute_mib, rel=0.05)


def test_budget_takes_the_tightest_constraint(default_model):
    pi4 = load_device("raspberry-pi-4-4gb")
    shape = _shape(default_model)
    assert resolve(pi4, shape).binding == "memory of raspberry-pi-4-4gb"
    both = resolve(pi4, shape, budget_mb=90, bpw=4.5)
    assert both.binding == "--bpw" and both.max_file_bytes < 90e6
    fast = resolve(pi4, shape, min_tok_s=40)
    assert fast.binding == "--min-tok-s"
    assert predict(pi4, shape, fast.max_file_bytes, fast.ctx)["decode_tok_s"] == pytest.approx(40, rel=1e-6)


def test_decode_speed_is_bandwidth_over_bytes_per_token(default_model):
    jetson = load_device("jetson-orin")
    p = predict(jetson, _shape(default_model), 100_000_000, 4096)
    read = 100_000_000 + p["kv_cache_bytes"]
    assert p["decode_tok_s"] == pytest.approx(jetson.bandwidth_gbs * 1e9 * jetson.decode_efficiency / read)
    assert p["memory_bytes"] == 100_000_000 + p["kv_cache_bytes"] + p["runtime_overhead_bytes"]


def test_plan_prints_types_and_predictions_without_writing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = in_process("plan", "--model", tiny_model(), "--device", "raspberry-pi-4-4gb", "--bpw", "4",
                        "--calib-tokens", "1024", "--sensitivity-tokens", "64", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["predicted"]["fits"] and plan["predicted"]["memory_bytes"] <= plan["predicted"]["usable_bytes"]
    assert plan["bpw"] <= 4 and plan["budget"]["binding"] == "--bpw"
    assert {r["part"] for r in plan["blocks"]} == {"attn", "ffn", "embd"}
    assert all(r["sensitivity"] is not None for r in plan["blocks"])  # QuBLAST measured every part
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_impossible_budget_names_the_smallest_size_that_would_fit():
    result = in_process("plan", "--device", "raspberry-pi-4-4gb", "--budget-mb", "20", "-q")
    assert_clean_failure(result, "smallest mix that would fit is 67.8 MB")


def test_unknown_device_lists_the_closest_names():
    assert_clean_failure(in_process("plan", "--device", "jetsn-orin", "-q"), "jetson-orin")


def test_malformed_profile_names_the_field(tmp_path):
    board = tmp_path / "board.toml"
    board.write_text((load_device("raspberry-pi-4-4gb").path).read_text().replace("bandwidth_gbs = ", "bandwidth_gbs = 'fast' #"))
    assert_clean_failure(in_process("plan", "--device", board, "-q"), "bandwidth_gbs")


def test_devices_lists_every_profile_as_json():
    result = edgequant("devices", "--json")
    names = {d["name"] for d in json.loads(result.stdout)}
    assert {"host", "raspberry-pi-4-4gb", "jetson-orin-nano-8gb", "android-snapdragon-8-gen-3"} <= names


def _convex(n: int = 101) -> list[tuple[int, float, float, float]]:
    """An item whose cost falls smoothly with its bytes (50 ... 150), every option at full speed."""
    return [(b, 100.0 / b, 0.0, float(b)) for b in range(50, 50 + n)]


def test_a_plan_two_percent_smaller_but_fifteen_percent_slower_loses():
    """The slow option saves 2 of 100 bytes and a little cost; its slowdown (15% of its bytes,
    priced like bytes at the budget's margin) costs more than it saves, so the fast one is chosen.
    A slightly slow option that saves much is still taken."""
    fast, slow = (100, 0.50, 0.0, 100.0), (98, 0.49, 98 * 0.15, 98 * 1.15)
    assert knapsack([[fast[:2], slow[:2]], [o[:2] for o in _convex()]], 200) == [1, 52]  # bytes alone: the slow one
    assert knapsack_with_speed([[fast, slow], _convex()], 200)[0][0] == 0
    bargain = (98, 0.30, 98 * 0.01, 98 * 1.01)
    assert knapsack_with_speed([[fast, bargain], _convex()], 200)[0][0] == 1


def test_a_decode_floor_trades_bytes_for_faster_types():
    fast, slow = (100, 0.50, 0.0, 100.0), (100, 0.10, 100 * 0.2, 120.0)
    assert knapsack_with_speed([[fast, slow], _convex()], 200)[0][0] == 1  # worth its slowdown
    chosen, _, _ = knapsack_with_speed([[fast, slow], _convex()], 200, max_decode=165)
    assert chosen[0] == 0 and 100 + _convex()[chosen[1]][3] <= 165
    assert knapsack_with_speed([[slow], _convex()], 200, max_decode=165)[0] is None  # 120 + 50 at the least


def test_held_to_the_stock_file_s_speed_the_plan_spends_what_room_it_leaves():
    """Four alike parts, each fast or better-but-slow; llama.cpp's file of this size leaves room
    for two slow ones. One price on the slowdown moves all four at once (all slow: too slow; all
    fast: room unused), so the least price that holds is followed by swaps up to the limits."""
    fast, slow = (100, 0.50, 0.0, 100.0, 100.0), (100, 0.10, 20.0, 120.0, 150.0)
    other = [(b, 100.0 / b, 0.0, 0.0, 0.0) for b in range(50, 151)]  # a part the kernels do not tell apart
    options, budget = [[fast, slow]] * 4 + [other], 600
    chosen, price, _ = knapsack_with_speed(options, budget, stock=(4 * 100 + 2 * 20, 4 * 100 + 2 * 50))
    assert price > 0 and chosen[:4].count(1) == 2
    assert sum(opts[j][0] for opts, j in zip(options, chosen)) <= budget
    chosen, price, _ = knapsack_with_speed(options, budget, stock=(1e9, 1e9))  # a slow stock file: nothing to hold
    assert price == 0 and chosen[:4] == [1, 1, 1, 1]


def test_the_greedy_mix_prices_a_slow_rung_and_keeps_the_decode_floor():
    matrices = [Matrix(f"blk.{b}.ffn_down.weight", 256, 1536) for b in range(4)]
    slow_iq = KernelCosts("test", "made up", decode={t: 3.0 for t in ("IQ3_XXS", "IQ3_S", "IQ4_XS")})
    budget = int(sum(m.params for m in matrices) * 4.3 / 8)
    plain = for_budget(matrices, 0, budget, "test")
    priced = for_budget(matrices, 0, budget, "test", Speed(slow_iq))
    assert "IQ4_XS" in plain.types.values() and not {"IQ3_XXS", "IQ3_S", "IQ4_XS"} & set(priced.types.values())
    slow_prefill = Speed(KernelCosts("test", "made up", prefill={"IQ4_XS": 4.0}), prefill_weight_bytes=0.1)
    assert "IQ4_XS" not in for_budget(matrices, 0, budget, "test", slow_prefill).types.values()
    floor = Speed(slow_iq, max_decode_bytes=budget * 0.8)  # a slow rung in the way: jumped over
    kept = for_budget(matrices, 0, budget, "test", floor)
    assert floor.plan_decode_bytes(kept) <= budget * 0.8 and "Q3_K" in kept.types.values()


def test_decode_and_prefill_factors_come_from_uniform_files_rates():
    costs = from_measurements("t", "made up", {"Q8_0": {"bytes": 200, "decode_tok_s": 10, "prefill_tok_s": 100},
                                                "Q4_0": {"bytes": 100, "decode_tok_s": 20, "prefill_tok_s": 120},
                                                "IQ2_XS": {"bytes": 60, "decode_tok_s": 25, "prefill_tok_s": 40}})
    assert costs.decode_factor("Q8_0") == costs.decode_factor("Q4_0") == 1.0  # bandwidth bound
    assert costs.decode_factor("IQ2_XS") == pytest.approx((1 / (25 * 60)) / (1 / (10 * 200)))
    assert costs.prefill_factor("IQ2_XS") == pytest.approx(3.0) and costs.prefill_factor("Q4_K") == 1.0

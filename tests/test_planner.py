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
from edgequant.planning import knapsack
from tests.helpers import assert_clean_failure, edgequant


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


@pytest.mark.parametrize("config, n_ctx", [({}, 256), ({}, 4096), ({"hidden_size": 512, "num_attention_heads": 8}, 2048)],
                         ids=["tiny-256", "tiny-4096", "wider-2048"])
def test_kv_cache_and_compute_buffer_match_what_llama_cpp_allocates(tiny_build, tiny_model, config, n_ctx):
    out, _ = tiny_build(config=config, ggml_type="Q8_0", **({"formats": "gguf", "parity": False} if config else {}))
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


def test_plan_prints_types_and_predictions_without_writing(tiny_model, tmp_path):
    result = edgequant("plan", "--model", tiny_model(), "--device", "raspberry-pi-4-4gb", "--bpw", "4",
                       "--calib-tokens", "1024", "--sensitivity-tokens", "64", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["predicted"]["fits"] and plan["predicted"]["memory_bytes"] <= plan["predicted"]["usable_bytes"]
    assert plan["bpw"] <= 4 and plan["budget"]["binding"] == "--bpw"
    assert {r["part"] for r in plan["blocks"]} == {"attn", "ffn", "embd"}
    assert all(r["sensitivity"] is not None for r in plan["blocks"])  # QuBLAST measured every part
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_impossible_budget_names_the_smallest_size_that_would_fit():
    result = edgequant("plan", "--device", "raspberry-pi-4-4gb", "--budget-mb", "20", "-q")
    assert_clean_failure(result, "smallest mix that would fit is 71.4 MB")


def test_unknown_device_lists_the_closest_names():
    assert_clean_failure(edgequant("plan", "--device", "jetsn-orin", "-q"), "jetson-orin")


def test_malformed_profile_names_the_field(tmp_path):
    board = tmp_path / "board.toml"
    board.write_text((load_device("raspberry-pi-4-4gb").path).read_text().replace("bandwidth_gbs = ", "bandwidth_gbs = 'fast' #"))
    assert_clean_failure(edgequant("plan", "--device", board, "-q"), "bandwidth_gbs")


def test_devices_lists_every_profile_as_json():
    result = edgequant("devices", "--json")
    names = {d["name"] for d in json.loads(result.stdout)}
    assert {"host", "raspberry-pi-4-4gb", "jetson-orin-nano-8gb", "android-snapdragon-8-gen-3"} <= names

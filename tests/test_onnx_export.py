"""The ONNX export: ggml codes carried into ORT's blockwise formats exactly, and whole exported
models computing in ONNX Runtime what their GGUF computes (tiny random models of every architecture)."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edgequant import ort_budget
from edgequant.adapters import head_dim
from edgequant.devices import load_device
from edgequant.errors import EdgequantError
from edgequant.ggml_quants import TYPES, get_type
from exporters.onnx.nbits import from_ggml
from runtimes.ort import OrtDecoder
from tests.helpers import TINY, assert_clean_failure, assert_same_model, in_process, run_matmul_nbits, weights

SYMMETRIC = ["Q4_0", "Q3_K", "Q5_0", "Q6_K", "Q8_0", "IQ4_NL"]
AFFINE = ["Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"]


def gguf_values(name, data):
    grid, q = TYPES[name].unpack(data)
    return grid.values(q)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_types_keep_their_codes_exactly_at_4_or_8_bits(name):
    data = TYPES[name].quantize(weights())
    w = from_ggml(name, data)
    assert w.bits == (4 if name in ("Q4_0", "Q3_K") else 8)
    assert w.zero_points is None and w.block_size == TYPES[name].sub
    np.testing.assert_array_equal(w.dequantize(), gguf_values(name, data))


@pytest.mark.parametrize("name", AFFINE)
def test_affine_types_go_to_8_bits_and_only_their_offsets_move_a_little(name):
    w0 = weights()
    data = TYPES[name].quantize(w0)
    w = from_ggml(name, data)
    assert w.bits == 8 and w.zero_points is not None
    ggml = gguf_values(name, data)
    conversion = np.sqrt(((w.dequantize() - ggml) ** 2).mean())
    quantization = np.sqrt(((ggml - w0) ** 2).mean())
    assert conversion < 0.15 * quantization  # measured 0.01-0.14: the codes are ggml's, the offsets are rounded
    assert w.max_abs_error == pytest.approx(np.abs(w.dequantize() - ggml).max())


@pytest.mark.parametrize("name", SYMMETRIC + AFFINE)
def test_onnx_runtime_reads_the_packed_blocks_as_we_decode_them(name):
    w = from_ggml(name, TYPES[name].quantize(weights(rows=32)))
    a = np.random.default_rng(0).standard_normal((3, w.shape[1])).astype(np.float32)
    expected = a @ w.dequantize().T
    np.testing.assert_allclose(run_matmul_nbits(w, a), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# ------------------------------------------------------------------ whole models, on tiny random ones

# QuBLAST's allocation over ONNX Runtime's configurations on the tiny model, beside its GGUF plan
MIXED = {"method": "qublast-rtn", "scaling_maps": False, "bpw": 4.5, "sensitivity_tokens": 256}


def test_ort_runs_the_same_weights_as_the_torch_simulation(tiny_build):
    _, report = tiny_build(**MIXED)
    q = report["quality"]
    assert q["onnx_exact"]["runtime"] == "onnxruntime (accuracy_level 0)"
    assert_same_model(q["onnx_exact"], q["onnx_sim"], kld=0.02)
    assert_same_model(q["onnx"], q["onnx_sim"], kld=0.25)  # as shipped: int8 activations (accuracy_level 4)


def test_mixed_plan_gives_matmulnbits_of_several_configurations_and_no_float_matrices(tiny_build):
    out, report = tiny_build(**MIXED)
    model = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    layouts = {tuple(a.i for a in n.attribute if a.name in ("bits", "block_size")) + (len(n.input) > 3 and n.input[3] != "",)
               for n in nbits}
    planned = {t["ggml_type"] for t in json.loads((out / "plan-onnx.json").read_text())["tensors"]}
    assert len(layouts) >= 2 and len(planned) >= 2, (layouts, planned)  # the budget binds: a real mix
    assert not [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    scales = {n.input[2] for n in model.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    genai = json.loads((out / "onnx" / "genai_config.json").read_text())
    hidden = genai["model"]["decoder"]["hidden_size"]
    # the folder holds the context the plan budgeted: rotary rows, and the KV cache genai allocates
    context = min(max(report["budget"]["ctx"], report["quality"]["onnx"]["ctx"]), TINY["max_position_embeddings"])
    assert genai["search"]["max_length"] == genai["model"]["context_length"] == context
    for init in model.graph.initializer:  # besides block scales and the rotary tables: norms only
        if init.data_type == TensorProto.FLOAT and init.name not in scales | {"cos_cache", "sin_cache"}:
            assert int(np.prod(init.dims)) <= hidden, init.name


ONNX_ONLY = {"formats": "onnx", "bpw": 4.5, "method": "gptq"}


def test_an_onnx_build_has_its_own_plan_in_ort_grids_within_the_budget_and_no_gguf(tiny_build):
    out, report = tiny_build(**ONNX_ONLY)
    assert not (out / "model.gguf").exists() and not (out / "plan.json").exists()
    plan = json.loads((out / "plan-onnx.json").read_text())
    assert {t["ggml_type"].split("_")[0] for t in plan["tensors"]} <= {"MNB4", "MNB8"}
    folder = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    assert folder <= plan["budget"]["max_file_bytes"]  # measured on the written folder
    assert report["plans"]["onnx"]["bytes"] == pytest.approx(folder, rel=0.02)  # the plan counted what was written
    assert report["artifacts"][0]["plan"] == "plan-onnx.json" and report["plans"]["onnx"]["artifacts"] == ["onnx"]
    model = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    layouts = {tuple(a.i for a in n.attribute if a.name in ("bits", "block_size")) for n in model.graph.node
               if n.op_type == "MatMulNBits"}
    configurations = {t["ggml_type"] for t in plan["tensors"]}
    assert layouts <= {(get_type(t).bits, get_type(t).block) for t in configurations}, (layouts, configurations)
    q = report["quality"]
    assert_same_model(q["onnx_exact"], q["onnx_sim"])  # ORT at float32 activations computes the simulated grids
    assert_same_model(q["onnx"], q["onnx_sim"], kld=0.25)  # shipped: int8 activations


def test_the_plan_predicts_the_bytes_its_folder_holds(tiny_build):
    """The planner's rule on the plan, and the same rule read off the folder written from it, agree."""
    out, _ = tiny_build(**ONNX_ONLY)
    predicted = json.loads((out / "plan-onnx.json").read_text())["predicted"]
    assert predicted["runtime"] == "onnxruntime"
    from_folder = ort_budget.folder_terms(out / "onnx", load_device("host"))
    assert from_folder["weights_bytes"] == pytest.approx(predicted["weights_resident_bytes"], rel=0.01)
    assert from_folder["kv_bytes_per_token"] == predicted["terms"]["kv_bytes_per_token"]
    assert predicted["memory_bytes"] > predicted["weights_resident_bytes"] > (out / "onnx" / "model.onnx.data").stat().st_size


def test_with_both_formats_each_artifact_is_planned_for_its_runtime(tiny_build):
    out, report = tiny_build(bpw=4.5)
    gguf_plan, onnx_plan = (json.loads((out / f).read_text()) for f in ("plan.json", "plan-onnx.json"))
    assert {t["ggml_type"] for t in onnx_plan["tensors"]}.isdisjoint(t["ggml_type"] for t in gguf_plan["tensors"])
    assert [(a["format"], a["plan"]) for a in report["artifacts"]] == [("gguf", "plan.json"), ("onnx", "plan-onnx.json")]
    assert 'id="onnx-bitmap"' in (out / "report.html").read_text()  # the page shows both plans
    for a in report["artifacts"]:  # both within the same caps (--bpw counts tensors), measured on what was written
        assert a["bytes"] <= report["plans"][a["format"]]["max_bytes"] and a["bpw"] <= 4.5, a
    assert report["plans"]["onnx"]["max_bytes"] - report["plans"]["gguf"]["max_bytes"] == (
        onnx_plan["file_overhead"] - gguf_plan["file_overhead"])  # the caps differ by the artifacts' overheads only


def test_below_orts_smallest_grid_a_build_writes_the_gguf_alone_and_says_why(tiny_build):
    out, report = tiny_build(bpw=3.5, formats=None, parity=False)
    assert [a["format"] for a in report["artifacts"]] == ["gguf"] and not (out / "onnx").exists()
    assert report["notes"] == ["no ONNX folder: ONNX Runtime's smallest grids (4-bit blocks, 4.1-4.6 bpw) do not fit this budget"]
    with pytest.raises(EdgequantError, match="smallest ONNX mix"):  # asked for: one line
        tiny_build(bpw=3.5, formats="gguf,onnx", parity=False)


def test_corrupt_or_truncated_onnx_is_one_line_error(tiny_build, tmp_path):
    out, _ = tiny_build(**MIXED)
    bad = tmp_path / "bad"
    bad.mkdir()
    graph = (out / "onnx" / "model.onnx").read_bytes()
    data = (out / "onnx" / "model.onnx.data").read_bytes()
    cases = {"truncated weights": (graph, data[: len(data) // 2]), "truncated graph": (graph[: len(graph) // 3], data)}
    for case, (g, d) in cases.items():
        (bad / "model.onnx").write_bytes(g)
        (bad / "model.onnx.data").write_bytes(d)
        assert_clean_failure(in_process("eval", bad, "--eval-tokens", "512"), "model.onnx")


def _exported(loaded, types: dict, out, context: int = 48):
    """``loaded`` rounded to ``types`` (matrix name suffix -> ggml type; "" for every other matrix),
    written as a GGUF and exported to ONNX for ``context`` tokens; returns the GGUF, 40 token ids,
    and the logits transformers computes from the GGUF on them."""
    import torch

    from edgequant.calibration import Calibration
    from edgequant.methods import rtn
    from edgequant.models import load_gguf
    from edgequant.pipeline import matrices_of
    from edgequant.planning import uniform
    from exporters.gguf import write_gguf
    from exporters.onnx import export_onnx

    out.mkdir()
    plan = uniform(*matrices_of(loaded), types[""])
    plan.types.update({name: t for name in plan.types for suffix, t in types.items() if suffix and name.endswith(suffix)})
    encoded = rtn.quantize(loaded, plan, Calibration(np.zeros((0, 512), np.int64), {}))
    write_gguf(out / "model.gguf", loaded, encoded, "rtn")
    export_onnx(out / "model.gguf", out / "onnx", loaded.tokenizer, context=context)
    ids = np.random.default_rng(0).integers(0, loaded.config.vocab_size, 40)
    with torch.no_grad():
        expected = load_gguf(out / "model.gguf").model(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert expected.std() > 0.5  # logits with real spread, not a near-uniform random model
    return out / "model.gguf", ids, expected


def _ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_architecture_runs_in_ort_as_its_gguf_does_in_transformers(model_type, tiny_model, tmp_path):
    from edgequant.models import load_model
    from exporters.onnx import export_onnx

    # larger random weights: logits with a real spread, so that small differences show
    loaded = load_model(tiny_model(model_type, initializer_range=0.2))
    gguf_file, ids, expected = _exported(loaded, {"": "Q8_0"}, tmp_path / "out", context=48)  # room for 40 tokens
    folder = gguf_file.parent / "onnx"
    exact = OrtDecoder(folder, accuracy_level=0)
    np.testing.assert_allclose(exact(ids), expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
    # as shipped (int8 activations: 2-7% of the logits' range here), through the kernels' packed path,
    # which must apply qwen2's bias too (without it: 84%)
    shipped = OrtDecoder(folder)(ids)
    np.testing.assert_allclose(shipped, expected, atol=0.15 * np.abs(expected).max(), rtol=0)
    # the KV cache: one token at a time gives what the whole window gives
    logits, cache = exact.step(ids[:30], exact.empty_cache())
    for t in range(30, 40):
        logits, cache = exact.step(ids[t : t + 1], cache)
        np.testing.assert_allclose(logits[0], expected[t], atol=1e-3 * np.abs(expected).max(), rtol=0)
    with pytest.raises(EdgequantError, match="holds 48 positions"):  # past the context it was built for
        exact.step(ids[:9], cache)
    assert export_onnx(gguf_file, tmp_path / "again")["mapping"]["Q8_0"]["max_abs_error"] == 0.0
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert [list(i.dims) for i in graph.initializer if i.name == "cos_cache"] == [[48, head_dim(loaded.config) // 2]]
    assert json.loads((folder / "genai_config.json").read_text())["search"]["max_length"] == 48
    # fused as ONNX Runtime runs fastest: q/k/v one node per block, gate/up one, each residual add inside a norm
    ops, blocks = _ops(folder), loaded.config.num_hidden_layers
    assert ops["MatMulNBits"] == 4 * blocks + 1  # qkv, o, gate/up, down; the head
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * blocks and ops["Add"] == 0


def test_matrices_of_different_layouts_keep_a_node_each_and_compute_the_same(tiny_model, tmp_path):
    """q in 8 bits beside 4-bit k/v, gate in 8 bits (Q5_0) beside a 4-bit up: no fusion, qwen2's
    biases on each node, and the same logits. (Zero points, which only the affine types' inexact
    conversion makes, are checked against the simulation by the mixed build above.)"""
    from edgequant.models import load_model

    loaded = load_model(tiny_model("qwen2", initializer_range=0.2))
    types = {"": "Q4_0", "attn_q.weight": "Q8_0", "ffn_gate.weight": "Q5_0"}
    gguf_file, ids, expected = _exported(loaded, types, tmp_path / "out")
    folder = gguf_file.parent / "onnx"
    np.testing.assert_allclose(OrtDecoder(folder, accuracy_level=0)(ids), expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
    ops, blocks = _ops(folder), loaded.config.num_hidden_layers
    assert ops["MatMulNBits"] == 7 * blocks + 1 and ops["Split"] == 0  # q, k, v, o, gate, up, down; the head

"""``--method joint``: what to prune and how many bits to keep, chosen in one search against the
model's output, shipped as a per-block GGUF (llama.cpp's ``deci``) and an ONNX graph of the
smaller matrices. The search runs on a tiny random llama; what it measures on the default model
(2.5 and 3.0 bpw, the Q2_K size) is in docs/benchmarks.md (``bench/ladder.py --bpw-points``)."""

import pytest

from edgequant.methods.joint import Option, _pareto, _type_costs, widths
from edgequant.adapters import BlockShape
from edgequant.models import block_shapes, load_model, read_gguf
from edgequant.pipeline import matrices_of
from edgequant.planning import Matrix, smallest_bytes
from edgequant.sensitivity import Entry, Part, Sensitivity, split_parts
from tests.helpers import assert_same_model

# A tiny llama of 4 blocks with FFN 1024 (widths 1024/768/512/256 to choose from) and a 4096 x 256
# embedding: at 1.7 bpw the blocks must lose some of their bytes.
MODEL = {"num_hidden_layers": 4, "intermediate_size": 1024}
BPW = 1.7  # below its smallest unpruned mix (1.80 bpw: the blocks at IQ1_S, the embedding at Q2_K)


def test_ffn_widths_step_by_256_so_that_down_rows_still_take_k_quants():
    assert widths(1536) == [1536, 1280, 1024, 768, 512, 256]
    assert widths(1000) == [1000, 768, 512, 256]


def test_an_option_is_kept_only_when_every_smaller_one_costs_more():
    shape = BlockShape(1536, 9, 3)
    removed = Option(True, kl=0.9)
    small = Option(False, shape, "Q2_K", "Q2_K", bytes=100, kl=0.2)
    worse_and_larger = Option(False, shape, "Q3_K", "Q3_K", bytes=150, kl=0.3)
    large = Option(False, shape, "Q8_0", "Q8_0", bytes=300, kl=0.01)
    assert _pareto([large, worse_and_larger, small, removed]) == [removed, small, large]


def test_the_types_cost_what_qublasts_table_measured_for_the_part():
    parts = split_parts([Matrix("blk.0.attn_q.weight", 576, 576), Matrix("blk.0.ffn_down.weight", 576, 1536),
                         Matrix("token_embd.weight", 49152, 576)])
    entries = [Entry(p.key, Part.label(t), t, p.nbytes(t), kl=1.0 / p.nbytes(t)) for p in parts for t in p.options()]
    costs = _type_costs(parts, Sensitivity(entries, 512))
    # 576-wide rows take no K- or i-quant: IQ1_S ... Q3_K and IQ4_XS all stand in as IQ4_NL, so one
    # entry (named by the first candidate) costs them all
    assert costs[0]["attn"]["IQ1_S"] == 1.0 / parts[0].nbytes({"blk.0.attn_q.weight": "IQ4_NL"})
    assert "Q3_K" not in costs[0]["attn"] and len(costs[0]["attn"]) == 4  # IQ4_NL, Q4_0, Q5_0, Q8_0
    assert costs[0]["ffn"]["Q3_K"] == 1.0 / parts[1].nbytes({"blk.0.ffn_down.weight": "Q3_K"})
    assert len(costs[0]["ffn"]) == 15 and -1 not in costs  # 1536-wide rows take every candidate


@pytest.fixture(scope="module")
def joint_build(tiny_build):
    return tiny_build(config=MODEL, method="joint", bpw=BPW, calib_tokens=2048)


def test_a_size_no_unpruned_mix_reaches_is_met_by_pruning(joint_build, tiny_model):
    _, report = joint_build
    unpruned = load_model(tiny_model(**MODEL))
    params = sum(p.numel() for p in unpruned.model.parameters())
    tensor_bytes = report["artifacts"][0]["tensor_bytes"]
    assert tensor_bytes * 8 / params <= BPW
    assert tensor_bytes < smallest_bytes(*matrices_of(unpruned))
    pruning = report["pruning"]
    assert pruning["removed"] or pruning["ffn_channels_kept"] or pruning["kv_groups_kept"]
    search = pruning["search"]
    assert search["seconds"] > 0 and search["measurements"] > 2 * unpruned.config.num_hidden_layers
    assert search["planned_bytes"] <= tensor_bytes + 4096  # the plan the build carried out is the search's


def test_llama_cpp_and_onnx_runtime_compute_the_searched_model_as_torch_does(joint_build):
    _, report = joint_build
    q = report["quality"]
    assert_same_model(q["gguf"], q["gguf_sim"])
    assert_same_model(q["onnx_exact"], q["onnx_sim"])  # the ONNX folder's own plan, on the same pruned model


def test_the_searched_gguf_sizes_blocks_one_by_one_and_loads_back(joint_build):
    out, report = joint_build
    reader = read_gguf(out / "model.gguf")
    blocks = report["pruning"]["blocks"]
    arch = reader.fields["general.architecture"].contents()
    unpruned = report["pruning"]["unpruned"]
    assert arch == ("deci" if any(b != unpruned for b in blocks) else "llama")  # llama: every block as the config says
    ffn = reader.fields[f"{arch}.feed_forward_length"].contents()
    assert (list(ffn) if arch == "deci" else [ffn] * len(blocks)) == [b["ffn"] for b in blocks]
    assert all(b["ffn"] % 256 == 0 for b in blocks)  # every kept width still takes K-quants in ffn_down
    assert [vars(s) for s in block_shapes(load_model(out / "model.gguf").model)] == report["pruning"]["blocks"]


def test_the_report_shows_the_pruning_beside_the_bit_map_and_the_search_time(joint_build):
    out, report = joint_build
    page = (out / "report.html").read_text()
    assert page.index('id="bitmap"') < page.index('id="pruning"') < page.index('id="size-quality"')
    assert f"Chosen by the joint search in {report['pruning']['search']['seconds']:.0f} s" in page

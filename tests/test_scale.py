"""A build's memory does not grow with the model's depth: the decoder blocks wait on disk and are
worked on one at a time (edgequant.blocks), the reference is walked block by block, and the
runtimes are scored one at a time against its stored log-probabilities."""

import json

from tests.helpers import edgequant, succeeded

WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 2}


def test_peak_memory_does_not_grow_with_depth(tiny_model, tmp_path):
    peaks, block_bytes = {}, None
    for depth in (4, 16):
        model = tiny_model("llama", num_hidden_layers=depth, **WIDE)
        out = tmp_path / f"depth-{depth}"
        succeeded(edgequant("build", "--model", model, "--out", out, "--method", "rtn", "--type", "Q4_K", "--calib-tokens", 512,
                            "--eval-tokens", 512, "--formats", "gguf", "--quiet"))
        report = json.loads((out / "report.json").read_text())
        peaks[depth] = report["build"]["peak_rss_mb"] * 1e6
        block_bytes = 4 * sum(t["rows"] * t["cols"] for t in json.loads((out / "plan.json").read_text())["tensors"]
                              if t["name"].startswith("blk.0."))
    assert abs(peaks[16] - peaks[4]) < 3 * block_bytes, (peaks, block_bytes)

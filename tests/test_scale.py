"""A build's memory does not grow with the model's depth: the decoder blocks wait on disk and are
worked on one at a time, the reference is walked block by block, and the runtimes are scored one
at a time against its stored log-probabilities. What the runtime holds of the shipped file itself
(llama.cpp reads the whole GGUF to evaluate it, as the device will) is the one thing that must grow,
so it is set aside: the peak is measured beyond the file's bytes."""

import json

from tests.helpers import edgequant, succeeded

WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 2}


def test_peak_memory_does_not_grow_with_depth(tiny_model, tmp_path):
    beyond_file, block_bytes = {}, None
    for depth in (4, 16):
        model = tiny_model("llama", num_hidden_layers=depth, **WIDE)
        out = tmp_path / f"depth-{depth}"
        succeeded(edgequant("build", "--model", model, "--out", out, "--method", "rtn", "--type", "Q4_K", "--calib-tokens", 512,
                            "--eval-tokens", 512, "--formats", "gguf", "--quiet"))
        report = json.loads((out / "report.json").read_text())
        beyond_file[depth] = report["build"]["peak_rss_mb"] * 2**20 - (out / "model.gguf").stat().st_size
        block_bytes = 4 * sum(t["rows"] * t["cols"] for t in json.loads((out / "plan.json").read_text())["tensors"]
                              if t["name"].startswith("blk.0."))
    assert abs(beyond_file[16] - beyond_file[4]) < 3 * block_bytes, (beyond_file, block_bytes)

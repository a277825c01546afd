"""A build's memory does not grow with the model's depth: the decoder blocks wait on disk and are
worked on one at a time, the reference is walked block by block, and the runtimes are scored one
at a time against its stored log-probabilities. What the runtime holds of the shipped file itself
(llama.cpp reads the whole GGUF to evaluate it, as the device will) is the one thing that must grow,
so it is set aside: the peak is measured beyond the file's bytes."""

import json

import numpy as np

from edgequant.codestore import CodeStore
from edgequant.ggml_quants import EncodedTensor
from edgequant.models import load_model
from tests.helpers import edgequant, succeeded

WIDE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 2}


def test_peak_memory_does_not_grow_with_depth(tiny_model, tmp_path):
    beyond_file, block_bytes = {}, None
    for depth in (3, 9):
        model = tiny_model("llama", num_hidden_layers=depth, **WIDE)
        out = tmp_path / f"depth-{depth}"
        succeeded(edgequant("build", "--model", model, "--out", out, "--method", "rtn", "--type", "Q4_K", "--calib-tokens", 512,
                            "--eval-tokens", 512, "--formats", "gguf", "--no-twin", "--quiet"))
        report = json.loads((out / "report.json").read_text())
        beyond_file[depth] = report["build"]["peak_rss_mb"] * 2**20 - (out / "model.gguf").stat().st_size
        block_bytes = 4 * sum(t["rows"] * t["cols"] for t in json.loads((out / "plan.json").read_text())["tensors"]
                              if t["name"].startswith("blk.0."))
    assert abs(beyond_file[9] - beyond_file[3]) < 3 * block_bytes, (beyond_file, block_bytes)  # whole: 6 blocks more


def _file_pages_resident() -> int:
    """Bytes of file-backed pages mapped in this process (the kernel's RssFile)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status["RssFile"].split()[0]) * 1024


def test_a_streamed_models_embedding_and_head_leave_memory_when_a_block_is_left(tiny_model):
    """Llama-3.1-8B's untied embedding and head are 2.1 GB each in float32: a block's own work
    (GPTQ's Hessians) must not have them beside it."""
    loaded = load_model(tiny_model("llama", hidden_size=512, tie_word_embeddings=False), streamed=True)
    embedding, head = loaded.adapter.embedding(loaded.model).weight, loaded.adapter.head(loaded.model).weight
    assert embedding.sum() != 0 and head.sum() != 0  # read, so resident
    touched = _file_pages_resident()
    with loaded.block(0):
        pass
    assert touched - _file_pages_resident() > 0.9 * (embedding.nbytes + head.nbytes)
    assert embedding.sum() != 0 and head.sum() != 0  # and still there, read back from the file


def test_the_rounded_model_waits_on_disk_until_written(tmp_path):
    codes = np.arange(96, dtype=np.uint8).reshape(2, 48)
    store = CodeStore(tmp_path / "codes")
    store["blk.0.ffn_down.weight"] = EncodedTensor("Q8_0", codes)
    assert [f.stat().st_size for f in store.folder.iterdir()] == [codes.nbytes]
    tensor = store["blk.0.ffn_down.weight"]
    assert tensor.ggml_type == "Q8_0" and (np.asarray(tensor.data) == codes).all()
    assert "blk.0.ffn_down.weight" in store and "output.weight" not in store and len(store) == 1
    store.close()
    assert not store.folder.exists()

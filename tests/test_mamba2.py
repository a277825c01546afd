"""Mamba-2 on small random models: a state-space model goes through the same pipeline as a
transformer (its in/out projections are the matrices planned and quantized), reaches llama.cpp's
mamba2 architecture in llama.cpp's layouts, and llama.cpp then computes what torch computes."""

import json

import gguf
import numpy as np
import pytest
import torch

from edgequant.errors import EdgequantError
from edgequant.models import load_model
from exporters.gguf import write_gguf
from tests.helpers import assert_runs_as_simulated, float_file_in_llama_cpp_and_torch

# widths that ggml's 256-blocks take: hidden 256, inner 512 (8 heads of 64), one group, state 64
MAMBA2 = {"hidden_size": 256, "num_hidden_layers": 2, "expand": 2, "num_heads": 8, "head_dim": 64, "state_size": 64,
          "n_groups": 1, "conv_kernel": 4}


def test_the_gguf_holds_the_ssm_tensors_in_llama_cpps_layouts(tiny_model, tmp_path):
    folder = tiny_model("mamba2", **MAMBA2)
    loaded = load_model(str(folder))
    assert [name for name, _ in loaded.matrices()] == ["token_embd.weight", "blk.0.ssm_in.weight", "blk.0.ssm_out.weight",
                                                       "blk.1.ssm_in.weight", "blk.1.ssm_out.weight"]
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    reader = gguf.GGUFReader(path)
    value = {name: field.contents() for name, field in reader.fields.items()}
    assert value["general.architecture"] == "mamba2"
    assert (value["mamba2.ssm.inner_size"], value["mamba2.ssm.state_size"], value["mamba2.ssm.time_step_rank"]) == (512, 64, 8)
    tensors = {t.name: t for t in reader.tensors}
    state = loaded.model.state_dict()
    mixer = "backbone.layers.0.mixer"
    np.testing.assert_allclose(np.asarray(tensors["blk.0.ssm_a"].data).ravel(), -np.exp(state[f"{mixer}.A_log"].numpy()), rtol=1e-6)
    assert tensors["blk.0.ssm_conv1d.weight"].data.shape == (640, 4)  # (channels, kernel), float32
    assert tensors["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ssm_norm.weight"].data.shape == (1, 512)  # one row per group
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ssm_dt.bias"].data), state[f"{mixer}.dt_bias"].numpy())


def test_llama_cpp_runs_the_float_file_as_torch_runs_the_model(tiny_model, tmp_path):
    q = float_file_in_llama_cpp_and_torch(tiny_model("mamba2", **MAMBA2), tmp_path)
    assert q["llama.cpp"].ppl == pytest.approx(q["torch"].ppl, rel=1e-4), q  # no KV cache to round
    assert q["llama.cpp"].top1 > 0.99 and q["llama.cpp"].kld < 1e-5, q


@pytest.mark.parametrize("options", [{"ggml_type": "Q8_0"}, {"method": "qublast-rtn", "bpw": 4.5, "sensitivity_tokens": 256}], ids=["Q8_0", "qublast-4.5"])
def test_a_mamba2_build_runs_in_llama_cpp_as_simulated(tiny_build, options):
    out, report = tiny_build("mamba2", config=MAMBA2, formats=None, **options)  # the default formats: GGUF alone
    assert [a["format"] for a in report["artifacts"]] == ["gguf"]
    assert_runs_as_simulated(report["quality"])
    if "bpw" in options:  # QuBLAST measured the block's projections and mixed their types
        plan = json.loads((out / "plan.json").read_text())
        assert len({t["ggml_type"] for t in plan["tensors"]}) > 1 and plan["bpw"] <= 4.5
        assert {e["part"] for e in plan["sensitivity"]["entries"]} == {"embd", "0.ssm", "1.ssm"}


def test_a_mamba2_gguf_loads_back_as_the_model_it_was_written_from(tiny_model, tmp_path):
    loaded = load_model(str(tiny_model("mamba2", **MAMBA2)))
    path = tmp_path / "model.gguf"
    write_gguf(path, loaded, None, "full precision", np.float32)
    again = load_model(str(path))  # A from -exp(A_log), the convolution and norm in their HF shapes
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_what_mamba2_cannot_do_is_one_line(tiny_model, tmp_path):
    from edgequant.pipeline import BuildOptions, build

    folder = str(tiny_model("mamba2", **MAMBA2))
    with pytest.raises(EdgequantError, match="selective-scan"):
        build(BuildOptions(model=folder, out=tmp_path / "a", formats="gguf,onnx", calib_tokens=512, eval_tokens=512))
    with pytest.raises(EdgequantError, match="rotates"):
        build(BuildOptions(model=folder, out=tmp_path / "b", method="hadamard", formats="gguf", calib_tokens=512, eval_tokens=512))
    assert list(tmp_path.iterdir()) == []
    loaded = load_model(folder)
    write_gguf(tmp_path / "model.gguf", loaded, None, "full precision", np.float32)
    from exporters.onnx import export_onnx

    with pytest.raises(EdgequantError, match="selective-scan"):  # nor from a mamba2 GGUF
        export_onnx(tmp_path / "model.gguf", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()

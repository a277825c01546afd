"""Bad input gives one line on stderr, a non-zero exit, and leaves no partial file."""

import json
import os
import subprocess
import sys

import pytest

from edgequant.assets import default_gguf, default_model_dir


def edgequant(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_failure(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgequant: error:")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def build(model, out):
    return edgequant("build", "--model", model, "--out", out, "--quiet", "--eval-tokens", "512", "--calib-tokens", "512")


def test_missing_model_path(tmp_path):
    result = build(tmp_path / "nope", tmp_path / "out")
    assert_clean_failure(result, "not found")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    assert_clean_failure(build(tmp_path / "model", tmp_path / "out"), "config.json")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (model / "model.safetensors").write_bytes(b"")
    result = build(model, tmp_path / "out")
    assert_clean_failure(result, "gpt_neox", "llama", "qwen3")


def test_truncated_gguf(tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(default_gguf(), "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_clean_failure(build(truncated, tmp_path / "out"), "cut.gguf")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_clean_failure(build("default", locked / "out"), "cannot write")


def test_out_that_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert_clean_failure(build("default", target), "not a folder")
    assert target.read_text() == "not a folder"


def test_out_on_a_read_only_filesystem(tmp_path):
    # /proc is read-only for everybody, root included
    assert_clean_failure(build("default", "/proc/edgequant-out"), "/proc")


def test_unknown_type_and_impossible_bpw(tmp_path):
    default_model_dir()  # make sure the model exists, so the failure is the option's
    assert_clean_failure(edgequant("build", "--type", "Q7_K", "--out", tmp_path / "o", "-q"), "Q7_K")
    assert_clean_failure(edgequant("build", "--bpw", "2", "--out", tmp_path / "o", "-q"), "smallest mix")
    assert not (tmp_path / "o").exists()


def test_unknown_format(tmp_path):
    assert_clean_failure(edgequant("build", "--formats", "gguf,tflite", "--out", tmp_path / "o", "-q"), "tflite")
    assert not (tmp_path / "o").exists()


def test_eval_and_export_of_missing_or_truncated_files(tmp_path):
    truncated = tmp_path / "cut.gguf"
    with open(default_gguf(), "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_clean_failure(edgequant("eval", tmp_path / "nope.gguf"), "not found")
    assert_clean_failure(edgequant("eval", tmp_path / "nope-folder/"), "not found")
    assert_clean_failure(edgequant("eval", truncated), "cut.gguf")
    assert_clean_failure(edgequant("export-onnx", truncated, "--out", tmp_path / "onnx"), "cut.gguf")
    assert not (tmp_path / "onnx").exists()

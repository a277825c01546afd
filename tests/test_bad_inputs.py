"""The bad-input matrix: every command, given bad input or hit by a fault, prints one line on
stderr, exits non-zero and leaves no partial artifact; a previous good build survives.

Each case's message is listed at the end of the test run ("bad-input matrix")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgequant.assets import default_gguf, default_model_dir

pytestmark = pytest.mark.slow  # some cases need the README build folder


def edgequant(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)


def one_line_error(result) -> str:
    """The single stderr line of a clean failure (and nothing else)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgequant: error: ")
    return lines[0]


def assert_clean_failure(result, *words) -> str:
    """A clean failure whose one line holds every one of ``words``; returns the line."""
    message = one_line_error(result)
    for word in words:
        assert word in message, message
    return message


def quick_build(model, out, *extra):
    return ["build", "--model", model, "--out", out, "--quiet", "--method", "rtn", "--eval-tokens", "512",
            "--calib-tokens", "512", *extra]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, readme_build):
    """Broken copies of real inputs, made once."""
    root = tmp_path_factory.mktemp("bad")
    model = default_model_dir()
    f = SimpleNamespace(root=root, build=readme_build)
    f.cut_gguf = root / "cut.gguf"
    with open(default_gguf(), "rb") as src:
        f.cut_gguf.write_bytes(src.read(5_000_000))
    f.junk_gguf = root / "junk.gguf"
    f.junk_gguf.write_bytes(os.urandom(4096))
    f.no_config = _folder(root / "no-config")
    f.bad_json = _folder(root / "bad-json", {"config.json": "{not json"})
    f.neox = _folder(root / "neox", {"config.json": json.dumps({"model_type": "gpt_neox"}), "model.safetensors": ""})
    f.cut_weights = _model_copy(model, root / "cut-weights")
    with open(model / "model.safetensors", "rb") as src:
        (f.cut_weights / "model.safetensors").write_bytes(src.read(1_000_000))
    f.wrong_tokenizer = _model_copy(model, root / "wrong-tokenizer", link_weights=True)
    _small_tokenizer(f.wrong_tokenizer)
    f.bad_profile = root / "board.toml"
    f.bad_profile.write_text("[device]\nname = 'board'\nram_gb = 'lots'\n")
    f.junk_onnx = shutil.copytree(readme_build / "onnx", root / "junk-onnx")
    (f.junk_onnx / "model.onnx").write_bytes(os.urandom(2048))
    f.cut_onnx = shutil.copytree(readme_build / "onnx", root / "cut-onnx")
    os.truncate(f.cut_onnx / "model.onnx.data", 1_000_000)
    f.corrupt_build = root / "corrupt-build"
    shutil.copytree(readme_build, f.corrupt_build)
    os.truncate(f.corrupt_build / "model.gguf", 10_000_000)
    f.not_json = root / "ladder.json"
    f.not_json.write_text("rows: none")
    f.a_file = root / "a-file"
    f.a_file.write_text("not a folder")
    return f


def _folder(path: Path, files: dict | None = None) -> Path:
    path.mkdir()
    for name, text in (files or {}).items():
        (path / name).write_text(text)
    return path


def _model_copy(model: Path, path: Path, link_weights: bool = False) -> Path:
    shutil.copytree(model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    if link_weights:
        (path / "model.safetensors").symlink_to(model / "model.safetensors")
    return path


def _small_tokenizer(folder: Path) -> None:
    """Replace the model's tokenizer with a 100-token one (some other model's, as far as the weights know)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(99)} | {"<unk>": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


# case id -> (argument list made from the `bad` files, words the message must hold)
MATRIX = {
    "build: model path does not exist": (lambda f: quick_build(f.root / "nope", f.root / "o"), ["not found"]),
    "build: folder without config.json": (lambda f: quick_build(f.no_config, f.root / "o"), ["config.json"]),
    "build: config.json is not JSON": (lambda f: quick_build(f.bad_json, f.root / "o"), ["config.json", "JSON"]),
    "build: unsupported architecture": (lambda f: quick_build(f.neox, f.root / "o"), ["gpt_neox", "llama", "qwen3"]),
    "build: truncated safetensors": (lambda f: quick_build(f.cut_weights, f.root / "o"), ["cut-weights"]),
    "build: wrong tokenizer": (lambda f: quick_build(f.wrong_tokenizer, f.root / "o"), ["tokenizer", "100", "49152"]),
    "build: truncated GGUF": (lambda f: quick_build(f.cut_gguf, f.root / "o"), ["cut.gguf"]),
    "build: not a GGUF file": (lambda f: quick_build(f.junk_gguf, f.root / "o"), ["junk.gguf"]),
    "eval: unknown simulated method": (lambda f: ["eval", "--wbits", "4", "--abits", "4", "--method", "omniquant"], ["omniquant", "ruquant"]),
    "eval: one-bit activations": (lambda f: ["eval", "--wbits", "4", "--abits", "1"], ["2 to 8 bits"]),
    "eval: energy share out of range": (lambda f: ["eval", "--wbits", "4", "--abits", "4", "--method", "specquant", "--spec-energy", "1.5"], ["--spec-energy"]),
    "build: unknown device": (lambda f: quick_build("default", f.root / "o", "--device", "pi-zero"), ["pi-zero", "known"]),
    "build: malformed device profile": (lambda f: quick_build("default", f.root / "o", "--device", f.bad_profile), ["board.toml"]),
    "build: budget below the smallest file": (lambda f: quick_build("default", f.root / "o", "--budget-mb", "20"), ["MB"]),
    "build: bits per weight too low": (lambda f: quick_build("default", f.root / "o", "--bpw", "2"), ["smallest mix"]),
    "build: unknown ggml type": (lambda f: quick_build("default", f.root / "o", "--type", "Q7_K"), ["Q7_K"]),
    "build: joint search given a uniform type": (lambda f: quick_build("default", f.root / "o", "--method", "joint", "--type", "Q4_0"),
                                                ["joint", "itself"]),
    "plan: joint search below what pruning can reach": (lambda f: ["plan", "--method", "joint", "--budget-mb", "10", "-q"],
                                                        ["pruning can reach"]),
    "build: unknown method": (lambda f: quick_build("default", f.root / "o", "--method", "magic"), ["magic"]),
    "build: unknown format": (lambda f: quick_build("default", f.root / "o", "--formats", "gguf,tflite"), ["tflite"]),
    "build: --out is a file": (lambda f: quick_build("default", f.a_file), ["not a folder"]),
    "build: --out on a read-only filesystem": (lambda f: quick_build("default", "/proc/edgequant-out"), ["/proc"]),
    "plan: unknown device": (lambda f: ["plan", "--device", "pi-zero", "-q"], ["pi-zero"]),
    "plan: budget below the smallest file": (lambda f: ["plan", "--budget-mb", "20", "-q"], ["MB"]),
    "eval: file does not exist": (lambda f: ["eval", f.root / "nope.gguf", "-q"], ["not found"]),
    "eval: truncated GGUF": (lambda f: ["eval", f.cut_gguf, "-q"], ["cut.gguf"]),
    "eval: not a GGUF file": (lambda f: ["eval", f.junk_gguf, "-q"], ["junk.gguf"]),
    "eval: corrupt ONNX graph": (lambda f: ["eval", f.junk_onnx, "-q"], ["junk-onnx"]),
    "eval: truncated ONNX weights": (lambda f: ["eval", f.cut_onnx, "-q"], ["model.onnx.data"]),
    "eval: reference model does not exist": (lambda f: ["eval", f.build / "model.gguf", "-r", f.root / "nope", "-q"], ["not found"]),
    "export-onnx: truncated GGUF": (lambda f: ["export-onnx", f.cut_gguf, "--out", f.root / "o"], ["cut.gguf"]),
    "bench: corrupt GGUF in the build": (lambda f: ["bench", f.corrupt_build, "-q"], ["model.gguf", "manifest"]),
    "bench: not a build folder": (lambda f: ["bench", f.root, "-q"], ["report.json"]),
    "bench: unknown runtime": (lambda f: ["bench", f.build, "--runtime", "tflite", "-q"], ["tflite"]),
    "deploy: folder does not exist": (lambda f: ["deploy", f.root / "nope", "--to", "ssh://127.0.0.1/x"], ["not found"]),
    "deploy: unknown transport": (lambda f: ["deploy", f.build, "--to", "ftp://board/x"], ["ftp"]),
    "deploy: unreachable device": (lambda f: ["deploy", f.build, "--to", "ssh://127.0.0.1:9/x", "-q"], ["refused"]),
    "verify: folder without manifest": (lambda f: ["verify", f.root], ["manifest.json"]),
    "verify: corrupt build": (lambda f: ["verify", f.corrupt_build], ["model.gguf", "changed"]),
    "report: not a build folder": (lambda f: ["report", f.root], ["report.json"]),
    "report: ladder file is not JSON": (lambda f: ["report", f.build, "--ladder", f.not_json], ["ladder.json", "JSON"]),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input(case, bad, bad_input_messages):
    make_args, words = MATRIX[case]
    before = sorted(p.name for p in bad.root.iterdir())
    result = edgequant(*make_args(bad))
    message = one_line_error(result)
    bad_input_messages[case] = message.removeprefix("edgequant: error: ")
    for word in words:
        assert word in message
    assert sorted(p.name for p in bad.root.iterdir()) == before  # nothing new, not even a hidden staging folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_as_user(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write" in one_line_error(edgequant(*quick_build("default", locked / "out")))


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_out_on_a_full_disk_leaves_nothing_behind(small_disk, bad_input_messages):
    message = one_line_error(edgequant(*quick_build("default", small_disk / "out", "--formats", "gguf")))
    bad_input_messages["build: --out on a full disk (40 MB tmpfs)"] = message.removeprefix("edgequant: error: ")
    assert "no space left" in message
    assert list(small_disk.iterdir()) == []


def test_help_lists_every_command_and_every_option_is_explained():
    top = edgequant("--help").stdout
    commands = ["build", "plan", "eval", "export-onnx", "deploy", "verify", "bench", "report", "devices", "fetch-default"]
    for command in commands:
        assert f" {command} " in top
        text = edgequant(command, "--help")
        assert text.returncode == 0
        options = [line for line in text.stdout.splitlines() if line.strip().startswith(("│ --", "│ *", "│   --"))]
        for line in options:  # every option line carries words after its name and type
            assert len(line.strip("│ ").split()) >= 3, f"{command}: {line}"


def test_no_pickle_is_ever_loaded():
    """Weights come from safetensors or GGUF only: no pickle, no torch.load without weights_only."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("edgequant/**/*.py"), *root.glob("exporters/**/*.py"), *root.glob("runtimes/**/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text and "np.load(" not in text, path
        for line in text.splitlines():
            assert "torch.load(" not in line or "weights_only=True" in line, f"{path}: {line}"
            assert "from_pretrained(" not in line or "Tokenizer" in line or "use_safetensors=True" in line, f"{path}: {line}"


# ---------------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("step, after_line, delay", [
    ("quantization", "calibrate ", 2.0),
    ("ONNX export", "export GGUF ", 0.3),
], ids=["during-quantization", "during-export"])
def test_ctrl_c_keeps_the_previous_build(step, after_line, delay, readme_build, tmp_path, bad_input_messages):
    out = tmp_path / "out"
    shutil.copytree(readme_build, out)
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    cmd = [sys.executable, "-m", "edgequant.cli", *quick_build("default", out, "--formats", "gguf,onnx")]
    cmd.remove("--quiet")  # the bars' lines on stderr say which step is running
    # A suite started in the background (``cmd &``) inherits an ignored SIGINT, and Python then
    # keeps ignoring it; the build should meet Ctrl-C as a terminal user's process does.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 600
    while not any(line.startswith(after_line) for line in lines) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    reader.join()
    finished = [line.split("━")[0].strip() for line in lines if "━" in line]
    next_step = {"quantization": "quantize (rtn)", "ONNX export": "export ONNX"}[step]
    assert next_step not in finished, f"the interrupt came after {step}: {finished}"
    error = lines[-1].strip()
    assert error == "edgequant: error: interrupted; nothing was written" and not any("Traceback" in l for l in lines)
    bad_input_messages[f"build: Ctrl-C during {step}"] = error.removeprefix("edgequant: error: ")
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    assert edgequant("verify", out).returncode == 0

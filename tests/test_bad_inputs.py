"""The bad-input matrix: every command, given bad input or hit by a fault, prints one line on
stderr, exits non-zero and leaves no partial artifact; a previous good build survives.

Each case's message is listed at the end of the test run ("bad-input matrix"). A case that reads
a model or a text runs in its own process, three at a time; the rest call the command line's entry
point in the test's process, which spares each a few seconds of importing torch."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgequant.assets import default_gguf
from tests.helpers import TINY, edgequant, in_process, one_line_error


def quick_build(model, out, *extra):
    return ["build", "--model", model, "--out", out, "--quiet", "--method", "rtn", "--eval-tokens", "512",
            "--calib-tokens", "512", *extra]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model, tiny_build):
    """Broken copies of real inputs, made once: a tiny model's folder and build, the default GGUF."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_model()
    build, _ = tiny_build(ggml_type="Q8_0")
    f = SimpleNamespace(root=root, model=model, build=build)
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
    f.missing_shard = _sharded_copy(model, root / "missing-shard")
    (f.missing_shard / "model-00002-of-00002.safetensors").unlink()
    f.huge = _folder(root / "huge", {"config.json": json.dumps(HUGE), "model.safetensors": ""})
    f.wrong_tokenizer = _model_copy(model, root / "wrong-tokenizer", link_weights=True)
    _small_tokenizer(f.wrong_tokenizer)
    f.bad_profile = root / "board.toml"
    f.bad_profile.write_text("[device]\nname = 'board'\nram_gb = 'lots'\n")
    f.junk_onnx = shutil.copytree(build / "onnx", root / "junk-onnx")
    (f.junk_onnx / "model.onnx").write_bytes(os.urandom(2048))
    f.cut_onnx = shutil.copytree(build / "onnx", root / "cut-onnx")
    os.truncate(f.cut_onnx / "model.onnx.data", 1_000_000)
    f.corrupt_build = root / "corrupt-build"
    shutil.copytree(build, f.corrupt_build)
    os.truncate(f.corrupt_build / "model.gguf", 1_000_000)
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


HUGE = {"model_type": "llama", "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 4,
        "num_attention_heads": 512, "num_key_value_heads": 512, "vocab_size": 4_000_000}  # 3 TB in float32


def _sharded_copy(model: Path, path: Path) -> Path:
    """The model's folder with its weights in two shards and the index that lists them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(path / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _small_tokenizer(folder: Path) -> None:
    """Replace the model's tokenizer with a 100-token one (some other model's, as far as the weights know)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(99)} | {"<unk>": 99}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


# case id -> (argument list made from the `bad` files and the case's own --out, words the message must hold)
MATRIX = {
    "build: model path does not exist": (lambda f, o: quick_build(f.root / "nope", o), ["not found"]),
    "build: folder without config.json": (lambda f, o: quick_build(f.no_config, o), ["config.json"]),
    "build: config.json is not JSON": (lambda f, o: quick_build(f.bad_json, o), ["config.json", "JSON"]),
    "build: unsupported architecture": (lambda f, o: quick_build(f.neox, o), ["gpt_neox", "llama", "qwen3"]),
    "build: truncated safetensors": (lambda f, o: quick_build(f.cut_weights, o), ["cut-weights"]),
    "build: wrong tokenizer": (lambda f, o: quick_build(f.wrong_tokenizer, o), ["tokenizer", "100", str(TINY["vocab_size"])]),
    "build: sharded folder missing a shard": (lambda f, o: quick_build(f.missing_shard, o),
                                              ["model-00002-of-00002.safetensors"]),
    "build: model too large for this machine": (lambda f, o: quick_build(f.huge, o), ["GB", "available"]),
    "build: truncated GGUF": (lambda f, o: quick_build(f.cut_gguf, o), ["cut.gguf"]),
    "build: not a GGUF file": (lambda f, o: quick_build(f.junk_gguf, o), ["junk.gguf"]),
    "build: unknown device": (lambda f, o: quick_build(f.model, o, "--device", "pi-zero"), ["pi-zero", "known"]),
    "build: malformed device profile": (lambda f, o: quick_build(f.model, o, "--device", f.bad_profile), ["board.toml"]),
    "build: budget below the smallest file": (lambda f, o: quick_build(f.model, o, "--budget-mb", "0.5"), ["MB"]),
    "build: bits per weight too low": (lambda f, o: quick_build(f.model, o, "--bpw", "1.5"), ["smallest mix"]),
    "build: unknown ggml type": (lambda f, o: quick_build(f.model, o, "--type", "Q7_K"), ["Q7_K"]),
    "build: joint search given a uniform type": (lambda f, o: quick_build(f.model, o, "--method", "joint", "--type", "Q4_0"),
                                                ["joint", "itself"]),
    "build: unknown method": (lambda f, o: quick_build(f.model, o, "--method", "magic"), ["magic"]),
    "build: unknown format": (lambda f, o: quick_build(f.model, o, "--formats", "gguf,tflite"), ["tflite"]),
    "build: negative evaluation tokens": (lambda f, o: quick_build(f.model, o, "--eval-tokens", "-5"), ["--eval-tokens", ">= 1"]),
    "build: zero budget": (lambda f, o: quick_build(f.model, o, "--budget-mb", "0"), ["--budget-mb", "> 0"]),
    "build: bits per weight above 32": (lambda f, o: quick_build(f.model, o, "--bpw", "40"), ["--bpw", "<= 32"]),
    "build: one-token evaluation window": (lambda f, o: quick_build(f.model, o, "--eval-ctx", "1"), ["--eval-ctx"]),
    "build: negative speed floor": (lambda f, o: quick_build(f.model, o, "--min-tok-s", "-1"), ["--min-tok-s"]),
    "build: smoothing strength above 1": (lambda f, o: quick_build(f.model, o, "--smooth", "1.5"), ["--smooth"]),
    "build: --out is a file": (lambda f, o: quick_build(f.model, f.a_file), ["not a folder"]),
    "build: --out on a read-only filesystem": (lambda f, o: quick_build(f.model, "/proc/edgequant-out"), ["/proc"]),
    "plan: unknown device": (lambda f, o: ["plan", "--model", f.model, "--device", "pi-zero", "-q"], ["pi-zero"]),
    "plan: budget below the smallest file": (lambda f, o: ["plan", "--model", f.model, "--budget-mb", "0.5", "-q"], ["MB"]),
    "plan: zero calibration tokens": (lambda f, o: ["plan", "--calib-tokens", "0", "-q"], ["--calib-tokens"]),
    "plan: sensitivity on 8 tokens": (lambda f, o: ["plan", "--sensitivity-tokens", "8", "-q"], ["--sensitivity-tokens", ">= 16"]),
    "plan: joint search below what pruning can reach": (lambda f, o: ["plan", "--model", f.model, "--method", "joint",
                                                                      "--budget-mb", "0.2", "--calib-tokens", "512", "-q"],
                                                        ["pruning can reach"]),
    "eval: unknown simulated method": (lambda f, o: ["eval", "--wbits", "4", "--abits", "4", "--method", "omniquant"], ["omniquant", "ruquant"]),
    "eval: one-bit activations": (lambda f, o: ["eval", "--wbits", "4", "--abits", "1"], ["2 to 8 bits"]),
    "eval: energy share out of range": (lambda f, o: ["eval", "--wbits", "4", "--abits", "4", "--method", "specquant", "--spec-energy", "1.5"], ["--spec-energy"]),
    "eval: file does not exist": (lambda f, o: ["eval", f.root / "nope.gguf", "-q"], ["not found"]),
    "eval: truncated GGUF": (lambda f, o: ["eval", f.cut_gguf, "-q"], ["cut.gguf"]),
    "eval: not a GGUF file": (lambda f, o: ["eval", f.junk_gguf, "-q"], ["junk.gguf"]),
    "eval: corrupt ONNX graph": (lambda f, o: ["eval", f.junk_onnx, "-q"], ["junk-onnx"]),
    "eval: truncated ONNX weights": (lambda f, o: ["eval", f.cut_onnx, "-q"], ["model.onnx.data"]),
    "eval: reference model does not exist": (lambda f, o: ["eval", f.build / "model.gguf", "-r", f.root / "nope", "-q"], ["not found"]),
    "eval: zero evaluation tokens": (lambda f, o: ["eval", f.build / "model.gguf", "--eval-tokens", "0", "-q"], ["--eval-tokens"]),
    "eval: accuracy level 7": (lambda f, o: ["eval", f.build / "onnx", "--accuracy-level", "7", "-q"], ["--accuracy-level"]),
    "export-onnx: truncated GGUF": (lambda f, o: ["export-onnx", f.cut_gguf, "--out", o], ["cut.gguf"]),
    "bench: corrupt GGUF in the build": (lambda f, o: ["bench", f.corrupt_build, "-q"], ["model.gguf", "manifest"]),
    "bench: not a build folder": (lambda f, o: ["bench", f.root, "-q"], ["report.json"]),
    "bench: unknown runtime": (lambda f, o: ["bench", f.build, "--runtime", "tflite", "-q"], ["tflite"]),
    "bench: zero repeats": (lambda f, o: ["bench", f.build, "--repeats", "0", "-q"], ["--repeats"]),
    "deploy: folder does not exist": (lambda f, o: ["deploy", f.root / "nope", "--to", "ssh://127.0.0.1/x"], ["not found"]),
    "deploy: unknown transport": (lambda f, o: ["deploy", f.build, "--to", "ftp://board/x"], ["ftp"]),
    "deploy: unreachable device": (lambda f, o: ["deploy", f.build, "--to", "ssh://127.0.0.1:9/x", "-q"], ["refused"]),
    "deploy: no target given": (lambda f, o: ["deploy", f.build], ["--to", "--fleet", "--rpc"]),
    "deploy: fleet with an unknown device": (lambda f, o: ["deploy", f.build, "--rpc", "raspberry-pi-5-8gb,pi-9"], ["pi-9"]),
    "bench: split without running workers": (lambda f, o: ["bench", f.build, "--rpc", "raspberry-pi-5-8gb,raspberry-pi-5-8gb", "-q"],
                                             ["planned for one device", "--device"]),
    "plan: fleet with an unknown device": (lambda f, o: ["plan", "--device", "raspberry-pi-5-8gb,pi-9", "-q"], ["pi-9"]),
    "verify: folder without manifest": (lambda f, o: ["verify", f.root], ["manifest.json"]),
    "verify: corrupt build": (lambda f, o: ["verify", f.corrupt_build], ["model.gguf", "changed"]),
    "report: not a build folder": (lambda f, o: ["report", f.root], ["report.json"]),
    "report: ladder file is not JSON": (lambda f, o: ["report", f.build, "--ladder", f.not_json], ["ladder.json", "JSON"]),
}


# Cases that hand broken bytes to a native reader (safetensors, ggml, ONNX Runtime) run as a user
# runs them, in a process of their own, so that a crash there would show as one; the others fail in
# Python on their options, a folder's layout or a file's header, and run in this process.
NATIVE_READS = {case for case in MATRIX if case.startswith(("build: truncated", "build: not a GGUF", "eval: truncated",
                                                            "eval: not a", "eval: corrupt"))}


@pytest.fixture(scope="module")
def failures(bad):
    """Every case of the matrix run once (the processes three at a time): case -> (result, what the
    folder of bad inputs held before and after). Each case gets its own --out name, so anything
    left behind names the case that left it."""
    before = sorted(p.name for p in bad.root.iterdir())
    argv = {case: make(bad, bad.root / f"out-{i}") for i, (case, (make, _)) in enumerate(MATRIX.items())}
    with ThreadPoolExecutor(max_workers=3) as pool:
        running = {case: pool.submit(edgequant, *argv[case]) for case in MATRIX if case in NATIVE_READS}
        results = {case: in_process(*argv[case]) for case in MATRIX if case not in NATIVE_READS}
    results |= {case: job.result() for case, job in running.items()}
    after = sorted(p.name for p in bad.root.iterdir())
    return results, before, after


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input(case, failures, bad_input_messages):
    results, before, after = failures
    message = one_line_error(results[case])
    bad_input_messages[case] = message.removeprefix("edgequant: error: ")
    for word in MATRIX[case][1]:
        assert word in message


def test_no_case_leaves_anything_behind(failures):
    _, before, after = failures
    assert after == before  # nothing new, not even a hidden staging folder


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one may write into: a read-only mount when we are root (root ignores permission
    bits), else permission bits."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)


def test_unwritable_out(read_only_dir, tiny_model, bad_input_messages):
    message = one_line_error(edgequant(*quick_build(tiny_model(), read_only_dir / "out")))
    bad_input_messages["build: --out in a folder it may not write"] = message.removeprefix("edgequant: error: ")
    assert "cannot write" in message and str(read_only_dir) in message
    assert list(read_only_dir.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path / "disk", "8m")


@pytest.fixture
def disk_of_2_mb(tmp_path):
    yield from _tmpfs(tmp_path / "disk", "2m")


@pytest.fixture
def disk_of_12_mb(tmp_path):
    yield from _tmpfs(tmp_path / "disk", "12m")


def _tmpfs(disk: Path, size: str) -> Iterator[Path]:
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_that_fills_while_spilling_the_blocks_leaves_nothing_behind(small_disk, tiny_model, bad_input_messages):
    """The blocks of a streamed build go to the cache folder's disk: here an 8 MB one, too small."""
    model = tiny_model("llama", num_hidden_layers=4)
    env = {**os.environ, "EDGEQUANT_CACHE": str(small_disk / "cache")}
    message = one_line_error(edgequant(*quick_build(model, small_disk / "out", "--type", "Q8_0"), env=env))
    bad_input_messages["build: the disk fills while spilling blocks (8 MB tmpfs)"] = message.removeprefix("edgequant: error: ")
    assert "MB" in message and "spill" in message
    assert not (small_disk / "out").exists() and list((small_disk / "cache" / "spill").iterdir()) == []


def test_a_disk_that_fills_while_storing_the_reference_leaves_nothing_behind(disk_of_12_mb, tiny_model, tiny_build,
                                                                             bad_input_messages):
    """The full-precision log-probabilities wait in the cache folder too: 8.4 MB for 512 tokens of
    the tiny model's 4096-token vocabulary, beside the reference model's 10.5 MB of spilled blocks."""
    env = {**os.environ, "EDGEQUANT_CACHE": str(disk_of_12_mb / "cache")}
    gguf_file = tiny_build(ggml_type="Q8_0")[0] / "model.gguf"
    message = one_line_error(edgequant("eval", gguf_file, "-r", tiny_model(), "--eval-tokens", 512, "-q", env=env))
    bad_input_messages["eval: the disk fills while storing the reference (12 MB tmpfs)"] = message.removeprefix("edgequant: error: ")
    assert "no space left" in message and "log-probabilities" in message
    assert [p for p in disk_of_12_mb.rglob("*") if p.is_file()] == []


def test_out_on_a_full_disk_leaves_nothing_behind(disk_of_2_mb, tiny_model, bad_input_messages):
    """The tiny model's Q8_0 file is 2.9 MB."""
    message = one_line_error(edgequant(*quick_build(tiny_model(), disk_of_2_mb / "out", "--type", "Q8_0", "--formats", "gguf")))
    bad_input_messages["build: --out on a full disk (2 MB tmpfs)"] = message.removeprefix("edgequant: error: ")
    assert "no space left" in message
    assert list(disk_of_2_mb.iterdir()) == []


def test_help_lists_every_command_and_every_option_is_explained():
    top = edgequant("--help").stdout
    commands = ["build", "plan", "eval", "export-onnx", "deploy", "verify", "bench", "report", "devices", "fetch", "tools"]
    for command in commands:
        assert f" {command} " in top
        text = edgequant(command, "--help")
        assert text.returncode == 0
        options = [line for line in text.stdout.splitlines() if line.strip().startswith(("│ --", "│ *", "│   --"))]
        for line in options:  # every option line carries words after its name and type
            assert len(line.strip("│ ").split()) >= 3, f"{command}: {line}"


def test_mistyped_options_are_answered_before_torch_is_imported(tmp_path):
    """A typo in --device, a missing --model or file, a number or type out of range: the one-line
    error comes before the pipeline's imports (torch, transformers, onnx: several seconds)."""
    cases = [["build", "--device", "no-such-board"], ["plan", "--model", tmp_path / "missing"],
             ["build", "--bpw", "-1"], ["build", "--type", "Q9_X"], ["build", "--formats", "xyz"],
             ["eval", tmp_path / "missing.gguf"], ["eval", "--eval-tokens", "0", tmp_path]]
    script = ("import sys\nfrom tests.helpers import in_process\n"
              f"codes = [in_process(*args).returncode for args in {[[str(a) for a in c] for c in cases]!r}]\n"
              "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.split() == ["[1,", "1,", "1,", "1,", "1,", "1,", "1]", "False"], done.stdout + done.stderr


def test_no_pickle_is_ever_loaded():
    """Weights come from safetensors or GGUF only: no pickle, no torch.load without weights_only."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("edgequant/**/*.py"), *root.glob("exporters/**/*.py"), *root.glob("runtimes/**/*.py")]:
        text = path.read_text()
        assert "import pickle" not in text and "np.load(" not in text, path
        for line in text.splitlines():
            assert "torch.load(" not in line or "weights_only=True" in line, f"{path}: {line}"
            assert "from_pretrained(" not in line or "Tokenizer" in line or "Config" in line or "use_safetensors=True" in line, \
                f"{path}: {line}"  # a config is JSON; weights are read with safetensors or gguf-py only


# ---------------------------------------------------------------------------------- Ctrl-C

def test_sigterm_unwinds_like_ctrl_c_and_a_killed_build_s_spill_is_swept(tiny_model, tmp_path, bad_input_messages):
    """``kill`` (SIGTERM) mid-build removes the build's spilled blocks and codes, as Ctrl-C does; the
    folder a SIGKILLed build left behind is removed by the next build that spills."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = cache / "spill" / f"pid-{dead.pid}"
    left.mkdir(parents=True)
    (left / "block-0.f32").write_bytes(b"\0" * 4096)
    cmd = [sys.executable, "-m", "edgequant.cli", *quick_build(tiny_model("llama", num_hidden_layers=4), out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "EDGEQUANT_CACHE": str(cache)})
    mine = cache / "spill" / f"pid-{proc.pid}"
    deadline = time.time() + 300
    while not (mine.is_dir() and any(mine.rglob("*.f32"))) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert not left.exists()  # swept when the build made its own folder
    proc.send_signal(signal.SIGTERM)
    code, stderr = proc.wait(timeout=120), proc.stderr.read()
    error = stderr.strip().splitlines()[-1]
    bad_input_messages["build: SIGTERM mid-build"] = error.removeprefix("edgequant: error: ")
    assert code == 130 and error == "edgequant: error: interrupted; nothing was written", stderr[-2000:]
    assert "Traceback" not in stderr
    assert list((cache / "spill").iterdir()) == [] and not out.exists()


@pytest.mark.slow  # the default model is built: its steps last long enough to be interrupted in
@pytest.mark.parametrize("step, after_line, delay", [
    ("quantization", "calibrate ", 2.0),
    ("ONNX export", "export GGUF ", 0.3),
], ids=["during-quantization", "during-export"])
def test_ctrl_c_keeps_the_previous_build(step, after_line, delay, tiny_build, tmp_path, bad_input_messages):
    out = tmp_path / "out"
    shutil.copytree(tiny_build(ggml_type="Q8_0")[0], out)
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
    code = proc.wait(timeout=120)
    reader.join()
    assert code == 130, lines[-3:]
    # a step's bar is printed when the step ends, done (k/k) or cut short (j/k, 0/?)
    finished = [line.split("━")[0].strip() for line in lines if re.search(r"━\s+(\d+)/\1\b", line)]
    next_step = {"quantization": "quantize (rtn)", "ONNX export": "export ONNX"}[step]
    assert next_step not in finished, f"the interrupt came after {step}: {finished}"
    error = lines[-1].strip()
    assert error == "edgequant: error: interrupted; nothing was written" and not any("Traceback" in l for l in lines)
    bad_input_messages[f"build: Ctrl-C during {step}"] = error.removeprefix("edgequant: error: ")
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    assert edgequant("verify", out).returncode == 0


def test_ctrl_c_during_the_swap_completes_it_and_says_so(tmp_path, monkeypatch, capsys):
    """An interrupt between the two renames is held until the new folder is in place and the old one
    removed; then it is raised, and the command line says the build is complete."""
    import typer

    from edgequant import atomic, cli

    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    renames = []

    def replace(src, dst):  # the first rename (old folder aside) is followed by a Ctrl-C
        os.rename(src, dst)
        renames.append(dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace)

    def build():
        with atomic.atomic_dir(final) as stage:
            (stage / "new.txt").write_text("new")

    with pytest.raises(typer.Exit) as exit_:
        cli._run(build)
    assert exit_.value.exit_code == 130 and len(renames) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in final.iterdir()] == ["new.txt"]
    assert capsys.readouterr().err.strip() == f"edgequant: error: interrupted; {final} was already complete and is in place"

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgequant.evaluation import CachedLogits, TorchLogits
from edgequant.models import load_model
from edgequant.pipeline import BuildOptions, build

EVAL_TOKENS = 4096  # 8 windows of 512: enough to compare runtimes on the same text
CALIB_TOKENS = 2048
MIXED = {"bpw": 4.5, "formats": "gguf,onnx"}  # a mixed plan, exported to both formats; shared by several tests
# What the chat tests ask. The full-precision model answers "The capital city of France is Paris."
# with a lead of 0.73 nats or more for every greedy token; "What is the capital of France?" has a
# lead of 0.08 nats on its first token, and CI's CPU flipped it to a French list without Paris.
QUESTION = "Name the capital city of France."


BAD_INPUTS = pytest.StashKey[dict]()


@pytest.fixture
def bad_input_messages(request) -> dict:
    """Record a bad-input case's one-line message; all of them are listed at the end of the run."""
    return request.config.stash.setdefault(BAD_INPUTS, {})


def pytest_terminal_summary(terminalreporter, config):
    messages = config.stash.get(BAD_INPUTS, {})
    if messages:
        terminalreporter.section("bad-input matrix: case -> the one line edgequant printed")
        for case, message in sorted(messages.items()):
            terminalreporter.write_line(f"{case:<44} {message}")


@pytest.fixture(scope="session")
def default_model():
    return load_model("default")


@pytest.fixture(scope="session")
def reference(default_model):
    """Full-precision logits of the default model, computed once per window for the session."""
    return CachedLogits(TorchLogits(default_model.model))


@pytest.fixture(scope="session")
def calib_windows(default_model):
    from edgequant.assets import CALIBRATION_TEXT, load_text
    from edgequant.evaluation import token_windows

    return token_windows(default_model.tokenizer, load_text(None, CALIBRATION_TEXT)[1], CALIB_TOKENS)


@pytest.fixture(scope="session")
def rotated(default_model, calib_windows) -> dict:
    """The Hadamard baseline's and RUQuant's transforms of the default model (RUQuant tuned for
    W4A4), each computed once per session."""
    from edgequant.activation_quant import transform
    from edgequant.calibration import Calibration
    from edgequant.fakequant import Setting
    from edgequant.progress import Progress

    class Lazy(dict):
        def __missing__(self, method):
            self[method] = transform(method, default_model, Calibration(calib_windows, {}), Setting(4, 4), Progress())
            return self[method]

    return Lazy()


@pytest.fixture(scope="session")
def build_default(default_model, reference, tmp_path_factory):
    """Build the default model once per set of options; returns (out dir, report). Builds write
    the GGUF only unless the options ask for ``formats`` (the ONNX export and its two ORT
    evaluations add about 20 s per build)."""
    done: dict = {}

    def run(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("build") / "out"
            defaults = {"method": "rtn", "eval_tokens": EVAL_TOKENS, "calib_tokens": CALIB_TOKENS, "formats": "gguf"}
            opts = BuildOptions(out=out, **{**defaults, **options})
            done[key] = (Path(out), build(opts, loaded=default_model, reference=reference))
        return done[key]

    return run


@pytest.fixture(scope="session")
def stock_q4_k_m(tmp_path_factory, default_model, reference):
    """llama.cpp's own Q4_K_M of the reference model: its bits per weight and quality."""
    return score_stock_mix(tmp_path_factory.mktemp("stock"), "Q4_K_M", default_model.tokenizer, reference)


@pytest.fixture(scope="session")
def qublast(build_default, stock_q4_k_m):
    """The default method at llama.cpp's Q4_K_M size: a real mix, with its sensitivity table."""
    # GPTQ, the rounding step, needs the default amount of calibration text (see test_gptq)
    return build_default(method="qublast", bpw=stock_q4_k_m[0], calib_tokens=16384)


README_BUILD = ["build", "--device", "jetson-orin", "--out", "{out}", "--eval-tokens", "1024", "--json"]


@pytest.fixture(scope="session")
def readme_build(tmp_path_factory):
    """README's first command (`edgequant build --device jetson-orin`), run as a user runs it; its
    folder. What it printed on stdout (``--json``) is kept beside it, in ``stdout.json``."""
    out = tmp_path_factory.mktemp("readme") / "out"
    cmd = [sys.executable, "-m", "edgequant.cli", *(a.format(out=out) for a in README_BUILD)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    (out.parent / "stdout.json").write_text(done.stdout)
    return out


def score_stock_mix(tmp: Path, mix: str, tokenizer, reference, tokens: int = EVAL_TOKENS):
    """llama.cpp's own ``mix`` of the reference model, made in ``tmp``: (bits per weight, its
    llama.cpp quality on the first ``tokens`` of the evaluation text)."""
    from edgequant.assets import EVALUATION_TEXT, default_gguf, read_text
    from edgequant.evaluation import token_windows
    from edgequant.pipeline import gguf_tensor_stats
    from runtimes.llama_quantize import quantize_stock, write_f32_copy
    from runtimes.llamacpp import score_in_llama_cpp

    write_f32_copy(default_gguf(), tmp / "f32.gguf")
    path = tmp / f"stock-{mix}.gguf"
    quantize_stock(tmp / "f32.gguf", path, mix)
    n_bytes, n_params = gguf_tensor_stats(path)
    windows = token_windows(tokenizer, read_text(EVALUATION_TEXT), tokens)
    return n_bytes * 8 / n_params, score_in_llama_cpp(path, windows, reference)

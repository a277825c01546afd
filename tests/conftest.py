"""Fixtures shared by every test file.

Two kinds of model:

* **tiny random models** (``tiny_model``, ``tiny_build``): llama / mistral / qwen2 / qwen3 (and
  gemma3 / phi3 / mamba2) folders with the first 4096 tokens of the default model's tokenizer and
  widths that ggml's blocks fit, made in seconds. Everything that checks mechanics uses them:
  formats, parity across runtimes, pruning shapes, reports, deploy, bad inputs.
* **the real default model** (``default_model`` and the builds below), and gemma3-270m
  (``gemma3_270m_q8_0``): for claims about quality.
  Each distinct build is made once per run and read by every file that needs it. A test that uses
  one of them is marked ``slow`` automatically (``-m "not slow"`` skips them).

The suite runs with its own cache folder (``EDGEQUANT_CACHE``): no measurement made outside the
run (or by other code) is read back.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import FIRST, PYTHON, QUICKSTART, write_tiny_model

TINY_TOKENS = 512  # calibration and evaluation tokens of tiny builds: one window
EVAL_TOKENS = 4096  # real-model claims: 8 windows of 512
CALIB_TOKENS = 2048

REAL_MODEL_FIXTURES = {"default_model", "reference", "calib_windows", "eval_windows", "readme", "gemma3_270m_q8_0"}


def pytest_configure(config):
    """The suite's own cache: the default model's float32 folder and the fetched models' GGUFs
    (pure functions of the packages) are linked in from the user's cache when they are there;
    measured tables are not."""
    if os.environ.get("EDGEQUANT_SUITE_CACHE"):
        return  # already set up (a subprocess of the suite)
    from edgequant.assets import DEFAULT_MODEL, PACKAGED_MODELS, cache_dir

    suite = Path(tempfile.mkdtemp(prefix="edgequant-suite-cache-"))
    for name in (DEFAULT_MODEL, *PACKAGED_MODELS, "llama.cpp"):  # llama.cpp: its programs, built by `edgequant tools`
        if (cache_dir() / name).is_dir():
            (suite / name).symlink_to(cache_dir() / name)
    os.environ["EDGEQUANT_CACHE"] = os.environ["EDGEQUANT_SUITE_CACHE"] = str(suite)
    config.add_cleanup(lambda: shutil.rmtree(suite, ignore_errors=True))


def pytest_collection_modifyitems(items):
    """``slow`` means: uses the real default model."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# ------------------------------------------------------------------------------ bad-input matrix

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
            terminalreporter.write_line(f"{case:<48} {message}")


# ---------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(model_type="llama", **config)`` -> a Hugging Face folder, made once per run."""
    made: dict = {}

    def make(model_type: str = "llama", **config) -> Path:
        key = json.dumps([model_type, config], sort_keys=True)
        if key not in made:
            made[key] = write_tiny_model(tmp_path_factory.mktemp(f"tiny-{model_type}") / "model", model_type, **config)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_build(tiny_model, tmp_path_factory):
    """``tiny_build(model_type="llama", config={}, **options)`` -> (out folder, report): a build of a
    tiny model, in this process, made once per run for each set of options (default: RTN, GGUF and
    ONNX, the parity evaluations, no stock twin, 512 calibration and evaluation tokens)."""
    from edgequant.pipeline import BuildOptions, build

    made: dict = {}

    def run(model_type: str = "llama", config: dict | None = None, **options):
        key = json.dumps([model_type, config, options], sort_keys=True, default=str)
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-build") / "out"
            defaults = {"method": "rtn", "calib_tokens": TINY_TOKENS, "eval_tokens": TINY_TOKENS, "formats": "gguf,onnx",
                        "parity": True, "twin": False}
            opts = BuildOptions(model=str(tiny_model(model_type, **(config or {}))), out=out, **{**defaults, **options})
            made[key] = (out, build(opts))
        return made[key]

    return run


# ---------------------------------------------------------------------------- the default model


@pytest.fixture(scope="session")
def default_model():
    from edgequant.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def reference(default_model):
    """``reference(windows)``: the default model's full-precision log-probabilities on ``windows``,
    stored once as builds store them (edgequant.reference)."""
    from edgequant.reference import reference_log_probs

    return lambda windows: reference_log_probs(default_model, windows)


@pytest.fixture(scope="session")
def calib_windows(default_model):
    from edgequant.assets import CALIBRATION_TEXT, load_text
    from edgequant.evaluation import token_windows

    return token_windows(default_model.tokenizer, load_text(None, CALIBRATION_TEXT)[1], CALIB_TOKENS)


@pytest.fixture(scope="session")
def eval_windows(default_model):
    from edgequant.assets import EVALUATION_TEXT, load_text
    from edgequant.evaluation import token_windows

    return token_windows(default_model.tokenizer, load_text(None, EVALUATION_TEXT)[1], EVAL_TOKENS)


@pytest.fixture(scope="session")
def gemma3_270m_q8_0(tmp_path_factory):
    """(out folder, report) of gemma3-270m (the real model, built in) at Q8_0, RTN, GGUF only, with
    the parity evaluations on one window of 512 tokens."""
    from edgequant.pipeline import BuildOptions, build

    out = tmp_path_factory.mktemp("gemma3-270m") / "out"
    options = BuildOptions(model="gemma3-270m", out=out, method="rtn", ggml_type="Q8_0", formats="gguf", parity=True,
                           twin=False, calib_tokens=512, eval_tokens=512)
    return out, build(options)


# ------------------------------------------------------------------- README's commands, as written

@pytest.fixture(scope="session")
def readme(default_model, tmp_path_factory):
    """README's commands run in order in one fresh folder, as a user runs them: the first build,
    every quickstart line, then the Python example (in this process, so that its variables can be
    checked). The ssh host ``pi4`` is an OpenSSH server on 127.0.0.1 whose sessions start in
    ``board-home``. Returns (the folder, {command line: (its process, seconds)}, the example's
    variables)."""
    from tests import sshd
    from tests.helpers import edgequant

    work = tmp_path_factory.mktemp("readme")
    server = sshd.start(tmp_path_factory.mktemp("readme-sshd"), home=work / "board-home")
    config = server.client_config("pi4_config", host="pi4")
    ran, namespace = {}, {}
    try:
        for argv in FIRST + QUICKSTART:
            started = time.time()
            result = edgequant(*argv[1:], cwd=work, env=server.env(config), timeout=1800)
            ran[shlex.join(argv)] = (result, time.time() - started)
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(work)
            patch.setenv("EDGEQUANT_SSH_CONFIG", str(config))
            exec(compile(PYTHON, "README.md (the Python example)", "exec"), namespace)
    finally:
        server.stop()
    return work, ran, namespace

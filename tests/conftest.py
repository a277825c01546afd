import json
from pathlib import Path

import pytest

from edgequant.evaluation import CachedLogits, TorchLogits
from edgequant.models import load_model
from edgequant.pipeline import BuildOptions, build

EVAL_TOKENS = 4096  # 8 windows of 512: enough to compare runtimes on the same text
CALIB_TOKENS = 2048


@pytest.fixture(scope="session")
def default_model():
    return load_model("default")


@pytest.fixture(scope="session")
def reference(default_model):
    """Full-precision logits of the default model, computed once per window for the session."""
    return CachedLogits(TorchLogits(default_model.model))


@pytest.fixture(scope="session")
def build_default(default_model, reference, tmp_path_factory):
    """Build the default model once per set of options; returns (out dir, report)."""
    done: dict = {}

    def run(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in done:
            out = tmp_path_factory.mktemp("build") / "out"
            opts = BuildOptions(out=out, **{"method": "rtn", "eval_tokens": EVAL_TOKENS, "calib_tokens": CALIB_TOKENS, **options})
            done[key] = (Path(out), build(opts, loaded=default_model, reference=reference))
        return done[key]

    return run

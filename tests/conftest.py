import json
from pathlib import Path

import pytest

from edgequant.evaluation import CachedLogits, TorchLogits
from edgequant.models import load_model
from edgequant.pipeline import BuildOptions, build

EVAL_TOKENS = 4096  # 8 windows of 512: enough to compare runtimes on the same text
CALIB_TOKENS = 2048
MIXED = {"bpw": 4.5, "formats": "gguf,onnx"}  # a mixed plan, exported to both formats; shared by several tests


@pytest.fixture(scope="session")
def default_model():
    return load_model("default")


@pytest.fixture(scope="session")
def reference(default_model):
    """Full-precision logits of the default model, computed once per window for the session."""
    return CachedLogits(TorchLogits(default_model.model))


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

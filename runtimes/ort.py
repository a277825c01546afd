"""Run an exported ONNX folder in ONNX Runtime: logits for evaluation, and greedy generation.

The same evaluation harness as llama.cpp (:func:`edgequant.evaluation.evaluate`): each window is
one forward pass from an empty KV cache. ``accuracy_level`` overrides the ``MatMulNBits``
attribute for a session (0 = float32 activations, the exact reference; 4 = int8 activations, as
shipped) without touching the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError

MODEL_FILE = "model.onnx"


def model_file(path: Path) -> Path:
    """``model.onnx`` inside an exported folder, or the file itself."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise EdgequantError(f"ONNX model not found: {file}")
    return file


def check_model(file: Path) -> None:
    """Parse the graph and check that every external weight lies inside its data file, so a
    corrupt or truncated export is named plainly instead of failing deep inside ONNX Runtime."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception:
        raise EdgequantError(f"{file} is not a readable ONNX model (the protobuf does not parse)") from None
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            needed[info.location] = max(needed.get(info.location, 0), (info.offset or 0) + (info.length or 0))
    for location, end in needed.items():
        data = file.parent / location
        if not data.is_file():
            raise EdgequantError(f"{file} needs its weights file {data}, which is missing")
        if data.stat().st_size < end:
            raise EdgequantError(f"{data} is truncated: {data.stat().st_size} bytes, the model reads up to {end}")


def open_session(path: Path, n_threads: int | None = None, accuracy_level: int | None = None):
    """An ONNX Runtime CPU session; a corrupt or truncated model is a one-line error."""
    import onnx
    import onnxruntime as ort

    file = model_file(path)
    check_model(file)
    ort.set_default_logger_severity(4)  # errors reach the user once, as our one line
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads or os.cpu_count()
    opts.log_severity_level = 4
    try:
        if accuracy_level is None:
            return ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(file))
        for node in model.graph.node:
            for attr in node.attribute:
                if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                    attr.i = accuracy_level
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/RuntimeException; onnx DecodeError...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgequantError(f"ONNX Runtime cannot load {file}: {first[:300]}") from None


class OrtDecoder:
    """A session over the exported decoder, fed with an explicit KV cache."""

    def __init__(self, path: Path, n_threads: int | None = None, accuracy_level: int | None = None):
        self.session = open_session(path, n_threads, accuracy_level)
        self.runtime = "onnxruntime" if accuracy_level is None else f"onnxruntime (accuracy_level {accuracy_level})"
        config_file = model_file(path).parent / "genai_config.json"
        model = json.loads(config_file.read_text())["model"] if config_file.is_file() else {}
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.kv_shapes = {i.name: (1, i.shape[1], 0, i.shape[3]) for i in past}  # [batch, kv_heads, past, head_dim]
        if not all(isinstance(d, int) for s in self.kv_shapes.values() for d in s):  # symbolic dims (genai's builder)
            decoder = model["decoder"]
            self.kv_shapes = {n: (1, decoder["num_key_value_heads"], 0, decoder["head_size"]) for n in self.past_names}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.context = model.get("context_length")  # the positions the folder holds
        self.path = path

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(shape, np.float32) for n, shape in self.kv_shapes.items()}

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` (n,) after ``cache``: logits (n, vocab) and the grown cache."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        if self.context and past + len(ids) > self.context:
            raise EdgequantError(f"{self.path} holds {self.context} positions (the context it was built for); "
                                 f"{past + len(ids)} were asked for: rebuild with a longer --context")
        feed = {"input_ids": ids[None].astype(np.int64),
                "attention_mask": np.ones((1, past + len(ids)), np.int64), **cache}
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        new_cache = {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return out["logits"][0], new_cache

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """Logits of one evaluation window from an empty cache (a logits source)."""
        return self.step(np.asarray(window), self.empty_cache())[0]

    def greedy(self, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt``: one prefill, then one token at a time, until ``eos``
        (not included, as onnxruntime-genai leaves it out) or ``max_new_tokens``."""
        logits, cache = self.step(np.asarray(prompt), self.empty_cache())
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(logits[-1].argmax())
            if token == eos:
                break
            out.append(token)
            logits, cache = self.step(np.array([token]), cache)
        return out


def score_in_ort(path: Path, windows: np.ndarray, reference, n_threads: int | None = None,
                 accuracy_level: int | None = None, progress=None):
    """Perplexity, KLD and top-1 of an ONNX model run in ONNX Runtime, against ``reference``."""
    from edgequant.evaluation import evaluate

    return evaluate(OrtDecoder(path, n_threads, accuracy_level), windows, reference, progress=progress)


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation through onnxruntime-genai, reading the folder's genai_config.json."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


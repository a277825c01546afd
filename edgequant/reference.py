"""The full-precision reference as llama.cpp runs it.

Quality is the KL divergence of a file's next-token distributions from the full-precision
model's. The reference's logits are not kept for the whole text (a 151936-token vocabulary
over 8192 tokens is 5 GB): llama.cpp computes them again, one window at a time, beside each
candidate's (:func:`edgequant.evaluation.score`), from a GGUF of the reference weights. That
file is float32 (the loaded weights exactly); above ``F16_ABOVE_PARAMS`` parameters it is
float16, as llama.cpp's own converter makes it, so that it takes half the memory. It is written
once per model under the cache folder.
"""

from __future__ import annotations

from pathlib import Path

from exporters.gguf import write_gguf

from .measured import cache_path, code_of
from .models import LoadedModel

F16_ABOVE_PARAMS = 1_000_000_000


def weights_type(loaded: LoadedModel) -> str:
    """F32, or F16 for a model above ``F16_ABOVE_PARAMS`` parameters."""
    return "F16" if sum(p.numel() for p in loaded.model.parameters()) > F16_ABOVE_PARAMS else "F32"


def reference_gguf(loaded: LoadedModel) -> Path:
    """The reference GGUF of ``loaded`` (written on first use, tensor data straight from the model)."""
    import exporters.gguf  # noqa: F401  (its code is part of the key)

    kind = weights_type(loaded)
    path = cache_path("reference", loaded, code_of("exporters.gguf"), kind.encode(), suffix=".gguf")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path, loaded, None, "reference", float_type=kind)
    return path


def reference_logits(loaded: LoadedModel, ctx: int, threads: int | None = None):
    """A logits source of the reference, run in llama.cpp (close it when done)."""
    from runtimes.llamacpp import LlamaCppLogits

    source = LlamaCppLogits(reference_gguf(loaded), ctx, threads)
    source.runtime = f"llama.cpp ({weights_type(loaded)} reference)"
    return source

"""How many bytes of weights a device can take, and what a plan will cost there.

Memory while running in llama.cpp (CPU) = weights + KV cache + runtime overhead:

* weights: the GGUF file (tensor bytes of the plan + metadata), memory-mapped;
* KV cache: ``2 * kv_heads * head_dim * ctx * 2`` bytes (f16 K and V; KV heads summed over blocks);
* overhead: llama.cpp's CPU compute buffer, as ``edgequant bench`` runs it (flash attention on,
  ``n_batch`` = the context): float32 logits and two hidden-state-wide activations of one
  micro-batch, ``4 * u * (n_vocab + 2 * n_embd)`` bytes with ``u = min(512, ctx)``; plus 28 MB,
  the RSS ``import llama_cpp`` adds. The rule was read off llama.cpp's own allocation
  (llama-cpp-python 0.3.36, verbose load) for hidden sizes 256 and 576 at contexts from 256 to
  8192: exact but at one point (SmolLM2 at 2048, 102.5 MiB against 98.25); ``tests/test_planner.py``
  checks it for three shapes.

Decode speed is bandwidth bound: every token reads all weights (except the rows of an untied
embedding) and the KV cache, so ``tok/s = effective bandwidth / bytes per token``. Prefill is
compute bound: ``2 * params`` operations per token against a rough int8 throughput of the
CPU (cores x GHz x MACs per cycle of its widest integer dot product, at 30%).

The budget is the tightest of: the device's usable memory, ``--budget-mb`` (file size),
``--bpw`` and ``--min-tok-s``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import ort_budget
from .devices import Device
from .fleet import Fleet
from .errors import EdgequantError
from .adapters import adapter_of, head_dim
from .models import block_shapes

N_UBATCH = 512  # llama.cpp's default micro-batch; a shorter context shortens it
PROCESS_BYTES = 28_000_000  # measured, see above


@dataclass(frozen=True)
class Shape:
    """What the memory and speed models need to know of a model."""

    kv_heads: int  # summed over blocks (a pruned model's blocks may differ)
    head_dim: int
    n_vocab: int
    params: int
    tied: bool
    hidden: int
    state_bytes: int = 0  # a recurrent model's fixed state (Mamba-2), instead of a KV cache
    layers: int = 0  # blocks (ONNX Runtime's speed rule has a cost per block, edgequant.ort_budget)

    @classmethod
    def of(cls, model, params: int) -> Shape:
        config, family, blocks = model.config, adapter_of(model), block_shapes(model)
        kv_heads = 0 if family.recurrent else sum(s.kv_heads for s in blocks)
        return cls(kv_heads, head_dim(config), config.vocab_size, params, bool(config.tie_word_embeddings),
                   config.hidden_size, family.state_bytes(config), len(blocks))

    def kv_bytes(self, ctx: int) -> int:
        """The KV cache at ``ctx`` (F16 keys and values), or a recurrent model's state."""
        return 2 * self.kv_heads * self.head_dim * ctx * 2 + self.state_bytes

    def compute_buffer_bytes(self, ctx: int) -> int:
        """llama.cpp's CPU compute buffer at context ``ctx`` (see the module docstring)."""
        return 4 * min(N_UBATCH, ctx) * (self.n_vocab + 2 * self.hidden)

    def overhead_bytes(self, ctx: int) -> int:
        return self.compute_buffer_bytes(ctx) + PROCESS_BYTES


@dataclass
class Budget:
    device: str
    ctx: int
    max_file_bytes: int  # the largest GGUF that satisfies every constraint
    binding: str  # which constraint sets it
    constraints: dict[str, int]  # constraint -> largest file it allows

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(
    device: Device | Fleet,
    shape: Shape,
    ctx: int | None = None,
    budget_mb: float | None = None,
    bpw: float | None = None,
    min_tok_s: float | None = None,
    embd_bytes: int = 0,
    file_overhead: int = 0,
    bpw_params: int | None = None,
    runtime: str = "gguf",
) -> Budget:
    """The largest file allowed. ``embd_bytes`` is the (untied) embedding's share not read per
    token; ``file_overhead`` the GGUF bytes besides tensor data (bits per weight count tensors);
    ``bpw_params`` the parameters ``bpw`` is counted over (default the shape's: a pruned model
    counts its unpruned parameters, so that its bits per weight are the equivalent at equal size).
    ``runtime`` "onnx": ONNX Runtime's memory and speed (:mod:`edgequant.ort_budget`), whose
    prepacking adds to the weights' bytes: the plan is checked against it once its types are known."""
    ctx = ctx or device.default_ctx
    onnx = runtime == "onnx"
    runtime_bytes = ort_budget.runtime_bytes(shape, ctx) if onnx else device.runtime_bytes(shape, ctx)
    limits = {f"memory of {device.name}": device.usable_bytes - runtime_bytes}
    if budget_mb is not None:
        limits["--budget-mb"] = int(budget_mb * 1e6)
    if bpw is not None:
        limits["--bpw"] = int(bpw * (bpw_params or shape.params) / 8) + file_overhead
    if min_tok_s is not None:
        read = ort_budget.max_read_bytes(device, shape, ctx, min_tok_s) if onnx else bytes_read_per_token(device, shape, ctx, min_tok_s)
        limits["--min-tok-s"] = int(read) + embd_bytes + (file_overhead if onnx else 0)
    binding = min(limits, key=limits.get)
    return Budget(device.name, ctx, limits[binding], binding, limits)


def bytes_read_per_token(device: Device | Fleet, shape: Shape, ctx: int, tok_s: float) -> float:
    """The file bytes a token may read for ``device`` to decode ``tok_s`` tokens a second: its
    bandwidth over the time a token leaves once the network has had its share, less the KV cache."""
    seconds = 1 / tok_s - device.network_seconds(shape.hidden)
    return device.effective_bandwidth * seconds - shape.kv_bytes(ctx)


PROMPT_RATIO = 1.0  # prompt tokens per decoded token in the turn the planner weighs speed over


def prefill_weight_bytes(device: Device | Fleet) -> float:
    """What one weight's prefill work per token is worth in decode bytes on ``device``, for a
    turn of ``PROMPT_RATIO`` prompt tokens per decoded one: a prompt token costs ``2 / ops``
    seconds per weight, a decoded token ``1 / bandwidth`` per byte."""
    return PROMPT_RATIO * 2 * device.effective_bandwidth / device.int8_ops_per_s


def predict(device: Device | Fleet, shape: Shape, file_bytes: int, ctx: int, embd_bytes: int = 0,
            decode_bytes: float | None = None, prefill_factor: float = 1.0) -> dict:
    """Memory and speed of a ``file_bytes`` GGUF on ``device`` with a ``ctx`` context.
    ``decode_bytes``: the bandwidth-equivalent bytes a token reads (default ``file_bytes`` less
    an untied embedding's ``embd_bytes``), and ``prefill_factor`` the weights' mean prefill
    cost, both from the types' kernel costs (:mod:`edgequant.kernels`)."""
    kv = shape.kv_bytes(ctx)
    overhead = device.runtime_bytes(shape, ctx) - kv  # llama.cpp's buffers (every worker's, for a fleet)
    per_token = (file_bytes - embd_bytes if decode_bytes is None else decode_bytes) + kv
    memory = file_bytes + kv + overhead
    return {
        "file_bytes": file_bytes,
        "kv_cache_bytes": kv,
        "runtime_overhead_bytes": overhead,
        "memory_bytes": memory,
        "usable_bytes": device.usable_bytes,
        "fits": memory <= device.usable_bytes,
        "decode_tok_s": 1 / (per_token / device.effective_bandwidth + device.network_seconds(shape.hidden)),
        "prefill_tok_s": device.int8_ops_per_s / (2 * shape.params * prefill_factor),
        "ctx": ctx,
    }


def check_fits(budget: Budget, file_bytes: int, what: str) -> None:
    """A one-line error when ``what``, a ``file_bytes`` GGUF, breaks the budget."""
    if file_bytes > budget.max_file_bytes:
        raise EdgequantError(
            f"does not fit: {budget.binding} allows a file of {_mb(budget.max_file_bytes)}; "
            f"{what} is {_mb(file_bytes)}"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"

"""What each ggml type costs llama.cpp's CPU kernels: per byte when decoding, per weight when prefilling.

Decoding reads every weight once per token, so its time is the bytes read over the memory
bandwidth, provided the kernel unpacks its type as fast as the memory delivers it. Not every
type's kernel does: on CPUs the codebook i-quants and some 32-blocks decode slower than their
size suggests, and in prefill (compute bound) the types differ more still. A plan that is 2%
smaller but 15% slower is a worse plan, so the planner needs each type's cost.

The costs come from a table measured by ``bench/type_speed.py`` with llama.cpp's own tools: one
file per type with every matrix of a model in that type (llama.cpp's quantizer with a tensor-type
override on every weight), timed by ``llama-bench`` (decode ``tg``, prefill ``pp``) on fixed
threads. From the table (per-token costs that do not scale with the bytes, such as attention, are
counted in with them: a small file looks a little slower per byte than it is):

* **decode factor** of a type: its seconds per token per byte of file, over the fastest type's
  (>= 1). A matrix of ``n`` bytes then costs ``n * factor`` bytes of bandwidth per token.
* **prefill factor**: its seconds per prefilled token over the fastest type's (>= 1; every file
  has the same weights, so this is a cost per weight).

A type the table lacks counts as fast as the fastest. The table in ``device_profiles/kernels/``
is measured on the build host (x86-64); every device profile uses it until tables are measured on
the boards, and report.json names the table behind each prediction (``predicted.kernels``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from .errors import EdgequantError

TABLES = Path(__file__).resolve().parent.parent / "device_profiles" / "kernels"
DEFAULT = "host-x86_64"


@dataclass(frozen=True)
class KernelCosts:
    """Decode and prefill factors per ggml type (>= 1; 1 for a type not in the table)."""

    name: str
    source: str
    decode: dict[str, float] = field(default_factory=dict)
    prefill: dict[str, float] = field(default_factory=dict)

    def decode_factor(self, ggml_type: str) -> float:
        return self.decode.get(ggml_type, 1.0)

    def prefill_factor(self, ggml_type: str) -> float:
        return self.prefill.get(ggml_type, 1.0)

    def as_dict(self) -> dict:
        return {"name": self.name, "source": self.source}


UNMEASURED = KernelCosts("none", "no kernel table: every type decodes at the speed of its bytes")


@cache
def load(name: str = DEFAULT) -> KernelCosts:
    """The table ``device_profiles/kernels/<name>.json`` (:data:`UNMEASURED` when the default is absent)."""
    path = TABLES / f"{name}.json"
    if not path.is_file():
        if name == DEFAULT:
            return UNMEASURED
        raise EdgequantError(f"no kernel table {name!r} in {TABLES}")
    try:
        table = json.loads(path.read_text())
        return from_measurements(name, table["source"], table["types"])
    except (ValueError, KeyError, TypeError) as e:
        raise EdgequantError(f"kernel table {path} is not readable: {e}") from None


def from_measurements(name: str, source: str, types: dict[str, dict]) -> KernelCosts:
    """Factors from llama-bench's rates of uniform files: ``types`` maps a ggml type to its file's
    ``bytes``, ``decode_tok_s`` and ``prefill_tok_s``."""
    per_byte = {t: 1.0 / (m["decode_tok_s"] * m["bytes"]) for t, m in types.items()}
    per_token = {t: 1.0 / m["prefill_tok_s"] for t, m in types.items()}
    fastest_byte, fastest_token = min(per_byte.values()), min(per_token.values())
    return KernelCosts(name, source, {t: v / fastest_byte for t, v in per_byte.items()},
                       {t: v / fastest_token for t, v in per_token.items()})

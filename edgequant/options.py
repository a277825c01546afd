"""What a build is asked for (:class:`BuildOptions`), checked as it is made.

Light on purpose: the command line builds its options before it imports the pipeline (torch,
transformers, onnx: several seconds), so that a mistyped device, a missing model or a number out
of range is answered at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .assets import model_location
from .errors import EdgequantError, check_number
from .fleet import load_target
from .ort_quants import is_ort_type
from .planning import check_type_name

if TYPE_CHECKING:
    from .devices import Device
    from .fleet import Fleet
    from .pruning import Pruning

FORMATS = ("gguf", "onnx")
DEFAULT_CTX = 512  # tokens in an evaluation window (here, not in edgequant.evaluation: that imports torch)


@dataclass
class BuildOptions:
    model: str | None = None  # None / "default" -> the built-in model
    out: Path = Path("out")
    device: str | None = None  # profile name, alias or .toml path; None -> "host"
    method: str = "qublast"
    ggml_type: str | None = None  # uniform type, e.g. "Q4_K" (must still fit the device)
    bpw: float | None = None  # cap on bits per weight (all tensors)
    budget_mb: float | None = None  # cap on the GGUF file size
    min_tok_s: float | None = None  # floor on predicted decode speed on the device
    context: int | None = None  # runtime context the memory plan reserves KV cache for; None -> device's
    use_importance: bool = True
    scaling_maps: bool = True  # methods with a transform (QuBLAST): fold activation scaling maps
    calib_text: str | None = None  # None -> built-in c4; else a built-in name or comma-separated files
    calib_tokens: int = 16384
    sensitivity_tokens: int = 512  # the first calibration tokens QuBLAST's per-part KL is measured on
    sensitivity: str = "auto"  # measured / fisher / auto (edgequant.sensitivity.how_for)
    eval_text: str | None = None  # None -> built-in wiki
    eval_tokens: int = 8192
    ctx: int = DEFAULT_CTX  # evaluation window
    smooth: float | None = None  # SmoothQuant maps with this alpha (rtn/gptq); None = off
    parity: bool = False  # also score the torch simulation of each plan's codes and ORT at accuracy_level 0
    threads: int | None = None
    formats: tuple[str, ...] | None = None  # what goes into --out (None: both, or the GGUF alone for a family
    # with no ONNX export); each is planned for its runtime (the ONNX from the GGUF's codes when --type is a ggml type)
    pruning: Pruning | None = None  # structural pruning applied (and refitted) before planning
    twin: bool = True  # also make, score and show llama.cpp's own mix at the GGUF's size (edgequant.twin)
    target: Device | Fleet = field(init=False, repr=False, compare=False)  # --device, resolved

    def __post_init__(self):
        """Mistyped names, numbers out of range, a missing model and an unknown device fail here,
        before the model is loaded: all but the method and sensitivity names before torch is
        imported, so that a typo costs a fraction of a second."""
        check_number("--calib-tokens", self.calib_tokens, at_least=1)
        check_number("--sensitivity-tokens", self.sensitivity_tokens, at_least=16)
        check_number("--eval-tokens", self.eval_tokens, at_least=1)
        check_number("--eval-ctx", self.ctx, at_least=2)
        check_number("--bpw", self.bpw, above=0, at_most=32)
        check_number("--budget-mb", self.budget_mb, above=0)
        check_number("--min-tok-s", self.min_tok_s, above=0)
        check_number("--context", self.context, at_least=1)
        check_number("--smooth", self.smooth, at_least=0, at_most=1)
        check_number("--threads", self.threads, at_least=1)
        if self.ggml_type:
            check_type_name(self.ggml_type)
        if isinstance(self.formats, str):
            self.formats = tuple(f.strip().lower() for f in self.formats.split(",") if f.strip())
        unknown = set(self.formats or ()) - set(FORMATS)
        if unknown or self.formats == ():
            raise EdgequantError(f"--formats takes {' and/or '.join(FORMATS)}, got {','.join(self.formats) or 'nothing'}")
        if self.ggml_type and is_ort_type(self.ggml_type) and "gguf" in (self.formats or ()):
            raise EdgequantError(f"--type {self.ggml_type} is an ONNX Runtime configuration; it takes --formats onnx")
        self.target = load_target(self.device or "host")  # the device or fleet, resolved once
        model_location(self.model)
        self._check_heavy_names()

    def _check_heavy_names(self) -> None:
        """The checks whose names live in modules that import torch."""
        from .methods import get_method
        from .pruning import Pruning
        from .sensitivity import HOW

        if self.sensitivity not in ("auto", *HOW):
            raise EdgequantError(f"--sensitivity takes auto, {', '.join(HOW)}; got {self.sensitivity!r}")
        if get_method(self.method).search and (self.ggml_type or self.pruning):
            raise EdgequantError(f"--method {self.method} chooses the pruning and the types itself "
                                 "(no --type, no pruning given)")
        if self.pruning is not None and not isinstance(self.pruning, Pruning):
            raise EdgequantError("pruning takes an edgequant.pruning.Pruning")


def check_evaluation(path: Path, reference: str | None, eval_tokens: int, ctx: int, threads: int | None,
                     accuracy_level: int | None) -> None:
    """``edgequant eval``'s inputs: the file to score and the reference must exist, the numbers lie in range."""
    check_number("--eval-tokens", eval_tokens, at_least=1)
    check_number("--eval-ctx", ctx, at_least=2)
    check_number("--threads", threads, at_least=1)
    check_number("--accuracy-level", accuracy_level, at_least=0, at_most=4)
    if not Path(path).exists():
        raise EdgequantError(f"not found: {path}")
    model_location(reference)

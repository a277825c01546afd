"""``edgequant build``: load -> target the device -> calibrate -> plan -> transform -> quantize ->
export -> evaluate -> report.

Everything is written into a staging folder next to ``--out`` and moved into place at the end,
so a failed or interrupted build never leaves a half-written output (and an earlier build in
that folder survives until the new one is complete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from collections.abc import Mapping
from typing import Iterator

import torch

from exporters.gguf import overhead_bytes, write_gguf
from exporters.onnx import export_onnx, export_planned, overhead_bytes as onnx_overhead_bytes
from runtimes.llamacpp import LlamaCppLogits
from runtimes.ort import OrtDecoder, check_model, model_file

from . import __version__
from .assets import CALIBRATION_TEXT, EVALUATION_TEXT, load_text
from .atomic import atomic_dir
from . import ort_budget
from .budget import Budget, Shape, bytes_read_per_token, check_fits, predict, prefill_weight_bytes, resolve
from .calibration import ActivationStats, Calibration, cached_activation_stats
from .deployment import sha256, write_manifest
from .devices import Device
from .fleet import Fleet, check_split, split
from .errors import EdgequantError, disk_is_full
from .evaluation import DEFAULT_CTX, TorchLogits, decode_into, score, token_windows
from .kernels import load as load_kernels
from .methods import Method, get_method
from .memory import peak_rss_mb, release_memory
from .methods.joint import Choice
from .adapters import BlockShape
from .models import LoadedModel, block_shapes, gguf_tensor_infos, load_model
from .options import FORMATS, BuildOptions, check_evaluation
from .ort_quants import CANDIDATES as ORT_CANDIDATES, is_ort_type
from .planning import LADDER, Matrix, Plan, Speed, StockSpeed, for_budget, smallest_bytes, smallest_plan, uniform
from .progress import Progress
from .pruning import Pruning, prune
from .reference import StoredLogProbs, reference_log_probs, steps
from .reporting import write_report
from .sensitivity import Part, Sensitivity, split_parts
from .rotations import untie
from .twin import Twin, TwinSource, make_twin, reference_gguf, stock_speed
from .smoothing import llama_cpp_activations, smooth


@dataclass
class Target:
    """What the build aims at: the device, the model's shape there, and the byte budget."""

    device: Device | Fleet
    shape: Shape
    budget: Budget
    file_overhead: int  # the artifact's bytes besides tensor data (GGUF header, or the ONNX folder's graph and tokenizer)
    min_tok_s: float | None = None
    runtime: str = "gguf"  # whose memory and speed rules: llama.cpp's (edgequant.budget, with its measured kernel
    # costs) or ONNX Runtime's ("onnx": edgequant.ort_budget; bytes only, its kernels' costs are not measured)
    positions: int | None = None  # an ONNX folder's: the rows of its rotary tables (its context)
    stock: StockSpeed | None = None  # llama.cpp's own file at this size, whose speed the plan is held to

    @property
    def max_tensor_bytes(self) -> int:
        return self.budget.max_file_bytes - self.file_overhead

    @property
    def speed(self) -> Speed:
        """The kernels' costs, and ``--min-tok-s`` as bandwidth-equivalent bytes of tensors per token."""
        unread, floor, ctx = () if self.shape.tied else ("token_embd.weight",), None, self.budget.ctx
        if self.runtime == "onnx":
            if self.min_tok_s is not None:
                floor = ort_budget.max_read_bytes(self.device, self.shape, ctx, self.min_tok_s)
            return Speed(unread=unread, max_decode_bytes=floor)
        if self.min_tok_s is not None:
            floor = bytes_read_per_token(self.device, self.shape, ctx, self.min_tok_s) - self.file_overhead
        return Speed(load_kernels(), unread, floor, prefill_weight_bytes(self.device), self.stock)

    def predict(self, plan: Plan) -> dict:
        if self.runtime == "onnx":
            return ort_budget.predict(self.device, self.shape, plan, plan.total_bytes + self.file_overhead, self.budget.ctx,
                                      self.positions)
        speed = self.speed
        predicted = {**predict(self.device, self.shape, plan.total_bytes + self.file_overhead, self.budget.ctx,
                               decode_bytes=speed.plan_decode_bytes(plan) + self.file_overhead,
                               prefill_factor=speed.plan_prefill_factor(plan)),
                     "kernels": speed.costs.as_dict()}
        if isinstance(self.device, Fleet):
            predicted["split"] = split(self.device, plan, self.shape, self.budget.ctx, self.file_overhead, self.shape.tied)
        return predicted


def matrices_of(loaded: LoadedModel) -> tuple[list[Matrix], int]:
    """The quantized matrices, and the count of other (float32) parameters."""
    matrices = [Matrix(name, *w.shape) for name, w in loaded.matrices()]
    n_all = sum(p.numel() for p in loaded.model.parameters())  # tied weights counted once
    return matrices, n_all - sum(m.params for m in matrices)


def target(loaded: LoadedModel, opts: BuildOptions, device: Device | Fleet, unpruned_params: int | None = None,
           runtime: str = "gguf") -> Target:
    """The budget for ``loaded`` on ``device``; a pruned model counts ``--bpw`` over the
    ``unpruned_params`` of the model it was pruned from. ``runtime`` "onnx": the ONNX folder's
    target, under the same caps with the folder's own overhead (``--bpw`` counts tensors) and no
    llama.cpp kernel costs."""
    matrices, other = matrices_of(loaded)
    shape = Shape.of(loaded.model, sum(m.params for m in matrices) + other)
    positions = None
    if runtime == "onnx":
        context = onnx_context(opts.context or device.default_ctx, opts.ctx)
        file_overhead = onnx_overhead_bytes(loaded, context)
        positions = min(context, loaded.config.max_position_embeddings)
    else:
        file_overhead = overhead_bytes(loaded)
    budget = resolve(device, shape, opts.context, opts.budget_mb, opts.bpw, opts.min_tok_s,
                     file_overhead=file_overhead, bpw_params=unpruned_params, runtime=runtime)
    return Target(device, shape, budget, file_overhead, opts.min_tok_s, runtime, positions)


def make_plan(loaded, method: Method, tgt: Target, ggml_type: str | None, calibration: Calibration | None, progress,
              choice: Choice | None = None, runtime: str = "gguf"):
    """(plan, sensitivity table or None) within the target's budget (``choice``: the joint search's
    types). ``runtime`` "onnx": a plan in ONNX Runtime's configurations (:mod:`edgequant.ort_quants`)."""
    matrices, other = matrices_of(loaded)
    speed = tgt.speed
    if runtime == "onnx":
        plan, table = _onnx_plan(loaded, method, tgt, ggml_type, calibration, progress, matrices, other)
    elif ggml_type:
        plan, table = uniform(matrices, other, ggml_type), None
    elif choice:
        plan, table = Plan(choice.types(matrices), matrices, other, "joint: pruning and types searched against the output KL within "
                           f"{tgt.max_tensor_bytes / 1e6:.2f} MB"), None
    elif method.allocate:
        plan, table = method.allocate(loaded, matrices, other, tgt.max_tensor_bytes, calibration, progress, speed)
    else:
        plan, table = for_budget(matrices, other, tgt.max_tensor_bytes, f"greedy within {tgt.budget.binding}", speed,
                                 loaded.ties()), None
    check_fits(tgt.budget, plan.total_bytes + tgt.file_overhead, f"the {plan.rule} plan")
    if runtime == "onnx":
        ort_budget.check(tgt.predict(plan), tgt.device.name, f"the {plan.rule} plan", tgt.min_tok_s)
    if isinstance(tgt.device, Fleet):
        check_split(split(tgt.device, plan, tgt.shape, tgt.budget.ctx, tgt.file_overhead, tgt.shape.tied))
    speed.check(speed.plan_decode_bytes(plan), f"the {plan.rule} plan")
    return plan, table


def _onnx_plan(loaded, method: Method, tgt: Target, ort_type: str | None, calibration, progress, matrices, other):
    """The ONNX artifact's plan: ``--type`` if it names a configuration, else the method's
    measured allocation over ONNX Runtime's configurations, else the greedy mix over them.
    ONNX Runtime holds more than the file (its prepacking adds 12 bytes a block): a plan over the
    device's memory is made again within that much less, at most twice."""
    if ort_type:
        return uniform(matrices, other, ort_type), None
    max_bytes, smallest = tgt.max_tensor_bytes, smallest_bytes(matrices, other, ORT_CANDIDATES)
    for _ in range(3):
        if method.allocate:
            plan, table = method.allocate(loaded, matrices, other, max_bytes, calibration, progress, tgt.speed,
                                          menu=ORT_CANDIDATES)
        else:
            plan, table = for_budget(matrices, other, max_bytes, f"greedy within {tgt.budget.binding}", tgt.speed,
                                     ladder=ORT_CANDIDATES), None
        predicted = tgt.predict(plan)
        over = predicted["memory_bytes"] - tgt.device.usable_bytes
        if over <= 0 or max_bytes <= smallest:
            break  # (what still does not fit is make_plan's one-line error)
        # the stored bytes to give up: the overshoot in held bytes, at this plan's ratio of the two
        max_bytes = max(smallest, max_bytes - int(over * plan.total_bytes / predicted["weights_resident_bytes"]) - 1)
    return plan, table


def _fits(tgt: Target, loaded: LoadedModel, ladder) -> bool:
    """Whether the smallest mix of ``ladder`` fits the target's caps (and, in ONNX Runtime, the
    device's memory once prepacked)."""
    matrices, other = matrices_of(loaded)
    if smallest_bytes(matrices, other, ladder) + tgt.file_overhead > tgt.budget.max_file_bytes:
        return False
    return tgt.runtime != "onnx" or tgt.predict(smallest_plan(matrices, other, ladder))["fits"]


def onnx_context(budget_ctx: int, eval_ctx: int) -> int:
    """The context an ONNX folder is made for: what the plan budgeted, and room to evaluate (the
    export caps it at the model's own limit)."""
    return max(budget_ctx, eval_ctx)


def own_onnx_plan(opts: BuildOptions) -> bool:
    """Whether the ONNX artifact gets a plan of its own (else it is made from the GGUF's codes:
    when ``--type`` names a ggml type)."""
    return "onnx" in opts.formats and not (opts.ggml_type and not is_ort_type(opts.ggml_type))


@dataclass
class ArtifactPlan:
    """One artifact's plan: its runtime's target (its own overhead bytes and kernel costs), the
    types of its matrices, and the sensitivity table they were chosen from."""

    target: Target
    plan: Plan
    table: Sensitivity | None

    def sizes(self) -> dict:
        return {"bpw": self.plan.bpw, "bytes": self.plan.total_bytes + self.target.file_overhead,
                "max_bytes": self.target.budget.max_file_bytes}

    def summary(self) -> dict:
        return {"plan": self.plan.rule, **self.sizes(), "predicted": self.target.predict(self.plan),
                "blocks": blocks(self.plan, self.table)}

    def as_json(self) -> dict:
        """What the plan's file holds: the types, the budget, the overhead, the prediction, the table."""
        return {**self.plan.as_dict(), "budget": self.target.budget.as_dict(), "file_overhead": self.target.file_overhead,
                "predicted": self.target.predict(self.plan), "sensitivity": self.table.as_dict() if self.table else None}


@dataclass
class Planned:
    """Everything decided before any weight is rounded."""

    loaded: LoadedModel
    method: Method
    target: Target
    calib_label: str
    calibration: Calibration
    stats: ActivationStats | None
    plan: Plan
    table: Sensitivity | None
    reference: StoredLogProbs | None  # full precision on the evaluation text (:mod:`edgequant.reference`)
    eval_label: str | None = None  # where the evaluation text came from
    pruning: Pruning | None = None  # what was pruned (asked for, or chosen by the joint search)
    search: dict | None = None  # the joint search's details
    twin: TwinSource | None = None  # the full-precision GGUF llama.cpp's quantizer starts from
    onnx: ArtifactPlan | None = None  # the ONNX artifact's own plan (None: none asked, or made from the GGUF's codes)
    notes: list[str] = field(default_factory=list)  # what the build chose not to make, and why

    @property
    def plans(self) -> dict[str, Plan]:
        """The plan of each set of codes to round: "gguf" (the GGUF's, also the source of an ONNX
        folder made from its codes) and/or "onnx" (the ONNX artifact's own)."""
        out = {} if self.onnx is not None and self.onnx.plan is self.plan else {"gguf": self.plan}
        return out | ({"onnx": self.onnx.plan} if self.onnx is not None else {})

    def summary(self) -> dict:
        """What ``edgequant plan`` prints: budget, bit map, predicted size / memory / speed."""
        return {
            "model": self.loaded.name,
            "device": self.target.device.name,
            "method": self.method.name,
            "budget": self.target.budget.as_dict(),
            "plan": self.plan.rule,
            "bpw": self.plan.bpw,
            "predicted": self.target.predict(self.plan),
            "blocks": blocks(self.plan, self.table),
            "pruning": _pruning_report(self.pruning, self.loaded, self.search),
            "onnx": self.onnx.summary() if self.onnx and self.onnx.plan is not self.plan else None,  # beside the GGUF's
        }


def planned(opts: BuildOptions, progress: Progress, with_reference: bool = False) -> Planned:
    """Load, target the device, calibrate and plan (measuring sensitivity where the method does);
    ``with_reference``: also store the full-precision model's log-probabilities on the evaluation
    text, which the build's files are scored against (before pruning or any transform changes it)."""
    method = get_method(opts.method)
    device = opts.target
    fleet = isinstance(device, Fleet)
    if fleet and ("onnx" in (opts.formats or ()) or (opts.ggml_type and is_ort_type(opts.ggml_type))):
        raise EdgequantError(f"ONNX Runtime runs a model on one device: a build for the fleet {device.name} makes a GGUF "
                             "(--formats gguf)")
    with progress.step("load model"):
        loaded = load_model(opts.model, streamed=method.streams and opts.pruning is None)
    formats_chosen = opts.formats is None  # not asked for: both, unless one cannot be made (said in the report)
    notes: list[str] = []
    if formats_chosen:
        opts.formats = ("gguf",) if loaded.adapter.onnx_refusal or fleet else FORMATS
        if opts.ggml_type and is_ort_type(opts.ggml_type):
            opts.formats = ("onnx",)
        if fleet and not loaded.adapter.onnx_refusal:
            notes.append(f"no ONNX folder: ONNX Runtime runs a model on one device, and {device.name} splits it")
    elif "onnx" in opts.formats and loaded.adapter.onnx_refusal:
        raise EdgequantError(loaded.adapter.onnx_refusal)
    if method.rotates and not loaded.adapter.rotations:
        raise EdgequantError(f"--method {method.name} rotates what {loaded.adapter.model_type}'s norms after attention "
                             "and the MLP would not let through; use qublast, gptq or rtn")
    reference, label, twin = None, None, None
    tied = loaded.config.tie_word_embeddings  # as loaded (a method may untie the head below)

    def store_reference(twin_importance: bool = False):
        """The reference log-probabilities and the stock twin's source, from the model as loaded
        (``twin_importance``: the twin's importance matrix too, now, before pruning changes the model)."""
        nonlocal reference, label, twin
        if with_reference and reference is None:
            label, text = load_text(opts.eval_text, EVALUATION_TEXT)
            windows = token_windows(loaded.tokenizer, text, opts.eval_tokens, opts.ctx)
            with progress.step("full precision on the evaluation text", steps(loaded, windows)) as tick:
                reference = reference_log_probs(loaded, windows, tick)
        if twin is None and opts.twin and "gguf" in opts.formats:  # also for a plan: the build's plan follows its mix
            with progress.step("full-precision GGUF for llama.cpp's quantizer"):
                twin = TwinSource(reference_gguf(loaded, tied), unpruned_params)
            if twin_importance and opts.use_importance:
                with progress.step("calibrate", loaded.config.num_hidden_layers) as tick:
                    twin.importance = cached_activation_stats(loaded, calib, tick).importance

    unpruned_params = sum(p.numel() for p in loaded.model.parameters())
    if method.unties:  # the plan then counts both matrices
        untie(loaded.model)
    calib_label, calib_text = load_text(opts.calib_text, CALIBRATION_TEXT)
    calib = token_windows(loaded.tokenizer, calib_text, opts.calib_tokens, opts.ctx)
    pruning, choice = opts.pruning, None
    if method.search:
        choice = _search(loaded, method, opts, device, calib, progress)
        pruning = choice.pruning
    if pruning:
        pruning.check(loaded.model)
        if not loaded.adapter.per_block_sizes_arch:  # before the work: the file must hold per-block sizes
            raise EdgequantError(f"pruned models export for llama-family models only, not {loaded.adapter.model_type}")
        store_reference(twin_importance=True)  # of the unpruned model
        with progress.step("prune and refit"):
            loaded = prune(loaded, pruning, calib)
    tgt = target(loaded, opts, device, unpruned_params if pruning else None)
    onnx_tgt = target(loaded, opts, device, unpruned_params if pruning else None, "onnx") if own_onnx_plan(opts) else None
    if onnx_tgt and formats_chosen and "gguf" in opts.formats and not _fits(onnx_tgt, loaded, ORT_CANDIDATES):
        opts.formats, onnx_tgt = ("gguf",), None  # ONNX Runtime's smallest grid (4.1 bpw) is above this budget
        notes.append("no ONNX folder: ONNX Runtime's smallest grids (4-bit blocks, 4.1-4.6 bpw) do not fit this budget")
    gguf_planned = "gguf" in opts.formats or onnx_tgt is None  # (a GGUF is also the source of an ONNX from its codes)
    checked = ([(tgt, LADDER, "")] if gguf_planned else []) + ([(onnx_tgt, ORT_CANDIDATES, " ONNX")] if onnx_tgt else [])
    for t, ladder, what in checked:  # before any calibration
        check_fits(t.budget, smallest_bytes(*matrices_of(loaded), ladder) + t.file_overhead, f"the smallest{what} mix that would fit")
    store_reference()
    stats = None
    if opts.use_importance or opts.smooth or (method.allocate and not opts.ggml_type):
        with progress.step("calibrate", loaded.config.num_hidden_layers) as tick:
            stats = cached_activation_stats(loaded, calib, tick)
    calibration = Calibration(calib, stats.importance if stats and opts.use_importance else {}, opts.sensitivity_tokens,
                              opts.sensitivity)
    release_memory()  # the calibration passes' temporaries
    if twin is not None and twin.importance is None:
        twin.importance = calibration.importance
    onnx = None
    if onnx_tgt is not None:
        onnx = ArtifactPlan(onnx_tgt, *make_plan(loaded, method, onnx_tgt, opts.ggml_type, calibration, progress,
                                                 runtime="onnx"))
    if gguf_planned and twin is not None and method.allocate and not opts.ggml_type:
        with progress.step("llama.cpp's own mix at this size (dry run)"):
            try:
                tgt.stock = stock_speed(twin, tgt.max_tensor_bytes, tgt.speed)
            except EdgequantError as e:  # as for the twin itself: said, not fatal
                notes.append(f"the plan weighs speed at the price of a byte: {e}")
    if gguf_planned:
        plan, table = make_plan(loaded, method, tgt, opts.ggml_type, calibration, progress, choice)
    else:  # the ONNX plan is the build's (the transform is searched for its types)
        tgt, plan, table = onnx.target, onnx.plan, onnx.table
    release_memory()  # the sensitivity tables'
    return Planned(loaded, method, tgt, calib_label, calibration, stats, plan, table, reference, label,
                   pruning or None, choice.details if choice else None, twin, onnx, notes)


def _search(loaded: LoadedModel, method: Method, opts: BuildOptions, device: Device | Fleet, calib, progress) -> Choice:
    """The joint search on the unpruned model, within the budget the unpruned model's target gives
    (a pruned model's KV cache is smaller, so its memory budget can only grow)."""
    tgt = target(loaded, opts, device)
    with progress.step("calibrate", loaded.config.num_hidden_layers) as tick:
        importance = cached_activation_stats(loaded, calib, tick).importance if opts.use_importance else {}
    return method.search(loaded, *matrices_of(loaded), tgt.max_tensor_bytes, Calibration(calib, importance, opts.sensitivity_tokens),
                         progress, tgt.speed)


def _pruning_report(pruning: Pruning | None, pruned: LoadedModel, search: dict | None) -> dict | None:
    """What was pruned, every block's sizes after it (in the file's block order), and the joint
    search that chose it (if one did)."""
    if pruning is None:
        return {"search": search} if search else None
    return {**pruning.as_dict(), "blocks": [vars(s) for s in block_shapes(pruned.model)],
            "unpruned": vars(BlockShape.of_config(pruned.config)), "search": search}


def build(opts: BuildOptions, progress: Progress | None = None) -> dict:
    """Run the whole build into ``opts.out``.

    The build owns the one float32 model it loads: transforms change it in place, and the files
    are scored against the reference GGUF written before any of them (:mod:`edgequant.reference`).
    """
    progress = progress or Progress()
    started = time.time()
    out = Path(opts.out)
    _check_writable(out)
    p = planned(opts, progress, with_reference=True)
    tgt, plan, table, reference = p.target, p.plan, p.table, p.reference
    windows = reference.windows
    work, details, calibration = _transform(p, opts, progress)
    maps = details.pop("scaling_maps", None)
    release_memory()  # the transform's calibration streams
    codes = {}
    for fmt, fplan in p.plans.items():
        label = f" for the {fmt.upper()}" if len(p.plans) > 1 else ""
        with progress.step(f"quantize ({opts.method}){label}", len(fplan.matrices)) as tick:
            codes[fmt] = p.method.quantize(work, fplan, calibration, tick)
    report = {
        "edgequant": __version__,
        "model": {"name": work.name, "path": str(work.path), "architecture": work.config.model_type},
        "device": tgt.device.as_dict(),
        "budget": tgt.budget.as_dict(),
        "predicted": tgt.predict(plan),
        "method": {"name": opts.method, "importance": opts.use_importance, "smooth": opts.smooth,
                   "scaling_maps": maps is not None, "plan": plan.rule},
        "pruning": _pruning_report(p.pruning, work, p.search),
        "notes": p.notes,
        "text": {
            "calibration": {"source": p.calib_label, "tokens": int(calibration.windows.size)},
            "evaluation": {"source": p.eval_label, "tokens": int(windows.size), "ctx": opts.ctx},
            "reference": "full precision = the float32 weights of the loaded model (run in torch; "
                         "log-probabilities stored in float16)",
        },
    }

    with atomic_dir(out) as stage, _write_errors(out, stage):
        artifacts = _export(work, codes, p, opts, stage, out, progress, onnx_context(tgt.budget.ctx, windows.shape[1]))
        sims = _simulations(work, codes, p.method.activation_aware or work.adapter.activation_sensitive) if opts.parity else {}
        twin_source, spill, onnx_plan = p.twin, work.store, p.onnx
        if not sims:  # the files go now, not in a collection, where an interrupt would be lost
            _close(*codes.values(), spill)
        del work, p  # from here on only the files (and, with --parity, the simulations) are held
        release_memory()
        twin = _stock_twin(twin_source, artifacts["gguf"]["tensor_bytes"], stage, report, progress) if twin_source else None
        quality = _evaluate(reference, sims, stage, windows, opts, progress, twin)
        if twin is not None:
            report["stock"] = twin.as_dict(twin_source.params)
            twin.path.unlink()
        sims.clear()
        _close(*codes.values(), spill)
        del codes
        if "gguf" not in opts.formats and "gguf" in artifacts:  # it was only the source of the ONNX weights
            (stage / "model.gguf").unlink()
            del artifacts["gguf"]
        plans = {"gguf": ArtifactPlan(tgt, plan, table)} if "gguf" in artifacts or onnx_plan is None else {}
        if onnx_plan is not None:
            plans["onnx"] = onnx_plan
        report.update({
            "artifacts": list(artifacts.values()),
            "plans": {fmt: {"file": PLAN_FILES[fmt], "rule": ap.plan.rule, **ap.sizes(), "predicted": ap.target.predict(ap.plan),
                            "artifacts": [a["format"] for a in artifacts.values() if a["plan"] == PLAN_FILES[fmt]]}
                      for fmt, ap in plans.items()},
            "quality": quality,
            "build": {"seconds": time.time() - started, "peak_rss_mb": peak_rss_mb(),
                      "note": "peak RSS of the building process so far"},
            "blocks": blocks(plan, table),
            "scaling_maps": maps,
            "transform": details or None,
            "tensors": [{"name": t["name"], "ggml_type": t["ggml_type"], "bpw": t["bpw"]} for t in plan.as_dict()["tensors"]],
        })
        if onnx_plan is not None and onnx_plan.plan is not plan:
            report["onnx_blocks"] = blocks(onnx_plan.plan, onnx_plan.table)
        for fmt, ap in plans.items():
            (stage / PLAN_FILES[fmt]).write_text(json.dumps(ap.as_json(), indent=1))
        (stage / "report.json").write_text(json.dumps(report, indent=1))
        with progress.step("write report.html"):
            write_report(stage, shown_as=out)
        write_manifest(stage, {"edgequant": __version__, "model": report["model"], "device": tgt.device.name,
                               "settings": settings(opts),
                               "plan": {"rule": plan.rule, "bpw": plan.bpw, "file": PLAN_FILES[next(iter(plans))]},
                               "plans": {fmt: PLAN_FILES[fmt] for fmt in plans},
                               "text": report["text"], "versions": library_versions()})
    return report


PLAN_FILES = {"gguf": "plan.json", "onnx": "plan-onnx.json"}


def _close(*stores) -> None:
    """Delete the files of code stores and spilled weights (None: nothing)."""
    for store in stores:
        if store is not None:
            store.close()


def _export(work: LoadedModel, codes: dict, p: Planned, opts: BuildOptions, stage: Path, out: Path, progress,
            context: int) -> dict[str, dict]:
    """Write the artifacts into ``stage`` (a GGUF that only feeds an ONNX folder made from its
    codes too; the caller deletes it); each artifact's record names the plan that made it."""
    artifacts = {}
    if "gguf" in codes:
        gguf_path = stage / "model.gguf"
        with progress.step("export GGUF"):
            write_gguf(gguf_path, work, codes["gguf"], opts.method)
        artifacts["gguf"] = {**_artifact(gguf_path, "gguf", out), "plan": PLAN_FILES["gguf"]}
    if "onnx" in opts.formats:
        with progress.step("export ONNX"):
            if "onnx" in codes:
                exported, source = export_planned(work, codes["onnx"], stage / "onnx", context=context), "onnx"
            else:
                exported, source = export_onnx(stage / "model.gguf", stage / "onnx", work.tokenizer, context=context), "gguf"
        artifacts["onnx"] = {**_onnx_artifact(exported, out), "plan": PLAN_FILES[source]}
    return artifacts


def _stock_twin(source: TwinSource | None, tensor_bytes: int, stage: Path, report: dict, progress: Progress) -> Twin | None:
    """llama.cpp's own file at the build's size, in ``stage`` (None without a source). It is a
    comparison, not the product: if llama.cpp cannot make it, the build goes on and says why."""
    if source is None:
        return None
    try:
        with progress.step("llama.cpp's own mix at this size"):
            return make_twin(source, tensor_bytes, stage)
    except EdgequantError as e:
        report["stock"] = {"error": str(e)}  # shown where the twin's row would be
        return None


def _transform(p: Planned, opts: BuildOptions, progress: Progress) -> tuple[LoadedModel, dict, Calibration]:
    """The model to quantize (the method's transform or ``--smooth``'s maps folded in, in place
    where the transform allows), the transform's details, and the calibration it is rounded with."""
    loaded, calibration = p.loaded, p.calibration
    work, details = loaded, {}
    transformed = bool(p.method.transform and opts.scaling_maps)
    if transformed:
        work, details = p.method.transform(loaded, p.plan, calibration, progress)
    elif opts.smooth:
        details["folded"] = smooth(loaded, p.stats.absmax, opts.smooth)
    folded = details.pop("folded", None)
    if folded is not None and opts.use_importance:  # diagonal maps: the statistics follow, no second pass
        calibration = replace(calibration, importance=folded.importance(calibration.importance))
    elif transformed and opts.use_importance:
        with progress.step("calibrate the transformed model", work.config.num_hidden_layers) as tick:
            calibration = replace(calibration, importance=cached_activation_stats(work, calibration.windows, tick).importance)
    return work, details, calibration


def _simulations(work: LoadedModel, codes: dict, activation_aware: bool) -> dict[str, Simulation]:
    """``--parity``'s torch models: of the GGUF's codes (also with 8-bit activations, given the
    types of its linear layers, for an activation-aware method) and of the ONNX plan's own."""
    return {fmt: Simulation(work, store, _linear_types(work, store) if activation_aware and fmt == "gguf" else None)
            for fmt, store in codes.items()}


def evaluate_file(path: Path, reference_model: str | None = None, eval_text: str | None = None,
                  eval_tokens: int = 8192, ctx: int = DEFAULT_CTX, threads: int | None = None,
                  accuracy_level: int | None = None, progress: Progress | None = None) -> dict:
    """``edgequant eval``: score a GGUF file (in llama.cpp) or an ONNX model (in ONNX Runtime)
    against the full-precision ``reference_model`` on the evaluation text."""
    progress = progress or Progress()
    path = Path(path)
    check_evaluation(path, reference_model, eval_tokens, ctx, threads, accuracy_level)
    is_onnx = path.is_dir() or path.suffix == ".onnx"
    if is_onnx:  # a corrupt file fails here, before the reference model is loaded
        check_model(model_file(path))
    else:
        gguf_tensor_infos(path)
    with progress.step("load reference model"):
        loaded = load_model(reference_model, streamed=True)
    label, text = load_text(eval_text, EVALUATION_TEXT)
    windows = token_windows(loaded.tokenizer, text, eval_tokens, ctx)
    with progress.step("full precision on the evaluation text", steps(loaded, windows)) as tick:
        reference = reference_log_probs(loaded, windows, tick)
    candidate = OrtDecoder(path, threads, accuracy_level) if is_onnx else LlamaCppLogits(path, ctx, threads)
    try:
        with progress.step(f"evaluate {path.name}", len(windows)) as tick:
            quality = score({"file": candidate}, windows, reference, tick)["file"]
    finally:
        getattr(candidate, "close", lambda: None)()
    return {"path": str(path), "reference": loaded.name, "quality": quality.as_dict(),
            "text": {"source": label, "tokens": int(windows.size), "ctx": ctx}}


def blocks(plan: Plan, table: Sensitivity | None) -> list[dict]:
    """The per-block bit map: one row per block part, with its measured sensitivity when known."""
    kl = {(e.part, e.option): e.kl for e in table.entries} if table else {}
    rows = []
    for part in split_parts(plan.matrices):
        types = {m.name: plan.types[m.name] for m in part.matrices}
        bits = part.nbytes(types) * 8 / part.params
        rows.append({"index": part.block, "part": part.kind, "ggml_type": Part.label(types), "bits": bits,
                     "sensitivity": kl.get((part.key, Part.label(types)))})
    return rows


@dataclass
class Simulation:
    """``--parity``'s torch model of one plan's codes: the build's model given their decoded
    values when its turn comes (its float weights are not needed after the export, and one model
    serves each plan in turn); ``a8_types``: also run it with llama.cpp's 8-bit activation
    blocks, given each linear layer's ggml type (W4A8 as llama.cpp computes it)."""

    work: LoadedModel
    codes: Mapping
    a8_types: dict[str, str] | None

    def model(self) -> torch.nn.Module:
        decode_into(self.work, self.codes)
        return self.work.model


def _evaluate(reference: StoredLogProbs, sims: dict[str, Simulation], stage: Path, windows, opts, progress,
              twin: Twin | None = None) -> dict:
    """Quality of the files in ``stage`` against the full-precision ``reference``, each in its
    own runtime, one runtime at a time (and of llama.cpp's ``twin``, under ``stock``). With
    ``opts.parity``, also what the runtimes must agree with: the torch simulation of each plan's
    decoded codes (``sims``), and the ONNX model at accuracy_level 0 (float32 activations, the
    exact counterpart of its simulation)."""
    ctx, threads = windows.shape[1], opts.threads
    passes = []
    for fmt, sim in sims.items():
        passes.append((f"{fmt}_sim", lambda sim=sim: TorchLogits(sim.model())))
        if sim.a8_types is not None:
            passes.append((f"{fmt}_sim_a8", lambda sim=sim: _A8Logits(sim)))
    if "gguf" in opts.formats:
        passes.append(("gguf", lambda: LlamaCppLogits(stage / "model.gguf", ctx, threads)))
    if "onnx" in opts.formats:
        passes.append(("onnx", lambda: OrtDecoder(stage / "onnx", threads)))
        if opts.parity:
            passes.append(("onnx_exact", lambda: OrtDecoder(stage / "onnx", threads, accuracy_level=0)))
    if twin is not None:
        passes.append(("stock", lambda: LlamaCppLogits(twin.path, ctx, threads)))
    release_memory()  # what the export left behind
    quality = {}
    for i, (key, open_candidate) in enumerate(passes or [("fp", lambda: reference)]):
        candidates = {"fp": reference} if i == 0 else {}  # the reference's own perplexity comes with the first
        candidates[key] = open_candidate()
        with progress.step(f"evaluate {_EVALUATED[key]}", len(windows)) as tick:
            quality |= {k: q.as_dict() for k, q in score(candidates, windows, reference, tick).items()}
        getattr(candidates[key], "close", lambda: None)()
        del candidates
        release_memory()
    return quality


_EVALUATED = {"fp": "full precision", "gguf_sim": "torch simulation", "onnx_sim": "torch simulation of the ONNX plan",
              "gguf_sim_a8": "torch simulation, 8-bit activations", "gguf": "GGUF in llama.cpp",
              "onnx": "ONNX in onnxruntime", "onnx_exact": "ONNX in onnxruntime (accuracy_level 0)",
              "stock": "llama.cpp's own mix"}


class _A8Logits(TorchLogits):
    """The simulation run with llama.cpp's 8-bit activation blocks."""

    runtime = "torch, 8-bit activations"

    def __init__(self, sim: Simulation):
        super().__init__(sim.model())
        self.types = sim.a8_types

    def __call__(self, window):
        with llama_cpp_activations(self.model, self.types):
            return super().__call__(window)


def _linear_types(loaded: LoadedModel, encoded) -> dict[str, str]:
    """ggml type of every linear layer's weight, by module path (a tied head: the embedding's)."""
    return {path: encoded[loaded.linear_weight_name(path)].ggml_type
            for path, module in loaded.model.named_modules() if isinstance(module, torch.nn.Linear)}


def settings(opts: BuildOptions) -> dict:
    """The build's options as given, for the manifest (enough to run the same build again)."""
    given = {k: v for k, v in asdict(opts).items() if k != "target"}  # the device as named, not as resolved
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}


def library_versions() -> dict[str, str | None]:
    """Versions of what made and scored the files, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("edgequant", "torch", "transformers", "gguf", "onnx", "onnxruntime", "onnxruntime-genai",
                 "llama-cpp-python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gguf_tensor_stats(path: Path) -> tuple[int, int]:
    """(bytes, parameters) over all tensors stored in a GGUF file."""
    infos = gguf_tensor_infos(path)
    return sum(t.n_bytes for t in infos), sum(t.n_elements for t in infos)


def _artifact(path: Path, fmt: str, out: Path) -> dict:
    n_bytes, n_params = gguf_tensor_stats(path)
    return {
        "format": fmt,
        "path": str(out / path.name),
        "bytes": path.stat().st_size,
        "tensor_bytes": n_bytes,
        "params": n_params,
        "bpw": n_bytes * 8 / n_params,
        "sha256": sha256(path),
    }


def _onnx_artifact(exported: dict, out: Path) -> dict:
    folder = Path(exported["path"])
    return {**exported, "path": str(out / folder.name),
            "sha256": {name: sha256(folder / name) for name in exported["files"]}}


@contextmanager
def _write_errors(out: Path, stage: Path) -> Iterator[None]:
    """A failed write of the build becomes one line, checked while the staging folder still fills
    the disk."""
    try:
        yield
    except OSError as e:
        if disk_is_full(e, stage):
            raise EdgequantError(f"no space left on the disk of {out} ({shutil.disk_usage(stage).free / 1e6:.1f} MB free)") from None
        raise EdgequantError(f"cannot write {out}: {e.strerror or e}") from None


def _check_writable(out: Path) -> None:
    parent = out.resolve().parent
    if out.exists() and not out.is_dir():
        raise EdgequantError(f"--out {out} exists and is not a folder")
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise EdgequantError(f"cannot create {parent}: {e.strerror}") from None
    try:  # a real probe: access() says yes to root even on a read-only filesystem
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe.", dir=parent))
    except OSError as e:
        raise EdgequantError(f"cannot write to {parent}: {e.strerror}") from None

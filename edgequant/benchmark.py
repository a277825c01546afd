"""``edgequant bench``: run a build's artifacts in llama.cpp and ONNX Runtime, here or on a device.

The measuring is done by ``runtimes/probe.py``, a self-contained script started with the target's
own Python (here: this interpreter). On a device the artifacts must already be there with the
manifest's hashes (``edgequant deploy``). Results go to ``bench.json`` and into ``report.json``
beside the planner's prediction.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtimes.remote import Target, Transport, last_line, parse_target, remote_path, transport

from .atomic import write_text
from .deployment import verify
from .errors import EdgequantError, check_number
from .progress import Progress
from .reporting import read_json, write_report

PROBE = Path(__file__).resolve().parent.parent / "runtimes" / "probe.py"
RUNTIMES = {"llama.cpp": "model.gguf", "ort": "onnx"}  # runtime -> artifact (relative to the build folder)
INSTALL_HINT = {"llama.cpp": "pip install llama-cpp-python", "ort": "pip install onnxruntime numpy"}
BENCH_TIMEOUT = 1800


def bench(folder: Path, target_text: str = "local", runtime: str = "all", threads: int | None = None,
          python: str | None = None, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3,
          progress: Progress | None = None) -> dict:
    """Measure every requested runtime whose artifact the build has; returns what bench.json holds."""
    folder = Path(folder)
    out = measure(folder, target_text, runtime, threads, python, prompt_tokens, gen_tokens, repeats, progress)
    write_text(folder / "bench.json", json.dumps(out, indent=1))
    write_text(folder / "report.json", json.dumps({**_read_report(folder), "bench": out}, indent=1))
    write_report(folder)
    return out


def measure(folder: Path, target_text: str, runtime: str, threads: int | None, python: str | None,
            prompt_tokens: int, gen_tokens: int, repeats: int, progress: Progress | None = None) -> dict:
    """:func:`bench`'s measurements on one target, written nowhere."""
    for option, value in (("--threads", threads), ("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens),
                          ("--repeats", repeats)):
        check_number(option, value, at_least=1)
    report = _read_report(folder)
    target = parse_target(target_text)
    runtime = {"onnxruntime": "ort"}.get(runtime, runtime)
    wanted = list(RUNTIMES) if runtime == "all" else [runtime]
    if any(r not in RUNTIMES for r in wanted):
        raise EdgequantError(f"--runtime takes llama.cpp, ort (or onnxruntime) or all, got {runtime!r}")
    present = [r for r in wanted if (folder / RUNTIMES[r]).exists()]
    if not present:
        raise EdgequantError(f"{folder} has no {' or '.join(RUNTIMES[r] for r in wanted)} to bench")
    link, probe, python = _prepare(folder, target, python)
    have = _run_probe(link, python, probe, ["which"])
    missing = [r for r in present if r not in have["runtimes"]]
    runnable = [r for r in present if r in have["runtimes"]]
    if not runnable:
        hints = "; ".join(f"{r}: {INSTALL_HINT[r]}" for r in missing)
        raise EdgequantError(f"{target} has no runtime to run {', '.join(missing)} with {python} ({hints})")
    results = []
    ort_predicted = _ort_prediction(folder, report, prompt_tokens, gen_tokens) if "ort" in runnable else None
    for r in runnable:
        model = remote_path(target, RUNTIMES[r]) if target.scheme != "local" else str(folder / RUNTIMES[r])
        args = [r, model, "--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens),
                "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
        with (progress or Progress()).step(f"bench {r} on {target} ({repeats} runs + warm-up)"):
            results.append(_run_probe(link, python, probe, args))
        if r == "ort" and ort_predicted:  # ONNX Runtime's rule for this folder, at the probe's prompt and context
            results[-1]["predicted"] = ort_predicted
    return {"target": str(target), "python": python, "results": results,
            "skipped": {r: f"not installed for {python} ({INSTALL_HINT[r]})" for r in missing},
            "predicted": report.get("predicted"), "device_profile": report.get("device", {}).get("name")}


def bench_fleet(folder: Path, fleet_text: str, runtime: str = "all", threads: int | None = None,
                python: str | None = None, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3,
                jobs: int = 4, calibrate: bool = False, progress: Progress | None = None) -> dict:
    """The build benched on every target of a fleet file, each running the whole model alone,
    ``jobs`` at a time; a target that fails is a row with its one-line error. With ``calibrate``,
    a calibrated profile per target (``FOLDER/calibrated/<target>.toml``)."""
    from .fleet import load_fleet

    folder, fleet = Path(folder), load_fleet(fleet_text)
    check_number("--jobs", jobs, at_least=1)

    def one(member) -> dict:
        row = {"member": member.name, "device": member.device.name, "at": member.at}
        try:
            row["result"] = measure(folder, member.at, runtime, threads, python, prompt_tokens, gen_tokens, repeats,
                                    Progress())  # silent: the targets run at once
        except EdgequantError as e:
            row["error"] = str(e)
            return row
        if calibrate:
            out = folder / "calibrated" / (re.sub(r"[^A-Za-z0-9.-]+", "-", member.name) + ".toml")
            try:
                row["calibrated_profile"] = str(calibrate_profile(folder, row["result"], member.device, out))
            except EdgequantError as e:  # e.g. a host profile: the measurement still stands
                row["calibrate_error"] = str(e)
        return row

    with (progress or Progress()).step(f"bench on {len(fleet.members)} targets, {min(jobs, len(fleet.members))} at a time"):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            rows = list(pool.map(one, fleet.members))
    out = {"fleet": fleet.name, "targets": rows}
    write_text(folder / "bench-fleet.json", json.dumps(out, indent=1))
    write_text(folder / "report.json", json.dumps({**_read_report(folder), "bench_fleet": out}, indent=1))
    write_report(folder)
    return out


def _ort_prediction(folder: Path, report: dict, prompt_tokens: int, gen_tokens: int) -> dict | None:
    """What :mod:`edgequant.ort_budget` predicts for the ONNX folder as the probe runs it, on the
    build's device profile (its speed; the memory rule is the runtime's, wherever it runs). None
    for a build whose profile is not one device's."""
    from .ort_budget import at, folder_terms

    try:
        device = _build_device(report)
    except EdgequantError:  # a fleet's build (its ONNX folder, if any, runs on one device)
        return None
    terms = folder_terms(folder / RUNTIMES["ort"], device)
    return {**at(terms, prompt_tokens + gen_tokens, prompt_tokens), "ctx": prompt_tokens + gen_tokens,
            "prompt_tokens": prompt_tokens, "device_profile": device.name, "source": terms["source"]}


def _build_device(report: dict):
    """The device profile the build was planned for, loaded again (its file, else its name)."""
    from .devices import load_device

    device = report.get("device") or {}
    return load_device(device.get("path") or device.get("name") or "host")


def _read_report(folder: Path) -> dict:
    return read_json(folder / "report.json", "an edgequant build folder")


def _prepare(folder: Path, target: Target, python: str | None) -> tuple[Transport, str, str]:
    """The transport, where the probe script is on the target, and the Python that runs it."""
    link = transport(target)
    stale = _stale(folder, target)  # a corrupt file fails here, with its name, not inside a runtime
    if stale and target.scheme == "local":
        raise EdgequantError(f"{folder}: {stale} differ from manifest.json (corrupt or changed since the build): rebuild it")
    if stale:
        raise EdgequantError(f"{target} does not hold this build ({stale} missing or different): "
                             f"run `edgequant deploy {folder} --to {target}` first")
    if target.scheme == "local":
        return link, str(PROBE), python or sys.executable
    probe = remote_path(target, ".edgequant-probe.py")
    link.put_file(PROBE, probe)
    return link, probe, python or "python3"


def _stale(folder: Path, target: Target) -> str:
    """The build's files that do not match the manifest on the target, as text ('' if none)."""
    stale = [f["path"] for f in verify(folder, str(target))["files"] if f["found"] != f["expected"]]
    return ", ".join(stale[:3]) + ("..." if len(stale) > 3 else "")


def _run_probe(link: Transport, python: str, probe: str, args: list[str]) -> dict:
    done = link.run([python, probe, *args], timeout=BENCH_TIMEOUT, check=False)
    if done.returncode == 127:  # the shell found no such program
        raise EdgequantError(f"{link.target}: cannot start {python} (install Python 3 with numpy there, or pass --python)")
    if done.returncode:
        raise EdgequantError(f"{link.target}: the probe failed: {last_line(done.stderr)}")
    try:
        return json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgequantError(f"{link.target}: the probe printed no result ({last_line(done.stderr)})") from None


def calibrate_profile(folder: Path, result: dict, device=None, out: Path | None = None) -> Path:
    """Write ``device.calibrated.toml`` (or ``out``): the device's profile (default: the build's)
    with ``decode_efficiency`` replaced by what the llama.cpp decode rate implies (weights read
    per token / measured time)."""
    if device is None:
        device = _build_device(_read_report(folder))
    if device.path is None:
        raise EdgequantError("--calibrate-profile needs a profile file (host is detected afresh on every run)")
    llama = next((r for r in result["results"] if r["runtime"] == "llama.cpp"), None)
    if llama is None:
        raise EdgequantError("--calibrate-profile needs a llama.cpp measurement")
    bytes_per_token = _weights_read_per_token(folder / "model.gguf")
    efficiency = llama["decode_tok_s"]["median"] * bytes_per_token / (device.bandwidth_gbs * 1e9)
    if efficiency > 1:
        raise EdgequantError(f"the measured decode rate ({llama['decode_tok_s']['median']:.0f} tok/s over "
                             f"{bytes_per_token / 1e6:.1f} MB) is {efficiency:.2f}x the {device.bandwidth_gbs:g} GB/s of "
                             f"{device.name}: the model fits in the CPU's caches, or that profile is not this device's; "
                             "no profile written")
    text = device.path.read_text()
    text = re.sub(r"(?m)^decode_efficiency\s*=\s*[0-9.eE+-]+", f"decode_efficiency = {efficiency:.4g}", text)
    note = (f"measured by edgequant bench on {result['target']}: {llama['decode_tok_s']['median']:.1f} tok/s decoding "
            f"{bytes_per_token / 1e6:.1f} MB of weights per token (bandwidth-equivalent: each type at its kernel's decode factor)")
    text = re.sub(r'(?m)^decode_efficiency\s*=\s*".*"$', f"decode_efficiency = {json.dumps(note)}", text)
    out = out or folder / "device.calibrated.toml"
    out.parent.mkdir(exist_ok=True)
    write_text(out, text)
    return out


def _weights_read_per_token(gguf_path: Path) -> float:
    """Bytes of the file that one decoded token reads, as the planner counts them: all of it but
    an untied input embedding (one row of it is read), each tensor at its type's decode factor
    (:mod:`edgequant.kernels`), so that the efficiency is of the bandwidth, not of the kernels.
    The KV cache of a short bench is left out."""
    from .kernels import load
    from .models import gguf_tensor_infos

    costs, plan = load(), gguf_path.with_name("plan.json")
    types = {t["name"]: t["ggml_type"] for t in json.loads(plan.read_text())["tensors"]} if plan.is_file() else {}
    tensors = {t.name: t.n_bytes for t in gguf_tensor_infos(gguf_path)}
    unread = "token_embd.weight" if "output.weight" in tensors else None
    slowdown = sum(n * (costs.decode_factor(types[name]) - 1) for name, n in tensors.items()
                   if name in types and name != unread)
    return gguf_path.stat().st_size - tensors.get(unread, 0) + slowdown

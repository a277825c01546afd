"""A build split across a fleet: start llama.cpp's RPC workers on its devices, bench the split
model from here, stop the workers. (The split itself is planned in :mod:`edgequant.fleet`.)

``edgequant deploy BUILD --rpc fleet.toml`` starts one ``ggml-rpc-server`` per target, bound
to the address its ``rpc`` field gives: copied to a device over ssh (this machine's own build
for an x86 device, the aarch64 build for the profile's ISA on an ARM board), or started here for
``at = "local"``. The running workers are listed in ``BUILD/rpc-workers.json``;
``--stop`` stops them. ``edgequant bench BUILD --rpc fleet.toml`` runs llama-bench here with
the plan's tensor split, then reads each worker's peak memory and sets both beside the plan.

The RPC protocol has no authentication: anyone who reaches a worker's port can run code on it
and read what it holds. Keep the workers on a private network.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from runtimes.remote import parse_target, remote_path, transport
from runtimes.rpc import (SERVER, Worker, arm_build, bench_split, kld_against, save_logits, split_args, start_worker,
                          stop_worker, tool, worker_memory)

from .atomic import write_text
from .errors import EdgequantError, check_number
from .fleet import Fleet, load_fleet
from .progress import Progress
from .reporting import read_json, write_report

WORKERS_FILE = "rpc-workers.json"
SECURITY = ("the RPC protocol has no authentication or encryption: keep the workers on a private network "
            "(anyone who reaches their ports can run code on them)")


def start(folder: Path, fleet_text: str, progress: Progress | None = None) -> dict:
    """Start a worker on every target of the fleet file; returns what ``rpc-workers.json`` holds."""
    folder, fleet = Path(folder), load_fleet(fleet_text)
    read_json(folder / "report.json", "an edgequant build folder")  # before anything starts
    missing = [m.name for m in fleet.members if not m.rpc]
    if missing:
        raise EdgequantError(f"{fleet_text}: target {missing[0]} has no rpc address (host:port its server listens on)")
    if (folder / WORKERS_FILE).exists():
        raise EdgequantError(f"{folder} already has workers running ({WORKERS_FILE}); stop them first with --stop")
    started: list[tuple[object, Worker]] = []
    try:
        for member in fleet.members:
            with (progress or Progress()).step(f"start {SERVER} on {member.name} ({member.at}, {member.rpc})"):
                link = transport(parse_target(member.at))
                binary, log = _server_on(member, link, folder)
                started.append((link, start_worker(member.name, link, binary, member.rpc, member.threads, log)))
        state = {"fleet": fleet.as_dict(), "workers": [w.as_dict() for _, w in started], "security": SECURITY}
        write_text(folder / WORKERS_FILE, json.dumps(state, indent=1))
    except BaseException:
        _stop_all(started)
        raise
    return state


def _stop_all(workers: list[tuple[object, Worker]]) -> list[str]:
    """Stop every worker that can be reached; the names of those that could not."""
    unreached = []
    for link, worker in workers:
        try:
            stop_worker(link, worker)
        except EdgequantError:
            unreached.append(worker.name)
    return unreached


def _server_on(member, link, folder: Path) -> tuple[str, str]:
    """Where the server binary is on the member's machine (copied there if it is a device), and its log."""
    target = link.target
    if target.scheme == "adb":
        raise EdgequantError(f"{member.name}: RPC workers start over ssh or here, not over adb (reach a phone through "
                             "Termux's sshd)")
    if target.scheme == "local":
        return str(tool(SERVER)), str(folder / f".rpc-{member.rpc.rsplit(':', 1)[1]}.log")
    arch = arm_build(member.device.isa)
    local = tool(SERVER, arch)
    remote = remote_path(target, f"bin/{SERVER}-{arch or 'x86_64'}")
    link.mkdir(remote_path(target, "bin"))
    if link.sha256([remote])[remote] != _sha256(local):
        link.put_file(local, remote)
        link.run(["chmod", "+x", remote])
    return remote, remote_path(target, f"rpc-{member.rpc.rsplit(':', 1)[1]}.log")


def _sha256(path: Path) -> str:
    from .deployment import sha256

    return sha256(path)


def _running(folder: Path) -> list[Worker]:
    path = Path(folder) / WORKERS_FILE
    if not path.is_file():
        raise EdgequantError(f"{folder} has no running workers: start them with `edgequant deploy {folder} --rpc FLEET.toml`")
    try:
        return [Worker(**w) for w in read_json(path, "the workers' list")["workers"]]
    except (KeyError, TypeError):
        raise EdgequantError(f"{path} is not a list of workers (written by another version?); stop them by hand") from None


def stop(folder: Path) -> list[str]:
    """Stop the workers ``start`` started; returns their names."""
    workers = _running(folder)
    unreached = _stop_all([(transport(parse_target(w.at)), w) for w in workers])
    if unreached:
        raise EdgequantError(f"could not reach {', '.join(unreached)} to stop its worker (the others are stopped); "
                             f"{WORKERS_FILE} is kept")
    (Path(folder) / WORKERS_FILE).unlink()
    return [w.name for w in workers]


def bench(folder: Path, fleet_text: str, threads: int | None, prompt_tokens: int, gen_tokens: int, repeats: int,
          check_logits: bool = False, progress: Progress | None = None) -> dict:
    """llama-bench across the running workers with the plan's split; each worker's memory beside
    the plan's; with ``check_logits`` also the split run's logits against a run here."""
    folder, progress = Path(folder), progress or Progress()
    for option, value in (("--threads", threads), ("--prompt-tokens", prompt_tokens), ("--gen-tokens", gen_tokens),
                          ("--repeats", repeats)):
        check_number(option, value, at_least=1)
    report = read_json(folder / "report.json", "an edgequant build folder")
    split = (report.get("predicted") or {}).get("split")
    if split is None:
        raise EdgequantError(f"{folder} was planned for one device; build it with --device {fleet_text} to split it")
    fleet = load_fleet(fleet_text)
    workers = _workers_of(fleet, _running(folder), split)
    rpc = [w.rpc for w, _ in workers]
    for worker, link in workers:
        worker_memory(link, worker)  # a worker that is gone fails here, by name
    gguf, threads = folder / "model.gguf", threads or 1
    out = {"target": fleet.name, "rpc": rpc, "tensor_split": split["tensor_split"], "threads": threads,
           "predicted": {"decode_tok_s": report["predicted"]["decode_tok_s"],
                         "prefill_tok_s": report["predicted"]["prefill_tok_s"]}}
    with progress.step(f"llama-bench across {len(rpc)} workers ({repeats} runs)"):
        out["speed"] = bench_split(gguf, rpc, split["tensor_split"], threads, prompt_tokens, gen_tokens, repeats)
    if check_logits:
        with progress.step(f"logits across the workers against a run here (context {report['budget']['ctx']})"):
            out["logits"] = compare_logits(gguf, rpc, split["tensor_split"], threads, report["budget"]["ctx"])
    out["workers"] = [_memory_row(worker, link, planned) for (worker, link), planned in zip(workers, split["members"])]
    write_text(folder / "bench-split.json", json.dumps(out, indent=1))
    write_text(folder / "report.json", json.dumps({**report, "bench_split": out}, indent=1))
    write_report(folder)
    return out


def _workers_of(fleet: Fleet, workers: list[Worker], split: dict) -> list[tuple[Worker, object]]:
    """The running workers in the fleet's order; the fleet must have the devices the split was
    planned for (their addresses may differ), and a worker must run at each of its addresses."""
    running = {w.rpc: w for w in workers}
    planned = [row["device"] for row in split["members"]]
    if [m.device.name for m in fleet.members] != planned:
        raise EdgequantError(f"{fleet.name} is not the devices the build was planned for ({', '.join(planned)})")
    missing = [m.rpc for m in fleet.members if m.rpc not in running]
    if missing:
        raise EdgequantError(f"no worker of this build runs at {missing[0]} (started: {', '.join(running)})")
    return [(running[m.rpc], transport(parse_target(running[m.rpc].at))) for m in fleet.members]


def _memory_row(worker: Worker, link, planned: dict) -> dict:
    memory = worker_memory(link, worker)
    return {"member": worker.name, "rpc": worker.rpc, "layers": planned["layers"], "output": planned["output"],
            **memory, "predicted_bytes": planned["memory_bytes"],
            "ratio": memory["peak_rss_bytes"] / planned["memory_bytes"]}


def compare_logits(gguf: Path, rpc: list[str], tensor_split: list[float], threads: int, ctx: int) -> dict:
    """KLD and same top-1 of the split run against the same file run here (llama-perplexity, both
    without weight repacking: the workers never repack), on windows of the evaluation text at the
    plan's context (two below 1024 tokens, else one). Every logit of a window is computed, so the
    workers' buffers are used whole, as the plan reserves them."""
    from .assets import EVALUATION_TEXT, read_text

    chunks = 2 if ctx < 1024 else 1
    with tempfile.TemporaryDirectory(prefix="edgequant-logits-") as tmp:
        text, base = Path(tmp) / "text.txt", Path(tmp) / "base.kld"
        text.write_text(read_text(EVALUATION_TEXT)[: 8 * ctx * (chunks + 1)])  # >= 2 chars a token
        same = ["-c", str(ctx), "-b", str(ctx), "-nr"]
        save_logits(gguf, text, base, chunks, threads, same)
        return kld_against(base, gguf, split_args(rpc, tensor_split) + same, threads, ", ".join(rpc))

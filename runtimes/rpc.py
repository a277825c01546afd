"""llama.cpp's RPC backend: ggml-rpc-server on each device of a fleet, llama.cpp's own tools
run across them, and what each worker holds.

llama.cpp's programs come from ``runtimes/build_llama_cpp.sh`` (``edgequant tools``): built
from the sources llama-cpp-python vendors, for this machine or cross-compiled for aarch64. Client
and servers must come from the same commit: the protocol checks its major version only.

What the RPC client does when a worker goes away (read in ggml-rpc.cpp): a closed connection
aborts it (SIGABRT, "Remote RPC server crashed"), or SIGPIPE kills it mid-send; a worker whose
machine vanishes is never noticed (no socket timeouts). So every client run here has a
timeout, and any signal or non-zero exit becomes one line naming the workers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

BUILD_SCRIPT = Path(__file__).with_name("build_llama_cpp.sh")
SERVER = "ggml-rpc-server"
READY_SECONDS = 30
# aarch64 builds for a profile's ISA: the most capable the board runs (a wider one dies of SIGILL)
ARM_BUILDS = (("i8mm", "armv8.2-a+fp16+dotprod+i8mm"), ("dotprod", "armv8.2-a+fp16+dotprod"), ("neon", "armv8-a"))


def _cache() -> Path:
    from edgequant.assets import cache_dir

    return cache_dir() / "llama.cpp"


def tools_folder(arm: str | None = None) -> Path:
    """Where ``build_llama_cpp.sh`` puts the programs (for this machine, or for aarch64 ``arm``)."""
    from llama_cpp import __version__

    return _cache() / (f"build-{__version__}" + (f"-aarch64-{arm.replace('+', '-')}" if arm else "")) / "bin"


def build_tools(arm: str | None = None) -> Path:
    """Build llama.cpp's programs (minutes, once) and return their folder."""
    argv = ["bash", str(BUILD_SCRIPT)] + (["--arm", arm] if arm else []) + [str(_cache())]
    env = {**os.environ, "PYTHON": sys.executable}  # the llama-cpp-python whose sources to build: this one's
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgequantError(f"building llama.cpp's programs failed: {tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def tool(name: str, arm: str | None = None) -> Path:
    """One of llama.cpp's programs, or a one-line error saying how to build it."""
    path = tools_folder(arm) / name
    if not path.is_file():
        how = "edgequant tools" + (f" --arm {arm}" if arm else "")
        raise EdgequantError(f"llama.cpp's {name} is not built{' for ' + arm if arm else ''}: run `{how}` (a few minutes, once)")
    return path


def arm_build(isa: tuple[str, ...]) -> str | None:
    """The aarch64 ISA to build for a device with these ISA features; None for an x86 device."""
    return next((arch for feature, arch in ARM_BUILDS if feature in isa), None)


# ---------------------------------------------------------------------------------------------
# Workers


@dataclass
class Worker:
    """A running ggml-rpc-server."""

    name: str
    rpc: str  # host:port it listens on
    at: str  # "local" or the ssh target it runs on
    pid: int
    log: str  # its output, on the machine it runs on

    def as_dict(self) -> dict:
        return asdict(self)


def start_worker(name: str, link, binary: str, rpc: str, threads: int | None, log: str) -> Worker:
    """Start ggml-rpc-server through ``link`` (a :class:`runtimes.remote.Transport`: here or on a
    device), bound to ``rpc``'s address only, and wait until it listens. It runs on after this
    command returns, until :func:`stop_worker`."""
    host, port = rpc.rsplit(":", 1)
    if _listening(host, int(port)):
        raise EdgequantError(f"{name}: something already listens on {rpc} (a server left running? "
                             "`edgequant deploy BUILD --rpc FLEET --stop` stops the fleet's)")
    script = 't="$3"; [ "$t" = 0 ] && t=$(nproc); nohup "$0" -H "$1" -p "$2" -t "$t" > "$4" 2>&1 < /dev/null & echo $!'
    done = link.run(["sh", "-c", script, binary, host, port, str(threads or 0), log])
    pid = done.stdout.decode().split()
    if not pid or not pid[-1].isdigit():
        raise EdgequantError(f"{name}: {SERVER} did not start on {link.target} (no process id)")
    worker = Worker(name, rpc, str(link.target), int(pid[-1]), log)

    def alive() -> bool:
        return link.run(["kill", "-0", str(worker.pid)], check=False).returncode == 0

    def tail() -> str:
        return link.run(["tail", "-n", "5", log], check=False).stdout.decode(errors="replace")

    try:
        _wait_ready(worker, alive, tail)
    except BaseException:
        stop_worker(link, worker)
        raise
    return worker


def stop_worker(link, worker: Worker) -> None:
    """Stop the worker, if the process with its pid is still a ggml-rpc-server (a pid is reused
    once its process has gone)."""
    script = f'grep -q {SERVER} /proc/"$0"/cmdline 2>/dev/null && kill "$0"; true'
    link.run(["sh", "-c", script, str(worker.pid)], check=False)


def worker_memory(link, worker: Worker) -> dict:
    """The server's resident and peak resident bytes, from its ``/proc/<pid>/status``."""
    done = link.run(["cat", f"/proc/{worker.pid}/status"], check=False)
    fields = dict(re.findall(r"(?m)^(VmRSS|VmHWM):\s+(\d+) kB", done.stdout.decode(errors="replace")))
    if done.returncode or len(fields) < 2:
        raise EdgequantError(f"{worker.name}: {SERVER} (pid {worker.pid} on {worker.at}) is not running")
    return {"rss_bytes": int(fields["VmRSS"]) * 1024, "peak_rss_bytes": int(fields["VmHWM"]) * 1024}


def _wait_ready(worker: Worker, alive, tail) -> None:
    """Poll the port (the server prints nothing when it starts listening, and exits 0 on failure)."""
    host, port = worker.rpc.rsplit(":", 1)
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if _listening(host, int(port)):
            return
        if not alive():
            lines = [line for line in tail().splitlines() if line.strip()]
            raise EdgequantError(f"{worker.name}: {SERVER} stopped at start on {worker.rpc}: "
                                 f"{lines[-1].strip() if lines else 'no output'}")
        time.sleep(0.1)
    raise EdgequantError(f"{worker.name}: {SERVER} did not listen on {worker.rpc} within {READY_SECONDS} s")


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Clients


def split_args(rpc: list[str], tensor_split: list[float], sep: str = ",", flag: str = "--rpc") -> list[str]:
    """Arguments that put every layer on the workers, dealt out as ``tensor_split`` says, and
    nothing moved by llama.cpp's automatic fitting. (llama-bench spells the option ``-rpc`` and
    separates one configuration's values with ``/``.)"""
    devices = sep.join(f"RPC{i}" for i in range(len(rpc)))
    return [flag, ",".join(rpc), "-dev", devices, "-ngl", "999", "-ts", sep.join(f"{t:g}" for t in tensor_split)]


def run_client(argv: list[str], workers: str, timeout: float) -> str:
    """Run one of llama.cpp's programs against the workers; its stdout, or one line on failure."""
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort must not attach gdb to the client
    try:
        done = subprocess.run(argv, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        raise EdgequantError(f"{Path(argv[0]).name} got no answer from the workers ({workers}) in {timeout:.0f} s") from None
    if done.returncode:
        why = _lost_worker(done) or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgequantError(f"{Path(argv[0]).name} across {workers} failed: {why}")
    return done.stdout


def _lost_worker(done: subprocess.CompletedProcess) -> str | None:
    if "Remote RPC server crashed" in done.stderr or done.returncode in (-signal.SIGABRT, -signal.SIGPIPE):
        return "a worker closed the connection (stopped or crashed)"
    if "Failed to connect" in done.stderr:
        return (re.search(r"Failed to connect to \S+", done.stderr) or re.search("Failed to connect", done.stderr)).group(0)
    return None


KLD_LINE = re.compile(r"^Mean\s+KLD:\s+([-\d.]+)\s+\S+\s+([-\d.]+)", re.M)  # "Mean    KLD:   0.001234 ±   0.000056"
TOP_LINE = re.compile(r"^Same top p:\s+([\d.]+)\s+\S+\s+([\d.]+)\s+%", re.M)  # "Same top p: 99.608 ± 0.391 %"


def kld_against(base: Path, gguf: Path, extra: list[str], threads: int, workers: str = "this machine",
                timeout: float = 1800, perplexity: list[str] | None = None) -> dict:
    """KLD and same-top-1 share of ``gguf`` run with ``extra`` arguments, against the logits saved
    in ``base`` by :func:`save_logits` (llama-perplexity's own comparison). ``perplexity``: the
    command that runs llama-perplexity (default: this machine's build)."""
    argv = [*(perplexity or [str(tool("llama-perplexity"))]), "-m", str(gguf), "--kl-divergence-base", str(base),
            "--kl-divergence", "-t", str(threads), "-fit", "off", *extra]
    out = run_client(argv, workers, timeout)
    kld, top = KLD_LINE.search(out), TOP_LINE.search(out)
    if not (kld and top):
        raise EdgequantError(f"llama-perplexity printed no KL divergence for {gguf} (fewer than 100 tokens compared?)")
    return {"kld": float(kld.group(1)), "kld_se": float(kld.group(2)), "same_top1": float(top.group(1)) / 100}


def save_logits(gguf: Path, text: Path, base: Path, chunks: int, threads: int, extra: list[str] = ()) -> None:
    """llama-perplexity's logits of ``chunks`` windows of ``text``, run here with ``extra``
    arguments (the context among them), saved to ``base``."""
    argv = [str(tool("llama-perplexity")), "-m", str(gguf), "-f", str(text), "--chunks", str(chunks), "-t", str(threads), "-fit", "off", "--kl-divergence-base", str(base), *extra]
    run_client(argv, "this machine", 1800)
    if not base.is_file():
        raise EdgequantError(f"llama-perplexity saved no logits for {gguf}")


def bench_split(gguf: Path, rpc: list[str], tensor_split: list[float], threads: int, prompt: int, gen: int,
                repeats: int, timeout: float = 1800) -> dict:
    """llama-bench across the workers: prefill and decode tok/s (mean and spread over ``repeats``)."""
    argv = [str(tool("llama-bench")), "-m", str(gguf), *split_args(rpc, tensor_split, sep="/", flag="-rpc"),
            "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(repeats), "-o", "json"]
    out = run_client(argv, ", ".join(rpc), timeout)
    try:
        rows = json.loads(out)
    except ValueError:
        raise EdgequantError(f"llama-bench printed no results across {', '.join(rpc)}") from None
    speeds = {}
    for row in rows:
        key = "prefill_tok_s" if row["n_prompt"] else "decode_tok_s"
        speeds[key] = {"mean": row["avg_ts"], "stddev": row["stddev_ts"]}
    return speeds

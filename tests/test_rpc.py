"""The default model split across two llama.cpp RPC workers on loopback, as the plan splits it.

The workers are real ``ggml-rpc-server`` processes on 127.0.0.1 (built by ``edgequant tools``),
started and stopped by ``edgequant deploy`` (one here, one through ssh); the client is llama.cpp's
own llama-bench and llama-perplexity."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import sshd
from tests.helpers import assert_clean_failure, edgequant, in_process, succeeded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_file(folder, ports, where) -> str:
    """Two workers on this machine, each on one thread, reached over loopback; ``where``: how
    deploy reaches each (here, or through ssh)."""
    targets = "".join(f'[[target]]\nprofile = "host"\nrpc = "127.0.0.1:{p}"\nat = "{at}"\nthreads = 1\n'
                      f'link_mbs = 2000\nlink_ms = 0.05\n' for p, at in zip(ports, where))
    path = folder / "fleet.toml"
    path.write_text(f'name = "loopback"\n{targets}')
    return str(path)


@pytest.fixture(scope="module")
def split_build(default_model, tmp_path_factory):
    """A Q8_0 build planned for the two workers (context 512), and the workers running: the first
    started here, the second through ssh (an OpenSSH server on 127.0.0.1), from a copy of the server."""
    folder = tmp_path_factory.mktemp("rpc")
    server = sshd.start(folder / "sshd")
    board = folder / "board"
    fleet = fleet_file(folder, [free_port(), free_port()], ["local", f"ssh://board{board}"])
    out = folder / "build"
    succeeded(in_process("build", "--device", fleet, "--type", "Q8_0", "--method", "rtn", "--formats", "gguf",
                         "--context", "512", "--eval-tokens", "1024", "--calib-tokens", "512", "--no-twin", "--quiet",
                         "--out", out))
    started = json.loads(succeeded(edgequant("deploy", out, "--rpc", fleet, "--json", env=server.env())).stdout)
    assert [w["at"] for w in started["workers"]] == ["local", f"ssh://board{board}"]
    assert (board / "bin" / "ggml-rpc-server-x86_64").is_file()  # this x86 machine's build, for a host profile
    yield out, fleet, server.env()
    edgequant("deploy", out, "--rpc", fleet, "--stop", "--quiet", env=server.env())
    server.stop()


def test_the_split_run_matches_a_run_here_and_each_worker_holds_what_the_plan_says(split_build):
    out, fleet, env = split_build
    result = json.loads(succeeded(edgequant("bench", out, "--rpc", fleet, "--check-logits", "--repeats", "1",
                                            "--prompt-tokens", "32", "--gen-tokens", "8", "--json", env=env)).stdout)
    report = json.loads((out / "report.json").read_text())
    assert result["tensor_split"] == report["predicted"]["split"]["tensor_split"]  # run with the plan's split
    assert result["logits"]["kld"] < 1e-3
    assert result["logits"]["same_top1"] == 1.0
    for worker in result["workers"]:
        assert 0.85 <= worker["ratio"] <= 1.15, worker  # peak RSS against the plan's figure
    assert result["speed"]["decode_tok_s"]["mean"] > 0 and result["speed"]["prefill_tok_s"]["mean"] > 0
    assert "Split across devices" in (out / "report.html").read_text()


def test_a_worker_killed_mid_bench_is_one_line_and_a_failure(split_build):
    out, fleet, env = split_build
    workers = json.loads((out / "rpc-workers.json").read_text())["workers"]
    bench = subprocess.Popen([sys.executable, "-m", "edgequant.cli", "bench", str(out), "--rpc", fleet,
                              "--repeats", "20", "--gen-tokens", "128", "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = Path(workers[1]["log"])  # the server writes a line for each client it accepts
    accepted = log.read_text().count("Accepted client connection")
    deadline = time.monotonic() + 120
    while log.read_text().count("Accepted client connection") == accepted:  # llama-bench has not connected yet
        assert bench.poll() is None and time.monotonic() < deadline, bench.communicate()
        time.sleep(0.1)
    time.sleep(1)  # it is loading the weights into the workers, or running
    subprocess.run(["kill", "-9", str(workers[1]["pid"])], check=True)
    stdout, stderr = bench.communicate(timeout=300)
    result = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert_clean_failure(result, "llama-bench", "a worker closed the connection")
    # the next bench names the lost worker before starting anything
    again = edgequant("bench", out, "--rpc", fleet, "--quiet", env=env)
    assert_clean_failure(again, "1:host", "is not running")


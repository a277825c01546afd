"""deploy / verify / bench: over a real OpenSSH server on 127.0.0.1, and over adb through a stand-in
``adb`` that runs "the device" here; the build is a tiny random model's (the README's own commands
run on the default model in test_readme.py)."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from edgequant.devices import load_device
from runtimes.remote import Adb, Ssh, Target, parse_target
from tests import sshd
from tests.helpers import assert_clean_failure, edgequant, succeeded

# A tiny llama at Q8_0 (hidden 512: a 27 MB GGUF, big enough to interrupt a copy of it) planned for
# a profile file, so that --calibrate-profile has a profile to calibrate: one whose bandwidth is
# above this machine's (the "board" here is this machine; a Pi's figure would be exceeded).
BUILD = {"config": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4},
         "ggml_type": "Q8_0", "device": "jetson-agx-orin-64gb"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = sshd.start(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def built(tiny_build, tmp_path_factory):
    """A copy of the build (bench writes its results into the folder)."""
    out, _ = tiny_build(**BUILD)
    return Path(shutil.copytree(out, tmp_path_factory.mktemp("deploy") / "build"))


def deploy(built, where, server, *extra, env=None):
    r = succeeded(edgequant("deploy", built, "--to", f"ssh://board{where}", "--json", *extra, env=env or server.env()))
    return json.loads(r.stdout)


def shipped(built) -> list[dict]:
    return json.loads((built / "manifest.json").read_text())["files"]


def check_bench(result: dict, built: Path, seconds: float, repeats: int, runtimes=("llama.cpp", "ort")) -> None:
    """What a bench result must hold: every runtime asked for, rates that the wall clock allows
    (the runs cannot have taken less than they say), a prompt faster per token than decoding,
    memory at least the model's bytes, the device described."""
    runs = {run["runtime"]: run for run in result["results"]}
    assert set(runs) == set(runtimes)
    model_bytes = {"llama.cpp": (built / "model.gguf").stat().st_size,
                   "ort": (built / "onnx" / "model.onnx.data").stat().st_size}
    timed = 0.0
    for runtime, run in runs.items():
        prompt, gen = run["prompt_tokens"], run["gen_tokens"]
        for rate in ("decode_tok_s", "prefill_tok_s", "ttft_s"):
            assert 0 < run[rate]["min"] <= run[rate]["median"] <= run[rate]["max"], (runtime, rate, run[rate])
        assert run["prefill_tok_s"]["median"] > run["decode_tok_s"]["median"]  # a batch beats one token at a time
        timed += (repeats + 1) * (prompt / run["prefill_tok_s"]["max"] + gen / run["decode_tok_s"]["max"])
        assert run["peak_rss_bytes"] > model_bytes[runtime]
        assert run["device"]["cores"] >= 1 and run["device"]["ram_bytes"] > 0
    assert timed < seconds  # the measured runs fit in the time the whole command took


@pytest.mark.parametrize("runtimes", [("llama.cpp", "ort")], ids=["both"])
def test_local_bench_runs_both_runtimes_here(built, runtimes):
    started = time.time()
    result = json.loads(succeeded(edgequant("bench", built, "--repeats", "2", "--threads", "2", "--json")).stdout)
    check_bench(result, built, time.time() - started, 2, runtimes)
    assert all(run["threads"] == 2 for run in result["results"])
    ort = next(run for run in result["results"] if run["runtime"] == "ort")  # ONNX Runtime's rule beside it
    assert ort["predicted"]["memory_bytes"] == pytest.approx(ort["peak_rss_bytes"], rel=0.15)


def test_deploy_verify_and_bench_over_ssh_then_calibrate_the_profile(built, server, tmp_path):
    where = tmp_path / "board dir $(touch pwned)"  # quoting: the name reaches the device as written
    first = deploy(built, where, server)
    assert len(first["copied"]) == len(shipped(built)) + 1  # + the manifest itself
    assert first["sent_bytes"] == sum(f["bytes"] for f in shipped(built)) + (built / "manifest.json").stat().st_size
    assert not (tmp_path / "pwned").exists() and (where / "model.gguf").is_file()
    again = deploy(built, where, server)
    assert again["sent_bytes"] == 0 and len(again["skipped"]) == len(first["copied"])
    succeeded(edgequant("verify", built, "--to", f"ssh://board{where}", env=server.env()))

    started = time.time()
    r = succeeded(edgequant("bench", built, "--target", f"ssh://board{where}", "--python", sys.executable,
                            "--threads", "2", "--repeats", "2", "--calibrate-profile", "--json", env=server.env()))
    result = json.loads(r.stdout)
    check_bench(result, built, time.time() - started, 2)
    assert {k: v for k, v in json.loads((built / "bench.json").read_text()).items()} == \
        {k: v for k, v in result.items() if k != "calibrated_profile"}
    assert json.loads((built / "report.json").read_text())["bench"]["predicted"]["decode_tok_s"] > 0
    page = (built / "report.html").read_text()  # the page is made again with the measurements
    llama = next(run for run in result["results"] if run["runtime"] == "llama.cpp")
    assert "Measured on ssh://" in page and f"{llama['decode_tok_s']['median']:.1f}" in page

    # --calibrate-profile: the profile now predicts what was measured
    calibrated = load_device(result["calibrated_profile"])
    board = load_device(BUILD["device"])
    predicted = json.loads((built / "report.json").read_text())["predicted"]  # made with the board's profile
    # the bytes a token reads, each type at its kernel's decode cost (the short bench's KV cache left out)
    read_per_token = board.effective_bandwidth / predicted["decode_tok_s"] - predicted["kv_cache_bytes"]
    assert calibrated.effective_bandwidth / read_per_token == pytest.approx(llama["decode_tok_s"]["median"], rel=0.01)
    assert "measured by edgequant bench on ssh://" in calibrated.sources["decode_efficiency"]
    assert (calibrated.name, calibrated.usable_gb, calibrated.bandwidth_gbs) == (board.name, board.usable_gb, board.bandwidth_gbs)


def test_a_fleet_is_benched_at_once_and_an_unreachable_target_is_one_row(built, server, tmp_path):
    """Two targets on the loopback server and one that refuses connections: two results, each with
    its calibrated profile, and one one-line failure; the command succeeds."""
    folder = Path(shutil.copytree(built, tmp_path / "build"))
    a, b = tmp_path / "board-a", tmp_path / "board-b"
    targets = [f"ssh://board{a}", f"ssh://board{b}", "ssh://nobody@127.0.0.1:1/~/edgequant"]
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("".join(f'[[target]]\nname = "{n}"\nprofile = "{BUILD["device"]}"\nat = "{t}"\n'
                             for n, t in zip(("a", "b", "gone"), targets)))
    copied = json.loads(succeeded(edgequant("deploy", folder, "--fleet", fleet, "--json", env=server.env())).stdout)
    assert ["error" in row for row in copied["targets"]] == [False, False, True]
    assert (a / "model.gguf").is_file() and (b / "model.gguf").is_file()

    r = succeeded(edgequant("bench", folder, "--fleet", fleet, "--runtime", "llama.cpp", "--python", sys.executable,
                            "--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "8", "--calibrate-profile", "--json",
                            env=server.env()))
    rows = {row["member"]: row for row in json.loads(r.stdout)["targets"]}
    for name in ("a", "b"):
        run = rows[name]["result"]["results"][0]
        assert run["runtime"] == "llama.cpp" and run["decode_tok_s"]["median"] > 0
        calibrated = load_device(rows[name]["calibrated_profile"])
        assert calibrated.name == BUILD["device"]
        assert "measured by edgequant bench on ssh://" in calibrated.sources["decode_efficiency"]
    gone = rows["gone"]["error"]
    assert "\n" not in gone and "127.0.0.1" in gone
    page = (folder / "report.html").read_text()
    assert "Speed on each device of a fleet" in page and page.count("<h3>") == 3 and "Not measured: " in page


def test_a_decode_rate_the_profile_cannot_explain_writes_no_profile(built, tmp_path):
    from edgequant.benchmark import _weights_read_per_token, calibrate_profile
    from edgequant.errors import EdgequantError

    folder = shutil.copytree(built, tmp_path / "build")
    (folder / "device.calibrated.toml").unlink(missing_ok=True)
    report = json.loads((folder / "report.json").read_text())
    pi5 = load_device("raspberry-pi-5-8gb")
    report["device"] = pi5.as_dict()
    (folder / "report.json").write_text(json.dumps(report))
    too_fast = 1.6 * pi5.bandwidth_gbs * 1e9 / _weights_read_per_token(folder / "model.gguf")  # 1.6x its bandwidth
    measured = {"target": "ssh://pi5/~/m", "results": [{"runtime": "llama.cpp", "decode_tok_s": {"median": too_fast}}]}
    with pytest.raises(EdgequantError, match="fits in the CPU's caches"):
        calibrate_profile(folder, measured)
    assert not (folder / "device.calibrated.toml").exists()


def test_killed_copy_resumes_without_resending_finished_files(built, server, tmp_path):
    where = tmp_path / "board"
    proc = subprocess.Popen([sys.executable, "-m", "edgequant.cli", "deploy", built, "--to", f"ssh://board{where}", "-q"],
                            env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    biggest = max(shipped(built), key=lambda f: f["bytes"])
    part = where / Path(biggest["path"]).parent / f".{Path(biggest['path']).name}.part"
    deadline = time.time() + 120
    while not (part.exists() and part.stat().st_size > 1 << 20) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert part.exists(), "the copy finished before it could be interrupted"
    finished = {f["path"] for f in shipped(built) if (where / f["path"]).is_file()}
    assert not (where / biggest["path"]).exists()  # never a half file under the final name
    result = deploy(built, where, server)
    assert biggest["path"] in result["resumed"]
    assert finished <= set(result["skipped"])
    assert result["sent_bytes"] < sum(f["bytes"] for f in shipped(built))
    succeeded(edgequant("verify", built, "--to", f"ssh://board{where}", env=server.env()))


def test_a_file_corrupted_on_the_device_is_found_by_verify_and_fixed_by_deploy(built, server, tmp_path):
    where = tmp_path / "board"
    deploy(built, where, server)
    data = bytearray((where / "model.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (where / "model.gguf").write_bytes(data)
    r = edgequant("verify", built, "--to", f"ssh://board{where}", env=server.env())
    assert r.returncode == 1 and "DIFFERENT model.gguf" in r.stdout
    assert deploy(built, where, server)["copied"] == ["model.gguf"]
    succeeded(edgequant("verify", built, "--to", f"ssh://board{where}", env=server.env()))


def test_transport_faults_are_one_line_errors(built, server, tmp_path, bad_input_messages):
    where = tmp_path / "board"
    to = f"ssh://board{where}"
    refused = server.client_config("refused", Port=str(sshd.free_port()))
    wrong_key = server.client_config("wrong_key", IdentityFile=str(server.root / "other_key"))
    (server.root / "empty_known_hosts").write_text("")
    unknown_host = server.client_config("unknown_host", UserKnownHostsFile=str(server.root / "empty_known_hosts"))
    unreachable = server.client_config("unreachable", HostName="board.invalid")  # .invalid never resolves (RFC 2606)
    cases = {"connection refused": refused, "authentication failed": wrong_key, "not in known_hosts": unknown_host,
             "unreachable": unreachable}
    for words, config in cases.items():
        message = assert_clean_failure(edgequant("deploy", built, "--to", to, env=server.env(config)), words)
        bad_input_messages[f"deploy: ssh {words}"] = message.removeprefix("edgequant: error: ")
    assert not where.exists() or not any(where.iterdir())


def test_full_device_leaves_no_file_under_its_final_name(built, server, tmp_path):
    where = tmp_path / "board"
    where.mkdir()
    os.symlink("/dev/full", where / ".model.gguf.part")  # writes there fail with ENOSPC, as on a full disk
    assert_clean_failure(edgequant("deploy", built, "--to", f"ssh://board{where}", "--quiet", env=server.env()), "full")
    assert not (where / "model.gguf").exists() and not os.path.lexists(where / ".model.gguf.part")


def test_target_without_runtimes_or_python(built, server, tmp_path):
    where = tmp_path / "board"
    deploy(built, where, server)
    bare = tmp_path / "bare-venv"
    venv.create(bare, with_pip=False)  # a Python with neither llama-cpp-python nor onnxruntime
    to = f"ssh://board{where}"
    assert_clean_failure(edgequant("bench", built, "--target", to, "--python", bare / "bin" / "python", env=server.env()),
                         "no runtime", "pip install llama-cpp-python")
    assert_clean_failure(edgequant("bench", built, "--target", to, "--python", tmp_path / "no-python", env=server.env()),
                         "cannot start")
    fresh = tmp_path / "not-deployed"
    assert_clean_failure(edgequant("bench", built, "--target", f"ssh://board{fresh}", env=server.env()), "deploy")


def test_manifest_hashes_the_shipped_files_and_local_verify_catches_one_changed_byte(built, tmp_path):
    from edgequant.deployment import sha256

    manifest = json.loads((built / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"model.gguf", "plan.json", "onnx/model.onnx", "onnx/model.onnx.data"}
    for f in manifest["files"]:
        assert sha256(built / f["path"]) == f["sha256"] and (built / f["path"]).stat().st_size == f["bytes"]
    assert all(manifest["versions"][k] for k in ("edgequant", "torch", "transformers", "gguf", "onnxruntime", "llama-cpp-python"))
    succeeded(edgequant("verify", built))
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    with open(copy / "model.gguf", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    r = edgequant("verify", copy)
    assert_clean_failure(r, "does not match the manifest")
    assert "DIFFERENT model.gguf" in r.stdout


# ------------------------------------------------------------------ adb, through a stand-in device

STAND_IN_ADB = """#!/bin/sh
# A stand-in for Android's adb: "the device" (serial emulator-5554, the only one) is this machine.
# adb [-s SERIAL] shell CMD runs CMD with sh; adb [-s SERIAL] exec-in CMD does too, stdin passed
# through untouched; both exit with CMD's status, as adb's shell protocol does.
if [ "$1" = "-s" ]; then
  if [ "$2" != "emulator-5554" ]; then echo "adb: device '$2' not found" >&2; exit 1; fi
  shift 2
fi
case "$1" in
  shell|exec-in) cmd=$2; exec sh -c "$cmd" ;;
  *) echo "adb: unknown command $1" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def adb_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(STAND_IN_ADB)
    (bin_dir / "adb").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_deploy_verify_resume_and_bench_over_adb(built, adb_env, tmp_path, bad_input_messages):
    where = tmp_path / "phone"
    to = f"adb://emulator-5554{where}"
    first = json.loads(succeeded(edgequant("deploy", built, "--to", to, "--json", env=adb_env)).stdout)
    assert len(first["copied"]) == len(shipped(built)) + 1 and (where / "model.gguf").is_file()
    succeeded(edgequant("verify", built, "--to", to, env=adb_env))

    # a half-copied file (what a cut cable leaves) is resumed, not sent again
    size = (where / "model.gguf").stat().st_size
    (where / "model.gguf").rename(where / ".model.gguf.part")
    os.truncate(where / ".model.gguf.part", size // 2)
    again = json.loads(succeeded(edgequant("deploy", built, "--to", to, "--json", env=adb_env)).stdout)
    assert again["resumed"] == ["model.gguf"] and again["sent_bytes"] == size - size // 2

    # a byte changed on the phone: verify exits 1, deploy mends it
    with open(where / "model.gguf", "r+b") as f:
        f.seek(size // 3)
        byte = f.read(1)
        f.seek(size // 3)
        f.write(bytes([byte[0] ^ 1]))
    r = edgequant("verify", built, "--to", to, env=adb_env)
    assert r.returncode == 1 and "DIFFERENT model.gguf" in r.stdout
    succeeded(edgequant("deploy", built, "--to", to, env=adb_env))

    started = time.time()
    result = json.loads(succeeded(edgequant("bench", built, "--target", to, "--python", sys.executable, "--repeats", "1",
                                            "--json", env=adb_env)).stdout)
    check_bench(result, built, time.time() - started, 1)
    assert result["target"] == to

    message = assert_clean_failure(edgequant("deploy", built, "--to", f"adb://R5CT10ABC{where}", env=adb_env), "not found")
    bad_input_messages["deploy: adb device not connected"] = message.removeprefix("edgequant: error: ")


# --------------------------------------------------------------------------- targets and quoting

NASTY = "/data/local/tmp/a b/it's; rm -rf ~ $(reboot)"


def test_targets_parse():
    assert parse_target("local") == Target("local")
    assert parse_target("ssh://pi@rpi5.lan:2222/~/models") == Target("ssh", "rpi5.lan", "pi", 2222, "models")
    assert parse_target("ssh://jetson/opt/edgequant") == Target("ssh", "jetson", None, None, "/opt/edgequant")
    assert parse_target("ssh://jetson") == Target("ssh", "jetson", None, None, "edgequant")
    assert parse_target("adb://") == Target("adb", None, None, None, "/data/local/tmp/edgequant")
    assert parse_target("adb://R5CT10ABC/sdcard/m") == Target("adb", "R5CT10ABC", None, None, "/sdcard/m")
    for bad in ("ftp://x/y", "ssh:///nohost", "ssh://h:notaport/x", "board:/x"):
        with pytest.raises(Exception, match="target"):
            parse_target(bad)


def test_ssh_commands_quote_every_argument():
    cmd = Ssh(parse_target("ssh://pi@rpi5:2222/x")).command(["sha256sum", "--", NASTY])
    assert cmd[:1] == ["ssh"] and "BatchMode=yes" in cmd and "StrictHostKeyChecking=yes" in cmd
    assert cmd[cmd.index("-p") + 1] == "2222" and cmd[cmd.index("-l") + 1] == "pi"
    assert cmd[-2:-1] == ["rpi5"] and shlex.split(cmd[-1]) == ["sha256sum", "--", NASTY]


def test_adb_commands_quote_every_argument():
    adb = Adb(parse_target("adb://R5CT10ABC/data/local/tmp/eq"))
    cmd = adb.command(["mv", "-f", "--", NASTY, "/data/local/tmp/eq/model.gguf"])
    assert cmd[:4] == ["adb", "-s", "R5CT10ABC", "shell"] and len(cmd) == 5
    assert shlex.split(cmd[4]) == ["mv", "-f", "--", NASTY, "/data/local/tmp/eq/model.gguf"]
    up = adb.upload_command(NASTY)
    assert up[:4] == ["adb", "-s", "R5CT10ABC", "exec-in"]
    assert shlex.split(up[4]) == ["sh", "-c", 'cat >> "$1"', "edgequant", NASTY]
    assert Adb(parse_target("adb://")).command(["true"])[:2] == ["adb", "shell"]  # the only device

"""deploy / verify / bench against a real OpenSSH server on 127.0.0.1, with the default model's build."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from runtimes.remote import Adb, Ssh, Target, parse_target
from tests import sshd
from tests.conftest import MIXED
from tests.test_bad_inputs import assert_clean_failure


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = sshd.start(tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def built(build_default):
    out, _ = build_default(**MIXED)
    return out


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgequant.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)


def deploy(built, where, server, *extra, env=None):
    r = cli("deploy", built, "--to", f"ssh://board{where}", "--json", *extra, env=env or server.env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def shipped(built) -> list[dict]:
    return json.loads((built / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_deploy_verify_and_bench_over_ssh(built, server, tmp_path):
    where = tmp_path / "board dir $(touch pwned)"  # quoting: the name reaches the device as written
    first = deploy(built, where, server)
    assert len(first["copied"]) == len(shipped(built)) + 1  # + the manifest itself
    assert first["sent_bytes"] == sum(f["bytes"] for f in shipped(built)) + (built / "manifest.json").stat().st_size
    assert not (tmp_path / "pwned").exists() and (where / "model.gguf").is_file()
    again = deploy(built, where, server)
    assert again["sent_bytes"] == 0 and len(again["skipped"]) == len(first["copied"])
    assert cli("verify", built, "--to", f"ssh://board{where}", env=server.env()).returncode == 0

    r = cli("bench", built, "--target", f"ssh://board{where}", "--python", sys.executable, "--threads", "2",
            "--repeats", "2", "--json", env=server.env())
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    runs = {run["runtime"]: run for run in result["results"]}
    assert set(runs) == {"llama.cpp", "ort"}
    model_bytes = {"llama.cpp": (built / "model.gguf").stat().st_size,
                   "ort": (built / "onnx" / "model.onnx.data").stat().st_size}
    for runtime, run in runs.items():
        assert run["decode_tok_s"]["median"] > 0 and run["prefill_tok_s"]["median"] > 0
        assert run["decode_tok_s"]["min"] <= run["decode_tok_s"]["median"] <= run["decode_tok_s"]["max"]
        assert run["peak_rss_bytes"] > model_bytes[runtime]
        assert run["threads"] == 2 and run["device"]["cores"] >= 1 and run["device"]["ram_bytes"] > 0
    assert json.loads((built / "bench.json").read_text()) == result
    assert json.loads((built / "report.json").read_text())["bench"]["predicted"]["decode_tok_s"] > 0
    page = (built / "report.html").read_text()  # the page is made again with the measurements
    assert "Measured on ssh://" in page and f"{runs['llama.cpp']['decode_tok_s']['median']:.1f}" in page


@pytest.mark.slow
def test_local_bench_runs_both_runtimes_here(built):
    r = cli("bench", built, "--runtime", "llama.cpp", "--repeats", "1", "--gen-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["results"]
    assert run["runtime"] == "llama.cpp" and run["decode_tok_s"]["median"] > 0


@pytest.mark.slow
def test_killed_copy_resumes_without_resending_finished_files(built, server, tmp_path):
    where = tmp_path / "board"
    proc = subprocess.Popen([sys.executable, "-m", "edgequant.cli", "deploy", built, "--to", f"ssh://board{where}", "-q"],
                            env=server.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    biggest = max(shipped(built), key=lambda f: f["bytes"])
    part = where / Path(biggest["path"]).parent / f".{Path(biggest['path']).name}.part"
    deadline = time.time() + 120
    while not (part.exists() and part.stat().st_size > 1 << 20) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert part.exists(), "the copy finished before it could be interrupted"
    finished = {f["path"] for f in shipped(built) if (where / f["path"]).is_file()}
    assert not (where / biggest["path"]).exists()  # never a half file under the final name
    result = deploy(built, where, server)
    assert biggest["path"] in result["resumed"]
    assert finished <= set(result["skipped"])
    assert result["sent_bytes"] < sum(f["bytes"] for f in shipped(built))
    assert cli("verify", built, "--to", f"ssh://board{where}", env=server.env()).returncode == 0


@pytest.mark.slow
def test_a_file_corrupted_on_the_device_is_found_by_verify_and_fixed_by_deploy(built, server, tmp_path):
    where = tmp_path / "board"
    deploy(built, where, server)
    data = bytearray((where / "model.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (where / "model.gguf").write_bytes(data)
    r = cli("verify", built, "--to", f"ssh://board{where}", env=server.env())
    assert r.returncode != 0 and "DIFFERENT model.gguf" in r.stdout
    assert deploy(built, where, server)["copied"] == ["model.gguf"]
    assert cli("verify", built, "--to", f"ssh://board{where}", env=server.env()).returncode == 0


@pytest.mark.slow
def test_transport_faults_are_one_line_errors(built, server, tmp_path):
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
        assert_clean_failure(cli("deploy", built, "--to", to, env=server.env(config)), words)
    assert not where.exists() or not any(where.iterdir())


@pytest.mark.slow
def test_full_device_leaves_no_file_under_its_final_name(built, server, tmp_path):
    where = tmp_path / "board"
    where.mkdir()
    os.symlink("/dev/full", where / ".model.gguf.part")  # writes there fail with ENOSPC, as on a full disk
    assert_clean_failure(cli("deploy", built, "--to", f"ssh://board{where}", "--quiet", env=server.env()), "full")
    assert not (where / "model.gguf").exists() and not os.path.lexists(where / ".model.gguf.part")


@pytest.mark.slow
def test_target_without_runtimes_or_python(built, server, tmp_path):
    where = tmp_path / "board"
    deploy(built, where, server)
    bare = tmp_path / "bare-venv"
    venv.create(bare, with_pip=False)  # a Python with neither llama-cpp-python nor onnxruntime
    to = f"ssh://board{where}"
    assert_clean_failure(cli("bench", built, "--target", to, "--python", bare / "bin" / "python", env=server.env()),
                         "no runtime", "pip install llama-cpp-python")
    assert_clean_failure(cli("bench", built, "--target", to, "--python", tmp_path / "no-python", env=server.env()),
                         "cannot start")
    fresh = tmp_path / "not-deployed"
    assert_clean_failure(cli("bench", built, "--target", f"ssh://board{fresh}", env=server.env()), "deploy")


# --------------------------------------------------------------------------- targets and quoting (no device)

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


@pytest.mark.slow
def test_calibrated_profile_carries_the_measured_decode_efficiency(built, tmp_path):
    from edgequant.benchmark import calibrate_profile
    from edgequant.devices import load_device

    jetson = load_device("jetson-orin")
    folder = tmp_path / "build"
    folder.mkdir()
    os.symlink(built / "model.gguf", folder / "model.gguf")
    (folder / "report.json").write_text(json.dumps({"device": jetson.as_dict()}))
    measured = {"target": "ssh://jetson/~/m", "results": [{"runtime": "llama.cpp", "decode_tok_s": {"median": 100.0}}]}
    calibrated = load_device(str(calibrate_profile(folder, measured)))
    weights = (built / "model.gguf").stat().st_size  # tied embeddings: the whole file is read per token
    assert calibrated.decode_efficiency == pytest.approx(100.0 * weights / (jetson.bandwidth_gbs * 1e9), abs=1e-3)
    assert calibrated.effective_bandwidth / weights == pytest.approx(100.0, rel=0.01)  # the planner now predicts it
    assert "measured by edgequant bench" in calibrated.sources["decode_efficiency"]
    assert (calibrated.name, calibrated.usable_gb) == (jetson.name, jetson.usable_gb)


@pytest.mark.slow
def test_manifest_hashes_the_shipped_files_and_local_verify_catches_one_changed_byte(built, tmp_path):
    import shutil

    from edgequant.deployment import sha256

    manifest = json.loads((built / "manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"model.gguf", "plan.json", "onnx/model.onnx", "onnx/model.onnx.data"}
    for f in manifest["files"]:
        assert sha256(built / f["path"]) == f["sha256"] and (built / f["path"]).stat().st_size == f["bytes"]
    assert all(manifest["versions"][k] for k in ("edgequant", "torch", "transformers", "gguf", "onnxruntime", "llama-cpp-python"))
    assert cli("verify", built).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    with open(copy / "model.gguf", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    r = cli("verify", copy)
    assert_clean_failure(r, "does not match the manifest")
    assert "DIFFERENT model.gguf" in r.stdout

"""A model split across several devices: the plan of the split, and the fleet file.

What llama.cpp does with the split (logits, memory, a worker lost) is in ``test_rpc.py``."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from edgequant.errors import EdgequantError
from edgequant.fleet import layer_owners, load_fleet, tensor_split
from tests.helpers import assert_clean_failure, in_process, succeeded

PROFILES = Path(__file__).resolve().parent.parent / "device_profiles"
Q8_0 = ("--type", "Q8_0", "--quiet")  # a plan that needs no measuring


def small_board(folder: Path, usable_gb: float, name: str = "small-board") -> Path:
    """A Raspberry Pi 5 profile with only ``usable_gb`` GiB for the model."""
    text = (PROFILES / "raspberry-pi-5-8gb.toml").read_text()
    text = re.sub(r'(?m)^name = ".*"', f'name = "{name}"', text, count=1)
    text = re.sub(r"(?m)^usable_gb = [0-9.]+", f"usable_gb = {usable_gb}", text, count=1)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def test_layers_are_dealt_out_as_llama_cpp_deals_them():
    # llama-model.cpp: 32 blocks and the output layer over "-ts 1,1": blocks 0-16 to the first
    # device, 17-31 and the output to the second
    owners = layer_owners(32, [1, 1])
    assert owners == [0] * 17 + [1] * 16
    assert layer_owners(3, [1, 0, 1]) == [0, 0, 2, 2]  # a device with no share gets nothing


def test_the_tensor_split_given_to_llama_cpp_reproduces_the_plan_s_split():
    rng = random.Random(0)
    for _ in range(200):
        n_layer = rng.randint(1, 80)
        shares = [rng.uniform(0.5, 16) for _ in range(rng.randint(1, 5))]
        owners = layer_owners(n_layer, shares)
        assert layer_owners(n_layer, tensor_split(owners, len(shares))) == owners


def test_a_fleet_file_names_each_target_s_profile_address_and_link(tmp_path):
    board = small_board(tmp_path, 0.25)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'name = "desk"\n[[target]]\nprofile = "{board.name}"\nrpc = "10.0.0.2:50052"\n'
                     'at = "ssh://pi@10.0.0.2/~/edgequant"\nlink_mbs = 50\nlink_ms = 1.5\n'
                     '[[target]]\nprofile = "raspberry-pi-5-8gb"\nrpc = "10.0.0.3:50052"\n')
    loaded = load_fleet(str(fleet))
    assert loaded.name == "desk"
    first, second = loaded.members
    assert (first.device.name, first.rpc, first.at, first.link_mbs, first.link_ms) == (
        "small-board", "10.0.0.2:50052", "ssh://pi@10.0.0.2/~/edgequant", 50, 1.5)
    assert (second.device.name, second.at) == ("raspberry-pi-5-8gb", "local")
    assert loaded.usable_bytes == first.device.usable_bytes + second.device.usable_bytes
    # the members read their shares one after another: slower than the fastest alone
    assert loaded.effective_bandwidth < max(m.device.effective_bandwidth for m in loaded.members)
    assert loaded.network_seconds(576) > 2 * 1.5e-3


def test_a_link_may_have_no_latency_but_must_move_bytes(tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[target]]\nprofile = "raspberry-pi-5-8gb"\nlink_ms = 0\n')
    assert load_fleet(str(fleet)).members[0].link_ms == 0
    for field, must in (("link_ms = -1", "link_ms' must be a number >= 0"), ("link_mbs = 0", "link_mbs' must be a number > 0")):
        fleet.write_text(f'[[target]]\nprofile = "raspberry-pi-5-8gb"\n{field}\n')
        with pytest.raises(EdgequantError, match=must):
            load_fleet(str(fleet))


@pytest.mark.parametrize("rpc, words", [
    ("0.0.0.0:50052", ["0.0.0.0", "private address"]),
    ("board.local:50052", ["numeric IPv4"]),
    ("10.0.0.2", ["numeric IPv4"]),
])
def test_a_fleet_file_refuses_an_open_or_unusable_server_address(tmp_path, rpc, words):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[target]]\nprofile = "raspberry-pi-5-8gb"\nrpc = "{rpc}"\n')
    with pytest.raises(EdgequantError) as e:
        load_fleet(str(fleet))
    for word in words:
        assert word in str(e.value)


def test_plan_splits_a_model_that_fits_neither_device_alone(default_model, tmp_path):
    board = small_board(tmp_path, 0.3)
    alone = in_process("plan", "--device", board, *Q8_0)
    assert_clean_failure(alone, "does not fit", "small-board")
    both = succeeded(in_process("plan", "--device", f"{board},{board}", *Q8_0, "--json"))
    split = json.loads(both.stdout)["predicted"]["split"]
    first, second = split["members"]
    assert (first["layers"], first["output"]) == ("0-15", False)  # 30 blocks + output, halved
    assert (second["layers"], second["output"]) == ("16-29", True)
    assert all(m["fits"] for m in split["members"])
    assert split["tensor_split"] == [15.5, 15.5]
    table = succeeded(in_process("plan", "--device", f"{board},{board}", *Q8_0)).stdout
    assert "split over 2 devices" in table and "16-29" in table


def test_a_split_that_leaves_one_device_short_names_it(default_model, tmp_path):
    big, tiny = small_board(tmp_path, 1.0, "big-board"), small_board(tmp_path, 0.1, "tiny-board")
    # in proportion to usable memory the tiny board gets the last block and the output layer,
    # whose logits alone (the compute buffer) take more than it has
    result = in_process("plan", "--device", f"{big},{tiny}", *Q8_0)
    assert_clean_failure(result, "does not fit", "tiny-board")


def test_onnx_runtime_runs_a_model_on_one_device_so_a_fleet_build_makes_the_gguf(default_model, tmp_path):
    board = small_board(tmp_path, 0.3)
    asked = in_process("plan", "--device", f"{board},{board}", "--type", "MNB4_B32_SYM", "--quiet")  # an ONNX-only plan
    assert_clean_failure(asked, "ONNX Runtime runs a model on one device", "--formats gguf")

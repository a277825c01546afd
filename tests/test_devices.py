"""Device profiles: the shipped TOML files, the aliases, host detection, and user files."""

import re

import pytest
import tomllib

from edgequant import devices
from edgequant.devices import (
    PROFILE_DIR,
    Device,
    device_names,
    list_devices,
    load_device,
)
from edgequant.errors import EdgequantError
from edgequant.ggml_quants import TYPES

SHIPPED = sorted(p.stem for p in PROFILE_DIR.glob("*.toml") if p.name != "aliases.toml")
ALIASES = {
    "jetson-orin": "jetson-orin-nano-8gb",
    "raspberry-pi": "raspberry-pi-5-8gb",
    "raspberry-pi-4": "raspberry-pi-4-4gb",
    "raspberry-pi-5": "raspberry-pi-5-8gb",
    "android": "android-snapdragon-8-gen-2",
}
README = (PROFILE_DIR / "README.md").read_text()
EXAMPLE = re.search(r"```toml\n(.*?)```", README, re.DOTALL).group(1)


def write(tmp_path, text, name="my-board.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def example_with(**changes) -> str:
    """The README's example profile with some top-level `key = value` lines replaced (None deletes)."""
    text = EXAMPLE
    for key, value in changes.items():
        line = re.compile(rf"^{key} = .*\n", re.MULTILINE)
        assert line.search(text), key
        text = line.sub("" if value is None else f"{key} = {value}\n", text, count=1)
    return text


def load_error(tmp_path, text) -> str:
    with pytest.raises(EdgequantError) as e:
        load_device(str(write(tmp_path, text)))
    message = str(e.value)
    assert "\n" not in message
    return message


# --- shipped profiles -------------------------------------------------------------------------


def test_every_device_the_project_promises_is_shipped():
    assert set(SHIPPED) >= {
        "raspberry-pi-4-4gb", "raspberry-pi-4-8gb", "raspberry-pi-5-4gb", "raspberry-pi-5-8gb",
        "raspberry-pi-5-16gb", "jetson-orin-nano-8gb", "jetson-orin-nano-8gb-super", "jetson-orin-nx-16gb",
        "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "android-snapdragon-8-gen-2",
        "android-snapdragon-8-gen-3", "android-tensor-g3", "android-dimensity-9300",
    }


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_with_a_source_for_every_figure(name):
    d = load_device(name)
    assert d.name == name and d.path == PROFILE_DIR / f"{name}.toml"
    assert 0 < d.usable_gb <= d.ram_gb and d.bandwidth_gbs > 0 and 0 < d.decode_efficiency <= 1
    assert d.usable_bytes == int(d.usable_gb * 2**30)
    assert d.effective_bandwidth == pytest.approx(d.bandwidth_gbs * 1e9 * d.decode_efficiency)
    assert set(d.fast_types) <= set(TYPES)
    figures = list(devices.SOURCED) + (["gpu"] if d.gpu else [])
    assert all(d.sources.get(f, "").strip() for f in figures)
    if "llama.cpp-cuda" in d.runtimes:
        assert d.gpu.compute_capability == "8.7" and d.gpu.unified_memory


def test_datasheet_figures():
    """A few figures checked against the arithmetic of their datasheets (bus width x transfer rate)."""
    assert load_device("raspberry-pi-4-4gb").bandwidth_gbs == pytest.approx(3200e6 * 4 / 1e9)
    assert load_device("raspberry-pi-5-8gb").bandwidth_gbs == pytest.approx(4267e6 * 4 / 1e9, abs=0.01)
    nano, agx64 = load_device("jetson-orin-nano-8gb"), load_device("jetson-agx-orin-64gb")
    assert (nano.bandwidth_gbs, nano.cpu_cores, nano.gpu.cuda_cores) == (68, 6, 1024)
    assert load_device("jetson-orin-nano-8gb-super").bandwidth_gbs == 102
    assert (agx64.bandwidth_gbs, agx64.cpu_cores, agx64.gpu.cuda_cores) == (204.8, 12, 2048)
    assert load_device("android-snapdragon-8-gen-3").bandwidth_gbs == pytest.approx(9600e6 * 8 / 1e9)


def test_phones_keep_to_half_their_ram_and_deploy_over_adb():
    for d in list_devices():
        if d.kind == "phone":
            assert 0.4 <= d.usable_gb / d.ram_gb <= 0.5, d.name
            assert d.transport == "adb"


def test_as_dict_is_json_ready():
    import json

    d = load_device("jetson-orin-nx-16gb").as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["gpu"]["cuda_cores"] == 1024 and d["path"].endswith("jetson-orin-nx-16gb.toml")


# --- names and aliases ------------------------------------------------------------------------


@pytest.mark.parametrize("alias,member", ALIASES.items())
def test_alias_resolves_to_the_documented_member(alias, member):
    assert load_device(alias).name == member
    assert f"| `{alias}` | `{member}` |" in README
    assert f"{alias} -> {member}" in devices.__doc__


def test_aliases_file_holds_exactly_the_documented_aliases():
    assert tomllib.loads((PROFILE_DIR / "aliases.toml").read_text()) == ALIASES


def test_names_list_profiles_host_and_aliases():
    assert device_names() == sorted([*SHIPPED, "host", *ALIASES])
    assert [d.name for d in list_devices()] == sorted([*SHIPPED, "host"])


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(EdgequantError, match=r"^unknown device 'jetsn-orin'; closest: jetson-orin, jetson-orin-"):
        load_device("jetsn-orin")


def test_unknown_name_far_from_everything_lists_known_names():
    with pytest.raises(EdgequantError, match=r"^unknown device 'toaster'; known: .*raspberry-pi-5-8gb"):
        load_device("toaster")


# --- host -------------------------------------------------------------------------------------


def test_host_is_detected_on_this_machine():
    h = load_device("host")
    assert h.name == "host" and h.kind == "host" and h.path is None and h.transport == "local"
    assert h.ram_gb > 0 and 0 < h.usable_gb <= h.ram_gb
    assert h.cpu_cores > 0 and h.bandwidth_gbs > 0 and h.cpu
    assert set(h.fast_types) <= set(TYPES) and "Q8_0" in h.fast_types
    assert h.sources["bandwidth_gbs"].startswith("measured on this machine")
    assert all(h.sources[f].startswith("detected") for f in ("ram_gb", "cpu", "cpu_cores", "isa"))
    assert load_device("host") is h  # detected once per process


def test_the_host_bandwidth_is_measured_once_per_machine(tmp_path, monkeypatch):
    """The copy rate is kept in the cache, so that the same command plans the same file; a kept
    file that cannot be read is measured again."""
    monkeypatch.setenv("EDGEQUANT_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(devices, "_measure_bandwidth", lambda *_: measured.append(1) or (2e10, "a copy"))
    first = devices._host_bandwidth("cpu", 2, 8 << 30, 4 << 30)
    assert devices._host_bandwidth("cpu", 2, 8 << 30, 4 << 30) == first and len(measured) == 1
    assert first[0] == 2e10 and str(tmp_path / "host-bandwidth.json") in first[1]
    devices._host_bandwidth("cpu", 4, 8 << 30, 4 << 30)  # more cores: another machine
    assert len(measured) == 2
    for broken in ("[]", "{", '{"cpu | 2 cores | 8192 MiB | %s": {"bytes_per_s": 0}}' % devices.BANDWIDTH_METHOD):
        (tmp_path / "host-bandwidth.json").write_text(broken)
        assert devices._host_bandwidth("cpu", 2, 8 << 30, 4 << 30)[0] == 2e10
    assert len(measured) == 5


def test_host_isa_from_cpuinfo_flags():
    assert devices._host_isa("fp asimd asimddp fphp asimdhp i8mm bf16") == ("neon", "dotprod", "fp16", "i8mm", "bf16")
    assert devices._host_isa("sse4_2 avx avx2 fma avx512f avx512_vnni amx_int8") == (
        "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_int8")
    assert devices._host_fast_types(("neon", "dotprod")) == ("Q8_0", "Q6_K", "Q4_K", "Q4_0", "IQ4_NL")


# --- user files -------------------------------------------------------------------------------


def test_readme_example_loads_by_path(tmp_path):
    d = load_device(str(write(tmp_path, EXAMPLE)))
    assert isinstance(d, Device) and d.name == "my-board" and d.bandwidth_gbs == 34.1
    assert d.path == tmp_path / "my-board.toml"


def test_a_path_is_anything_with_a_slash_or_toml_suffix(tmp_path, monkeypatch):
    write(tmp_path, EXAMPLE, "board.toml")
    monkeypatch.chdir(tmp_path)
    assert load_device("board.toml").name == "my-board"
    with pytest.raises(EdgequantError, match=r"^device profile ./nope.toml not found$"):
        load_device("./nope.toml")


def test_bad_type_names_file_and_field(tmp_path):
    message = load_error(tmp_path, example_with(bandwidth_gbs='"fast"'))
    assert message == f"{tmp_path}/my-board.toml: field 'bandwidth_gbs' must be a number > 0, got 'fast'"


@pytest.mark.parametrize("change,field", [
    ({"cpu_cores": "2.5"}, "cpu_cores"),
    ({"decode_efficiency": "1.5"}, "decode_efficiency"),
    ({"usable_gb": "9"}, "usable_gb"),
    ({"kind": '"laptop"'}, "kind"),
    ({"transport": '"usb"'}, "transport"),
    ({"fast_types": '["Q4_K_M"]'}, "fast_types"),
    ({"runtimes": '["tensorrt"]'}, "runtimes"),
    ({"isa": '["dotprd"]'}, "isa"),
])
def test_bad_values_name_the_field(tmp_path, change, field):
    assert f"field '{field}' must be" in load_error(tmp_path, example_with(**change))


def test_missing_field(tmp_path):
    assert load_error(tmp_path, example_with(cpu_ghz=None)).endswith(": missing field 'cpu_ghz'")


def test_unknown_field_suggests_the_right_one(tmp_path):
    text = EXAMPLE.replace("bandwidth_gbs =", "bandwith_gbs =")
    assert load_error(tmp_path, text).endswith("unknown field 'bandwith_gbs' (did you mean 'bandwidth_gbs'?)")


def test_figure_without_a_source(tmp_path):
    text = re.sub(r"^ram_gb = \"Orange Pi 5 user manual\"\n", "", EXAMPLE, flags=re.MULTILINE)
    assert "field 'ram_gb' has no source" in load_error(tmp_path, text)


def test_empty_source(tmp_path):
    text = EXAMPLE.replace('cpu_ghz = "Rockchip RK3588S datasheet"', 'cpu_ghz = ""')
    assert "sources.cpu_ghz must be a non-empty string" in load_error(tmp_path, text)


def test_bad_gpu_field(tmp_path):
    text = EXAMPLE.replace("unified_memory = true", 'unified_memory = "yes"')
    assert "field 'gpu.unified_memory' must be true or false, got 'yes'" in load_error(tmp_path, text)


def test_cuda_runtime_needs_a_cuda_gpu(tmp_path):
    message = load_error(tmp_path, example_with(runtimes='["llama.cpp-cuda"]'))
    assert "runtime 'llama.cpp-cuda' needs a [gpu] table with compute_capability" in message


def test_toml_syntax_error_gives_the_line(tmp_path):
    text = EXAMPLE.replace('kind = "sbc"', "kind = sbc")
    message = load_error(tmp_path, text)
    assert "my-board.toml: not valid TOML:" in message and "line 3" in message

"""Device profiles: what an edge device can hold and how fast it reads memory, as data.

Each shipped device is one TOML file in the repository's ``device_profiles/`` folder, named
after the device (``raspberry-pi-5-8gb.toml``); ``device_profiles/README.md`` documents every
field and its unit. Every figure in a profile names its source (a datasheet, or
``estimate: <reason>``) in the file's ``[sources]`` table, and loading fails when one is missing.

``host`` is not a file: it is this machine, detected when first loaded (RAM from
/proc/meminfo and the cgroup limit, cores from the CPU affinity, ISA from /proc/cpuinfo, memory
bandwidth measured by a short numpy copy benchmark, once per machine: the rate is kept in the
cache's ``host-bandwidth.json``), then cached for the process.

Family aliases, defined in ``device_profiles/aliases.toml`` (each picks a representative,
the smallest or most common member, so a plan made for it fits the family's usual board):

    jetson-orin -> jetson-orin-nano-8gb
    raspberry-pi -> raspberry-pi-5-8gb
    raspberry-pi-4 -> raspberry-pi-4-4gb
    raspberry-pi-5 -> raspberry-pi-5-8gb
    android -> android-snapdragon-8-gen-2

Units: ``ram_gb``/``usable_gb`` are GiB (2**30 bytes, as RAM is sold); ``bandwidth_gbs`` is
decimal GB/s (1e9 bytes/s, as datasheets give it).

    load_device("jetson-orin")          # alias -> jetson-orin-nano-8gb
    load_device("host")                 # this machine
    load_device("./my-board.toml")      # a user's own profile (anything with "/" or ".toml")
"""

from __future__ import annotations

import difflib
import functools
import os
import platform
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

from .errors import EdgequantError
from .ggml_quants import TYPES

PROFILE_DIR: Path = Path(__file__).resolve().parent.parent / "device_profiles"
ALIASES_FILE = "aliases.toml"
HOST = "host"
GIB = 1 << 30
# Prefill is compute bound: cores x GHz x the MACs per cycle of the widest integer dot product,
# at a rough 30% of peak.
INT8_OPS_PER_CYCLE = {"i8mm": 128, "amx": 1024, "avx512_vnni": 128, "dotprod": 64, "avx2": 64}
COMPUTE_EFFICIENCY = 0.3

KINDS = ("sbc", "jetson", "phone", "host")
TRANSPORTS = ("local", "ssh", "adb")
RUNTIMES = ("llama.cpp-cpu", "llama.cpp-cuda", "llama.cpp-vulkan", "ort-cpu", "ort-cuda", "ort-nnapi", "ort-qnn")
CUDA_RUNTIMES = ("llama.cpp-cuda", "ort-cuda")
# ISA features a profile may list; on x86 also any avx512* and amx* flag.
ISA_FEATURES = ("neon", "dotprod", "i8mm", "fp16", "bf16", "sve", "sve2", "sme", "avx", "avx2", "fma", "f16c", "avx_vnni")
ISA_PREFIXES = ("avx512", "amx")

# Fields that are facts or estimates about the hardware: each needs an entry in [sources].
SOURCED = ("ram_gb", "usable_gb", "bandwidth_gbs", "decode_efficiency", "cpu", "cpu_cores", "cpu_ghz", "isa",
           "runtimes", "fast_types")
# Choices rather than figures: a source may be given but is not required.
UNSOURCED = ("default_ctx", "transport")


@dataclass(frozen=True)
class Gpu:
    name: str
    cuda_cores: int | None
    compute_capability: str | None  # CUDA compute capability, e.g. "8.7"; None for non-NVIDIA GPUs
    unified_memory: bool  # shares the board's RAM with the CPU (Jetson, phones)
    tops: float | None = None  # INT8 (sparse) TOPS as the vendor rates the module, if given


@dataclass(frozen=True)
class Device:
    name: str
    title: str
    kind: str  # one of KINDS
    ram_gb: float  # total RAM, GiB
    usable_gb: float  # share one model may use after OS/desktop/runtime, GiB
    bandwidth_gbs: float  # peak memory bandwidth, GB/s (measured copy rate for host)
    decode_efficiency: float  # fraction of bandwidth_gbs that token decoding reaches
    cpu: str
    cpu_cores: int
    cpu_ghz: float  # highest core clock
    isa: tuple[str, ...]
    gpu: Gpu | None
    runtimes: tuple[str, ...]
    fast_types: tuple[str, ...]  # ggml types with fast kernels here (names from ggml_quants.TYPES)
    default_ctx: int
    transport: str  # how `edgequant deploy` reaches it: local | ssh | adb
    sources: dict[str, str] = field(hash=False)
    path: Path | None  # the profile file (None for host)

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_gb * GIB)

    @property
    def effective_bandwidth(self) -> float:
        """Bytes per second that decoding reads weights at: bandwidth_gbs * 1e9 * decode_efficiency."""
        return self.bandwidth_gbs * 1e9 * self.decode_efficiency

    @property
    def int8_ops_per_s(self) -> float:
        """A rough int8 throughput of the CPU, which prefill is bound by."""
        per_cycle = max((INT8_OPS_PER_CYCLE[f] for f in self.isa if f in INT8_OPS_PER_CYCLE), default=32)
        return self.cpu_cores * self.cpu_ghz * 1e9 * per_cycle * 2 * COMPUTE_EFFICIENCY

    def runtime_bytes(self, shape, ctx: int) -> int:
        """Memory besides the weights (``shape``: a :class:`edgequant.budget.Shape`)."""
        return shape.kv_bytes(ctx) + shape.overhead_bytes(ctx)

    def network_seconds(self, hidden: int) -> float:
        """Per token, time spent on the network: none on one device."""
        return 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in ("isa", "runtimes", "fast_types"):
            d[key] = list(d[key])
        d["sources"] = dict(self.sources)
        d["path"] = str(self.path) if self.path is not None else None
        return d


# ---------------------------------------------------------------------------------------------
# Public API


def load_device(name_or_path: str) -> Device:
    """A device by name, alias, ``host``, or path to a .toml profile (contains "/" or ends .toml)."""
    text = str(name_or_path).strip()
    if "/" in text or os.sep in text or text.endswith(".toml"):
        path = Path(text).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "not found"
            raise EdgequantError(f"device profile {text} {what}")
        return _load_profile(path, label=text)
    key = text.lower()
    if key == HOST:
        return detect_host()
    key = _aliases().get(key, key)
    files = _profile_files()
    if key in files:
        return _load_profile(files[key], label=f"device_profiles/{files[key].name}")
    raise EdgequantError(_unknown_device_message(text))


def list_devices() -> list[Device]:
    """Every shipped profile plus host, sorted by name."""
    devices = [load_device(name) for name in _profile_files()] + [detect_host()]
    return sorted(devices, key=lambda d: d.name)


def device_names() -> list[str]:
    """Profile names, ``host`` and the family aliases, sorted."""
    return sorted([*_profile_files(), HOST, *_aliases()])


# ---------------------------------------------------------------------------------------------
# Shipped files


def _profile_files() -> dict[str, Path]:
    if not PROFILE_DIR.is_dir():
        raise EdgequantError(f"device profiles folder {PROFILE_DIR} is missing (install edgequant from its repository)")
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml")) if p.name != ALIASES_FILE}


def _aliases() -> dict[str, str]:
    path = PROFILE_DIR / ALIASES_FILE
    if not path.is_file():
        return {}
    label = f"device_profiles/{ALIASES_FILE}"
    data = _read_toml(path, label)
    for alias, target in data.items():
        if not isinstance(target, str):
            raise EdgequantError(f"{label}: alias {alias!r} must name a device (a string), got {target!r}")
    return {alias.lower(): target.lower() for alias, target in data.items()}


def _unknown_device_message(name: str) -> str:
    known = [*_profile_files(), HOST, *_aliases()]
    close = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    if close:
        return f"unknown device {name!r}; closest: {', '.join(close)}"
    return f"unknown device {name!r}; known: {', '.join(sorted(known))} (or a path to a .toml profile)"


# ---------------------------------------------------------------------------------------------
# Reading and validating one profile file


def _read_toml(path: Path, label: str) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise EdgequantError(f"{label}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise EdgequantError(f"{label}: not valid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise EdgequantError(f"{label}: cannot read: {e.strerror or e}") from None


class _Checker:
    """Reads typed fields out of a TOML table, raising one-line errors naming file and field."""

    def __init__(self, table: dict, label: str, prefix: str = ""):
        self.table, self.label, self.prefix = table, label, prefix

    def fail(self, key: str, must: str, value) -> EdgequantError:
        got = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes it
        return EdgequantError(f"{self.label}: field {self.prefix + key!r} must be {must}, got {got}")

    def get(self, key: str, optional: bool = False):
        if key not in self.table:
            if optional:
                return None
            raise EdgequantError(f"{self.label}: missing field {self.prefix + key!r}")
        return self.table[key]

    def string(self, key: str, choices: tuple[str, ...] | None = None, pattern: str | None = None,
               optional: bool = False, must: str = "a non-empty string") -> str | None:
        v = self.get(key, optional)
        if v is None:
            return None
        if choices is not None:
            must = "one of " + ", ".join(choices)
        if not isinstance(v, str) or not v.strip() or (choices is not None and v not in choices) or (
                pattern is not None and not re.fullmatch(pattern, v)):
            raise self.fail(key, must, v)
        return v

    def number(self, key: str, lo: float = 0.0, hi: float | None = None, optional: bool = False,
               default: float | None = None, lo_ok: bool = False) -> float | None:
        """A number above ``lo`` (or at it, with ``lo_ok``), at most ``hi``; ``default`` when absent."""
        v = self.get(key, optional or default is not None)
        if v is None:
            return default
        must = f"a number {'>=' if lo_ok else '>'} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= lo if lo_ok else v > lo) or (
                hi is not None and v > hi):
            raise self.fail(key, must, v)
        return float(v)

    def integer(self, key: str, optional: bool = False) -> int | None:
        v = self.get(key, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.fail(key, "a whole number > 0", v)
        return v

    def boolean(self, key: str) -> bool:
        v = self.get(key)
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def names(self, key: str, allowed, what: str, empty_ok: bool = False) -> tuple[str, ...]:
        v = self.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or (not v and not empty_ok):
            raise self.fail(key, f"a {'' if empty_ok else 'non-empty '}list of strings ({what})", v)
        for x in v:
            if not allowed(x):
                raise self.fail(key, f"a list of {what}", x)
        return tuple(v)

    def no_unknown(self, known: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
                raise EdgequantError(f"{self.label}: unknown field {self.prefix + key!r}{hint}")


_FIELDS = ("name", "title", "kind", "ram_gb", "usable_gb", "bandwidth_gbs", "decode_efficiency", "cpu", "cpu_cores",
           "cpu_ghz", "isa", "gpu", "runtimes", "fast_types", "default_ctx", "transport", "sources")
_GPU_FIELDS = ("name", "cuda_cores", "compute_capability", "unified_memory", "tops")


def _isa_known(feature: str) -> bool:
    return feature in ISA_FEATURES or feature.startswith(ISA_PREFIXES)


def _load_profile(path: Path, label: str) -> Device:
    data = _read_toml(path, label)
    c = _Checker(data, label)
    c.no_unknown(_FIELDS)
    name = c.string("name", pattern=r"[a-z0-9][a-z0-9.-]*", must="lowercase letters, digits, '-' and '.'")
    if name == HOST:
        raise EdgequantError(f"{label}: field 'name' must not be 'host' (reserved for this machine)")
    ram_gb = c.number("ram_gb")
    usable_gb = c.number("usable_gb")
    if usable_gb > ram_gb:
        raise c.fail("usable_gb", f"at most ram_gb ({ram_gb:g})", usable_gb)
    gpu = _gpu(c.get("gpu", optional=True), label)
    runtimes = c.names("runtimes", lambda r: r in RUNTIMES, "runtimes: " + ", ".join(RUNTIMES))
    cuda = [r for r in runtimes if r in CUDA_RUNTIMES]
    if cuda and (gpu is None or gpu.compute_capability is None):
        raise EdgequantError(f"{label}: runtime {cuda[0]!r} needs a [gpu] table with compute_capability")
    device = Device(
        name=name,
        title=c.string("title"),
        kind=c.string("kind", choices=KINDS),
        ram_gb=ram_gb,
        usable_gb=usable_gb,
        bandwidth_gbs=c.number("bandwidth_gbs"),
        decode_efficiency=c.number("decode_efficiency", hi=1.0),
        cpu=c.string("cpu"),
        cpu_cores=c.integer("cpu_cores"),
        cpu_ghz=c.number("cpu_ghz"),
        isa=c.names("isa", _isa_known, "ISA features: " + ", ".join(ISA_FEATURES) + ", avx512*, amx*",
                    empty_ok=True),
        gpu=gpu,
        runtimes=runtimes,
        fast_types=c.names("fast_types", lambda t: t in TYPES, "ggml types: " + ", ".join(TYPES)),
        default_ctx=c.integer("default_ctx"),
        transport=c.string("transport", choices=TRANSPORTS),
        sources=_sources(c.get("sources"), label, has_gpu=gpu is not None),
        path=path.resolve(),
    )
    return device


def _gpu(table, label: str) -> Gpu | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise EdgequantError(f"{label}: field 'gpu' must be a table ([gpu] with name, unified_memory...), got {table!r}")
    c = _Checker(table, label, prefix="gpu.")
    c.no_unknown(_GPU_FIELDS)
    return Gpu(
        name=c.string("name"),
        cuda_cores=c.integer("cuda_cores", optional=True),
        compute_capability=c.string("compute_capability", pattern=r"\d+\.\d+", optional=True,
                                    must='a string like "8.7"'),
        unified_memory=c.boolean("unified_memory"),
        tops=c.number("tops", optional=True),
    )


def _sources(table, label: str, has_gpu: bool) -> dict[str, str]:
    if not isinstance(table, dict):
        raise EdgequantError(f"{label}: field 'sources' must be a table ([sources] figure = \"where from\"), "
                             f"got {table!r}")
    needed = SOURCED + (("gpu",) if has_gpu else ())
    allowed = needed + UNSOURCED + (tuple(f"gpu.{k}" for k in _GPU_FIELDS) if has_gpu else ())
    for key, value in table.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise EdgequantError(f"{label}: sources.{key} names no figure of this profile{hint}")
        if not isinstance(value, str) or not value.strip():
            raise EdgequantError(f"{label}: sources.{key} must be a non-empty string "
                                 f"(a datasheet, URL, or 'estimate: <reason>'), got {value!r}")
    for key in needed:
        if key not in table:
            raise EdgequantError(f"{label}: field {key!r} has no source: add sources.{key} = "
                                 f"\"<datasheet, URL, or 'estimate: <reason>'>\"")
    return dict(table)


# ---------------------------------------------------------------------------------------------
# host: this machine

_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "fphp": "fp16", "asimdhp": "fp16",
              "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme"}
_X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni")
_ARM_PARTS = {  # /proc/cpuinfo "CPU part" of Arm Ltd. (implementer 0x41) cores
    "0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3", "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}
HOST_USABLE_SHARE = 0.8  # of the memory available right now
HOST_DECODE_EFFICIENCY = 0.8
BANDWIDTH_SECONDS = 0.3


@functools.cache
def detect_host() -> Device:
    """This machine, detected once per process (the bandwidth benchmark takes about 0.3 s)."""
    info = _cpuinfo()
    total, available, memory_source = _memory()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    isa = _host_isa(info.get("flags", "") + " " + info.get("features", ""))
    ghz, ghz_source = _host_ghz(info)
    cpu = info.get("model name") or _arm_cpu_name(info) or platform.processor() or platform.machine()
    bandwidth, bandwidth_source = _host_bandwidth(cpu, cores, total, available)
    fast = _host_fast_types(isa)
    return Device(
        name=HOST,
        title=f"This machine ({platform.machine()}, {cpu})",
        kind="host",
        ram_gb=round(total / GIB, 2),
        usable_gb=round(HOST_USABLE_SHARE * available / GIB, 2),
        bandwidth_gbs=round(bandwidth / 1e9, 2),
        decode_efficiency=HOST_DECODE_EFFICIENCY,
        cpu=cpu,
        cpu_cores=cores,
        cpu_ghz=ghz,
        isa=isa,
        gpu=None,
        runtimes=("llama.cpp-cpu", "ort-cpu"),
        fast_types=fast,
        default_ctx=4096,
        transport="local",
        sources={
            "ram_gb": f"detected: {memory_source}",
            "usable_gb": f"detected: {HOST_USABLE_SHARE:.0%} of the memory available at load time ({memory_source})",
            "bandwidth_gbs": f"measured on this machine: {bandwidth_source}",
            "decode_efficiency": "estimate: llama.cpp decoding streams weights at about 80% of a measured copy rate",
            "cpu": "detected: /proc/cpuinfo",
            "cpu_cores": "detected: CPUs this process may run on (sched_getaffinity)",
            "cpu_ghz": ghz_source,
            "isa": "detected: /proc/cpuinfo flags/Features",
            "runtimes": "detected: CPU runtimes only (GPUs are not probed)",
            "fast_types": "derived from the detected ISA and llama.cpp's CPU kernels (see device_profiles/README.md)",
            "default_ctx": "choice: 4096 tokens",
            "transport": "choice: this machine",
        },
        path=None,
    )


def _cpuinfo() -> dict[str, str]:
    """The first processor's lines of /proc/cpuinfo (keys lowercased), plus the highest 'cpu mhz'."""
    info: dict[str, str] = {}
    mhz = 0.0
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "cpu mhz":
            try:
                mhz = max(mhz, float(value))
            except ValueError:
                pass
        info.setdefault(key, value)
    if mhz:
        info["cpu mhz"] = str(mhz)
    return info


def _arm_cpu_name(info: dict[str, str]) -> str | None:
    part = info.get("cpu part")
    if part is None:
        return None
    if info.get("cpu implementer") == "0x41" and part in _ARM_PARTS:
        name = _ARM_PARTS[part]
    else:
        name = f"Arm CPU (implementer {info.get('cpu implementer', '?')}, part {part})"
    model = Path("/sys/firmware/devicetree/base/model")
    try:
        board = model.read_text(errors="replace").strip("\x00\n ")
        return f"{name} ({board})" if board else name
    except OSError:
        return name


def _host_isa(flags: str) -> tuple[str, ...]:
    found: list[str] = []
    for flag in flags.split():
        feature = _ARM_FLAGS.get(flag) or (flag if flag in _X86_FLAGS or flag.startswith(ISA_PREFIXES) else None)
        if feature and feature not in found:
            found.append(feature)
    return tuple(found)


def _host_fast_types(isa: tuple[str, ...]) -> tuple[str, ...]:
    """ggml types with fast CPU kernels here, following llama.cpp's CPU repack rules."""
    fast = {"Q8_0", "Q6_K", "Q4_K"} if ("avx2" in isa or "neon" in isa) else {"Q8_0"}
    if "avx2" in isa or "dotprod" in isa or "i8mm" in isa:
        fast.add("Q4_0")  # repacked Q4_0: AVX2 8x8, NEON i8mm 4x8, NEON dotprod 4x4
    if "dotprod" in isa:
        fast.add("IQ4_NL")  # repacked IQ4_NL 4x4 needs NEON dotprod
    if any(f.startswith("avx512") for f in isa):
        fast.add("Q2_K")  # repacked Q2_K 8x8 needs AVX512
    return tuple(t for t in TYPES if t in fast)


def _host_ghz(info: dict[str, str]) -> tuple[float, str]:
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return round(khz / 1e6, 2), "detected: cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    m = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if m:
        return float(m.group(1)), "detected: /proc/cpuinfo model name"
    if "cpu mhz" in info:
        return round(float(info["cpu mhz"]) / 1000, 2), "detected: /proc/cpuinfo cpu MHz (current clock)"
    return 0.0, "not detected: no cpufreq and no clock in /proc/cpuinfo"


def _memory() -> tuple[int, int, str]:
    """(total bytes, available bytes, where from): /proc/meminfo, capped by a cgroup memory limit."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024
    except OSError:
        pass
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    source = "/proc/meminfo"
    if not total:
        try:  # not Linux: fall back to sysconf
            total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            source = "sysconf"
        except (ValueError, OSError, AttributeError):
            raise EdgequantError("cannot detect this machine's RAM (no /proc/meminfo)") from None
    limit, used = _cgroup_memory()
    if limit is not None and limit < total:
        total, available = limit, min(available, max(limit - (used or 0), 0))
        source += " capped by the cgroup memory limit"
    return total, available, source


def _cgroup_memory() -> tuple[int | None, int | None]:
    for limit_file, used_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if not limit.isdigit():
            return None, None  # "max": no limit
        try:
            used = int(Path(used_file).read_text().strip())
        except (OSError, ValueError):
            used = None
        return int(limit), used
    return None, None


BANDWIDTH_METHOD = "numpy-copy-1"  # in the kept entry's key: a new measuring method measures again


def _host_bandwidth(cpu: str, cores: int, total: int, available: int) -> tuple[float, str]:
    """This machine's copy rate, measured once and kept in the cache (``host-bandwidth.json``,
    one entry per CPU, core count, memory size and measuring method): a plan for the host does not
    change with whatever else the machine was doing the moment it was made. Delete the file to
    measure again; an unreadable file or entry is measured again and rewritten."""
    import json
    import math

    from .assets import cache_dir
    from .atomic import write_text

    path = cache_dir() / "host-bandwidth.json"
    key = f"{cpu} | {cores} cores | {total >> 20} MiB | {BANDWIDTH_METHOD}"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    kept = kept if isinstance(kept, dict) else {}
    entry = kept.get(key)
    valid = (isinstance(entry, dict) and isinstance(entry.get("bytes_per_s"), (int, float))
             and math.isfinite(entry["bytes_per_s"]) and entry["bytes_per_s"] > 0
             and isinstance(entry.get("how"), str) and isinstance(entry.get("measured"), str))
    if not valid:
        rate, how = _measure_bandwidth(cores, available)
        entry = kept[key] = {"bytes_per_s": rate, "how": how, "measured": time.strftime("%Y-%m-%d %H:%M")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(kept, indent=1))
        except OSError:
            pass  # a read-only cache: measured again next time
    return float(entry["bytes_per_s"]), f"{entry['how']}; measured {entry['measured']}, kept in {path}"


def _measure_bandwidth(cores: int, available: int) -> tuple[float, str]:
    """Best copy rate (bytes read + written per second) of big numpy arrays, single and multi-threaded."""
    import numpy as np

    nbytes = int(min(64 << 20, max(available // 16, 8 << 20)))  # each array; far above last-level caches
    n = nbytes // 8
    src = np.ones(n)
    dst = np.zeros(n)
    threads = max(1, min(cores, 8))
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def copy_parallel():
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    best = {}
    runs = [("1 thread", lambda: np.copyto(dst, src))]
    if threads > 1:
        runs.append((f"{threads} threads", copy_parallel))
    for label, copy in runs:
        deadline = time.perf_counter() + BANDWIDTH_SECONDS / len(runs)
        reps = 0
        while reps < 2 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            copy()
            rate = 2 * nbytes / max(time.perf_counter() - t0, 1e-9)
            best[label] = max(best.get(label, 0.0), rate)
            reps += 1
    label = max(best, key=best.get)
    return best[label], (f"numpy copy of {nbytes >> 20} MiB arrays, best rate ({label}), "
                         f"counting bytes read + written; a measured rate, not the datasheet peak")

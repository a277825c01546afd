"""Several devices running one model: llama.cpp's RPC backend splits its layers across them.

A fleet is given to ``--device`` as a comma-separated list of profiles (``--device
raspberry-pi-5-8gb,raspberry-pi-5-8gb``: enough to plan) or as a fleet file, which also says
where each device is, for ``deploy`` and ``bench``::

    # fleet.toml
    [[target]]
    profile = "raspberry-pi-5-8gb"           # a device profile: name, alias or .toml path
    rpc = "192.168.1.21:50052"               # where its ggml-rpc-server listens (numeric IPv4)
    at = "ssh://pi@192.168.1.21/~/edgequant" # how deploy and bench reach it (default: local)
    link_mbs = 117                           # its network link, MB/s (117: gigabit Ethernet)
    link_ms = 0.3                            # round trip to it, ms

Every target runs ``ggml-rpc-server`` and holds a contiguous run of layers. The program that
drives them (llama-bench, llama-perplexity, llama-completion) is the *client*: it keeps the
input embedding (llama.cpp never offloads it) and receives the logits. It runs where the user
starts it (``edgequant bench`` runs it on this machine), so its memory is listed on its own.

**The split** is llama.cpp's tensor split (``-ts``): the blocks and the output layer (counted as
one more layer, ``n_layer + 1`` in all) are dealt out in proportion to the targets' usable
memory, layer ``il`` going to the first target whose cumulative share exceeds
``il / (n_layer + 1)``. The same rule is computed here, and the client is given the layer
counts as ``-ts`` so that llama.cpp reproduces the plan's split exactly.

**Memory** of each target: its layers' tensors, their KV cache, its compute buffer and the server
process. A tied embedding is held twice: once by the client, once as the output. The compute
buffer is what llama.cpp reserves on an RPC device with pipeline parallelism (on whenever a model
spans several devices): ``u * (60 * n_embd + 8 * ctx)`` bytes for a micro-batch of ``u`` tokens,
plus ``4 * u * n_vocab`` of logits on the target holding the output layer. The rule was read off
llama.cpp's own "compute buffer size" lines (llama-cpp-python 0.3.36's llama.cpp, SmolLM2-135M
split over two workers, contexts 256 to 2048: within 0.6 MiB on the other target, 11 MiB over on
the output target, whose logits it counts whole).

**Speed**: the targets run one after another for every token, so a token costs each target's
weights read at its bandwidth, plus a network hop to each: ``HOP_ROUND_TRIPS`` round trips and
the hidden state sent and received over its link.

The RPC protocol has no authentication and no encryption: keep the servers on a private
network (``deploy`` binds each to the address the fleet file gives, and 0.0.0.0 is refused).
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

from .devices import Device, _Checker, _read_toml, load_device
from .errors import EdgequantError

HOP_ROUND_TRIPS = 2  # per target and token: tensors in (with the compute call), results out
SERVER_PROCESS_BYTES = 8_000_000  # an idle ggml-rpc-server's RSS (estimate; measured by bench)
DEFAULT_LINK_MBS = 117.0  # gigabit Ethernet's payload rate
DEFAULT_LINK_MS = 0.3  # a switched LAN's round trip
_TARGET_FIELDS = ("name", "profile", "rpc", "at", "link_mbs", "link_ms", "threads")


@dataclass(frozen=True)
class Member:
    """One device of a fleet."""

    name: str
    device: Device
    rpc: str | None  # "host:port" of its ggml-rpc-server; None when only planning
    at: str  # where deploy and bench reach it: "local", "ssh://..." or "adb://..."
    link_mbs: float
    link_ms: float
    threads: int | None = None  # the server's threads (default: all its cores)

    def as_dict(self) -> dict:
        return {"name": self.name, "device": self.device.name, "rpc": self.rpc, "at": self.at,
                "link_mbs": self.link_mbs, "link_ms": self.link_ms, "threads": self.threads,
                "usable_bytes": self.device.usable_bytes}


@dataclass(frozen=True)
class Fleet:
    """Devices that run one model together; in the budget it stands where one device would."""

    name: str
    members: tuple[Member, ...]
    path: Path | None = None  # the fleet file, if any

    @property
    def usable_bytes(self) -> int:
        return sum(m.device.usable_bytes for m in self.members)

    @property
    def shares(self) -> list[float]:
        """Each member's share of the layers: its usable memory over the fleet's."""
        return [m.device.usable_bytes / self.usable_bytes for m in self.members]

    @property
    def effective_bandwidth(self) -> float:
        """Bytes per second a token's weights are read at, the members reading their shares in turn."""
        return 1 / sum(s / m.device.effective_bandwidth for s, m in zip(self.shares, self.members))

    @property
    def int8_ops_per_s(self) -> float:
        return 1 / sum(s / m.device.int8_ops_per_s for s, m in zip(self.shares, self.members))

    @property
    def default_ctx(self) -> int:
        return min(m.device.default_ctx for m in self.members)

    def network_seconds(self, hidden: int) -> float:
        """Per token: each member's round trips and its hidden state in and out (float32)."""
        return sum(HOP_ROUND_TRIPS * m.link_ms / 1e3 + 2 * 4 * hidden / (m.link_mbs * 1e6) for m in self.members)

    def runtime_bytes(self, shape, ctx: int) -> int:
        """Memory besides the weights, over all members: the KV cache, and every member's compute
        buffer and server process (the client, wherever it runs, is not counted)."""
        others = (len(self.members) - 1) * compute_bytes(shape, ctx, output=False)
        return shape.kv_bytes(ctx) + others + compute_bytes(shape, ctx, output=True) + len(self.members) * SERVER_PROCESS_BYTES

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": "fleet", "path": str(self.path) if self.path else None,
                "usable_gb": self.usable_bytes / (1 << 30), "members": [m.as_dict() for m in self.members]}


def compute_bytes(shape, ctx: int, output: bool) -> int:
    """llama.cpp's compute buffer on one RPC worker (see the module docstring)."""
    from .budget import N_UBATCH

    u = min(N_UBATCH, ctx)
    return u * (60 * shape.hidden + 8 * ctx) + (4 * u * shape.n_vocab if output else 0)


def is_fleet(text: str) -> bool:
    """Whether ``--device`` names several devices: a comma list, or a TOML file with [[target]]s."""
    if "," in text:
        return True
    path = Path(text).expanduser()
    return path.suffix == ".toml" and path.is_file() and re.search(r"(?m)^\s*\[\[\s*target\s*\]\]", _text(path)) is not None


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def load_fleet(text: str) -> Fleet:
    """A fleet from a comma list of profiles or a fleet file (see the module docstring)."""
    if "," in text:
        names = [n.strip() for n in text.split(",")]
        if not all(names):
            raise EdgequantError(f"--device {text!r}: an empty name in the list")
        devices = [load_device(n) for n in names]
        members = tuple(Member(f"{i}:{d.name}", d, None, "local", DEFAULT_LINK_MBS, DEFAULT_LINK_MS)
                        for i, d in enumerate(devices))
        return Fleet("+".join(d.name for d in devices), members)
    path = Path(text).expanduser()
    data = _read_toml(path, text)
    targets = data.get("target")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, dict) for t in targets):
        raise EdgequantError(f"{text}: a fleet file lists its devices as [[target]] tables")
    unknown = set(data) - {"target", "name"}
    if unknown:
        raise EdgequantError(f"{text}: unknown field {sorted(unknown)[0]!r} (a fleet file has [[target]] tables and a name)")
    members = tuple(_member(t, i, text, path.parent) for i, t in enumerate(targets))
    rpcs = [m.rpc for m in members if m.rpc]
    if len(set(rpcs)) < len(rpcs):
        raise EdgequantError(f"{text}: two targets share the rpc address {next(r for r in rpcs if rpcs.count(r) > 1)}")
    return Fleet(str(data.get("name") or path.stem), members, path.resolve())


def _member(table: dict, index: int, label: str, folder: Path) -> Member:
    c = _Checker(table, label, prefix=f"target[{index}].")
    c.no_unknown(_TARGET_FIELDS)
    profile = c.string("profile")
    relative = folder / profile
    device = load_device(str(relative) if profile.endswith(".toml") and relative.is_file() else profile)
    rpc = c.string("rpc", optional=True)
    if rpc is not None:
        rpc = _rpc_address(rpc, label, index)
    return Member(
        name=c.string("name", optional=True) or f"{index}:{device.name}",
        device=device,
        rpc=rpc,
        at=c.string("at", optional=True) or "local",
        link_mbs=c.number("link_mbs", default=DEFAULT_LINK_MBS),
        link_ms=c.number("link_ms", default=DEFAULT_LINK_MS, lo_ok=True),
        threads=c.integer("threads", optional=True),
    )


def _rpc_address(text: str, label: str, index: int) -> str:
    """``host:port`` with a numeric IPv4 host (ggml-rpc-server binds nothing else)."""
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        ok = sep and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise EdgequantError(f"{label}: target[{index}].rpc must be a numeric IPv4 address and port, "
                             f"like 192.168.1.21:50052, got {text!r}")
    if host == "0.0.0.0":
        raise EdgequantError(f"{label}: target[{index}].rpc binds the server to every network (0.0.0.0); "
                             "name the private address it should listen on (the RPC protocol has no authentication)")
    return text


def load_target(text: str) -> Device | Fleet:
    """``--device``: one device, or a fleet."""
    return load_fleet(text) if is_fleet(text) else load_device(text)


# ---------------------------------------------------------------------------------------------
# The split


def layer_owners(n_layer: int, shares: list[float]) -> list[int]:
    """The member of each of layers ``0..n_layer`` (``n_layer`` is the output layer), as llama.cpp
    deals them out for a tensor split of ``shares`` (llama-model.cpp, ``load_tensors``)."""
    total, cumulative, acc = sum(shares), [], 0.0
    for s in shares:
        acc += s
        cumulative.append(acc / total)
    return [min(bisect_right(cumulative, il / (n_layer + 1)), len(shares) - 1) for il in range(n_layer + 1)]


def ts_option(split: dict) -> str:
    """A split's ``-ts`` value as llama.cpp's command line takes it ("15.5,15.5")."""
    return ",".join(f"{t:g}" for t in split["tensor_split"])


def layers_held(row: dict) -> str:
    """What a split's member holds, for a table: "16-29 + output"."""
    return row["layers"] + (" + output" if row["output"] else "")


def tensor_split(owners: list[int], members: int) -> list[float]:
    """``-ts`` values that make llama.cpp deal out exactly ``owners``: each member's layer count,
    with every boundary moved half a layer back so that no layer falls on one."""
    counts = [owners.count(i) for i in range(members)]
    split = [float(c) for c in counts]
    first = next(i for i, c in enumerate(counts) if c)
    last = max(i for i, c in enumerate(counts) if c)
    if first != last:
        split[first] -= 0.5
        split[last] += 0.5
    return split


def split(fleet: Fleet, plan, shape, ctx: int, file_overhead: int, tied: bool) -> dict:
    """Which layers each member holds, and its predicted memory; the client's too."""
    n_layer = _layers(plan)
    owners = layer_owners(n_layer, fleet.shares)
    layer_bytes = [0] * (n_layer + 1)
    input_bytes = 0
    for m in plan.matrices:
        block = re.match(r"blk\.(\d+)\.", m.name)
        if block:
            layer_bytes[int(block.group(1))] += plan.matrix_bytes(m)
        elif m.name == "output.weight":
            layer_bytes[n_layer] += plan.matrix_bytes(m)
        elif m.name == "token_embd.weight":
            input_bytes = plan.matrix_bytes(m)
            if tied:
                layer_bytes[n_layer] += input_bytes  # llama.cpp duplicates it as the output
    norms = 4 * plan.other_params
    rows = []
    for i, member in enumerate(fleet.members):
        layers = [il for il, o in enumerate(owners) if o == i]
        blocks = [il for il in layers if il < n_layer]
        weights = sum(layer_bytes[il] for il in layers) + norms * len(blocks) // max(n_layer, 1)
        kv = shape.kv_bytes(ctx) * len(blocks) // max(n_layer, 1)
        holds_output = n_layer in layers
        compute = compute_bytes(shape, ctx, holds_output)
        memory = weights + kv + compute + SERVER_PROCESS_BYTES
        rows.append({"member": member.name, "device": member.device.name, "rpc": member.rpc,
                     "layers": _ranges(blocks), "output": holds_output, "weights_bytes": weights,
                     "kv_cache_bytes": kv, "compute_bytes": compute, "memory_bytes": memory,
                     "usable_bytes": member.device.usable_bytes, "fits": memory <= member.device.usable_bytes})
    client = input_bytes + shape.overhead_bytes(ctx) + file_overhead  # a CPU compute buffer at most
    return {"rule": "llama.cpp's tensor split in proportion to usable memory", "n_layer": n_layer,
            "tensor_split": tensor_split(owners, len(fleet.members)), "members": rows,
            "client": {"input_embedding_bytes": input_bytes, "memory_bytes": client}}


def check_split(fleet_split: dict) -> None:
    """A one-line error naming the first member whose share does not fit it."""
    for row in fleet_split["members"]:
        if not row["fits"]:
            raise EdgequantError(f"does not fit: {row['member']} would hold layers {row['layers'] or 'none'} "
                                 f"({row['memory_bytes'] / 1e6:.0f} MB) in {row['usable_bytes'] / 1e6:.0f} MB usable")


def _layers(plan) -> int:
    return 1 + max((int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", t.name) for t in plan.matrices) if m), default=-1)


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for i, il in enumerate(layers):
        if start is None:
            start = il
        if i + 1 == len(layers) or layers[i + 1] != il + 1:
            out.append(str(start) if start == il else f"{start}-{il}")
            start = None
    return ", ".join(out)

"""``edgequant deploy`` / ``verify``: put a build's files on a device, checked by sha256.

A build folder lists its files in ``manifest.json`` (relative path, bytes, sha256). Deploying
copies each file that the device does not already hold with the same hash; a file is written as
``.NAME.part`` and renamed into place only once its hash on the device matches, so an interrupted
copy never leaves a wrong file under the final name, and the next run resumes the ``.part`` from
where it stopped instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtimes.remote import DeviceFull, Target, Transport, part_name, parse_target, remote_path, transport

from .atomic import write_text
from .errors import EdgequantError
from .progress import Progress

MANIFEST = "manifest.json"
NOT_SHIPPED = {MANIFEST, "report.json", "report.html", "bench.json", "bench-split.json", "device.calibrated.toml",
               "rpc-workers.json"}  # rewritten after the build


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: Path) -> list[dict]:
    """The files a device needs (the artifacts and plan.json; not the reports, not hidden files), smallest first."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in NOT_SHIPPED
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    entries = [{"path": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files]
    return sorted(entries, key=lambda e: (e["bytes"], e["path"]))


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    manifest = {"files": file_entries(folder), **(extra or {})}
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgequantError(f"build folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgequantError(f"{folder} has no {MANIFEST} (is it an edgequant build folder?)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        for entry in files:
            if not {"path", "bytes", "sha256"} <= entry.keys() or entry["path"].startswith("/") or ".." in entry["path"]:
                raise ValueError(entry)
    except (ValueError, KeyError, TypeError):
        raise EdgequantError(f"{path} is not a valid manifest") from None
    for entry in files:
        local = folder / entry["path"]
        if not local.is_file() or local.stat().st_size != entry["bytes"]:
            raise EdgequantError(f"{local} is missing or changed since the build (manifest says {entry['bytes']} bytes)")
    return manifest


@dataclass
class DeployResult:
    target: str
    sent_bytes: int = 0
    seconds: float = 0.0
    copied: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        rate = self.sent_bytes / self.seconds / 1e6 if self.seconds else None
        return {**self.__dict__, "mb_per_s": rate}


def deploy(folder: Path, target_text: str, progress: Progress | None = None) -> DeployResult:
    """Copy the build in ``folder`` to the target; returns what was sent, resumed and skipped."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    target = _remote(target_text)
    link = transport(target)
    files = manifest["files"] + [{"path": MANIFEST, "bytes": (folder / MANIFEST).stat().st_size,
                                  "sha256": sha256(folder / MANIFEST)}]
    result = DeployResult(str(target))
    started = time.time()
    for directory in sorted({posixpath.dirname(remote_path(target, e["path"])) for e in files}):
        link.mkdir(directory)
    on_device = link.sha256([remote_path(target, e["path"]) for e in files])
    todo = [e for e in files if on_device[remote_path(target, e["path"])] != e["sha256"]]
    result.skipped = [e["path"] for e in files if e not in todo]
    _check_space(link, target, todo)
    with (progress or Progress()).step(f"copy to {target}", sum(e["bytes"] for e in todo), in_bytes=True) as tick:
        for entry in todo:
            _copy_one(link, folder, target, entry, result, tick)
    result.seconds = time.time() - started
    return result


def deploy_fleet(folder: Path, fleet_text: str, progress: Progress | None = None) -> dict:
    """The build copied to every target of a fleet file, one after another; a target that fails
    is a row with its one-line error, and the others are still copied."""
    from .fleet import load_fleet

    rows = []
    for member in load_fleet(fleet_text).members:
        try:
            rows.append({"member": member.name, **deploy(folder, member.at, progress).as_dict()})
        except EdgequantError as e:
            rows.append({"member": member.name, "target": member.at, "error": str(e)})
    return {"fleet": fleet_text, "targets": rows}


def verify(folder: Path, target_text: str = "local") -> dict:
    """Compare every file's sha256 with the manifest: on the device, or (``local``) in the build folder itself."""
    manifest = read_manifest(Path(folder))
    target = parse_target(target_text)
    where = (lambda p: str(Path(folder) / p)) if target.scheme == "local" else (lambda p: remote_path(target, p))
    paths = {e["path"]: where(e["path"]) for e in manifest["files"]}
    on_device = transport(target).sha256(list(paths.values()))
    rows = [{"path": e["path"], "expected": e["sha256"], "found": on_device[paths[e["path"]]]} for e in manifest["files"]]
    return {"target": str(target), "files": rows, "ok": all(r["found"] == r["expected"] for r in rows)}


def _remote(target_text: str) -> Target:
    target = parse_target(target_text)
    if target.scheme == "local":
        raise EdgequantError("deploy/verify need a device target (ssh://... or adb://...); a local build is already in place")
    return target


def _check_space(link: Transport, target: Target, todo: list[dict]) -> None:
    needed = sum(e["bytes"] for e in todo)
    free = link.free_bytes(target.directory)
    if free is not None and free < needed:
        raise EdgequantError(f"{target}: the device has {free / 1e6:.1f} MB free, the copy needs {needed / 1e6:.1f} MB")


def _copy_one(link: Transport, folder: Path, target: Target, entry: dict, result: DeployResult, progress) -> None:
    """Send one file as ``.NAME.part`` (resuming a earlier part), check its hash, rename it into place."""
    final = remote_path(target, entry["path"])
    part = part_name(final)
    have = link.size(part) or 0
    if have > entry["bytes"]:  # longer than the file: not a prefix of it
        link.remove(part)
        have = 0
    for offset in (have, 0) if have else (0,):
        if offset == 0 and have:  # the resumed part was from another version of the file
            link.remove(part)
        try:
            result.sent_bytes += link.append(folder / entry["path"], offset, part, progress)
        except DeviceFull:
            link.remove(part)  # nothing to resume from: free the space again
            raise
        if link.sha256([part])[part] == entry["sha256"]:
            (result.resumed if offset else result.copied).append(entry["path"])
            link.rename(part, final)
            return
    link.remove(part)
    raise EdgequantError(f"{target}: {entry['path']} arrived corrupted (its sha256 on the device differs)")


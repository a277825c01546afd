"""Where artifacts are copied to and run: this machine, a board over ssh, a phone over adb.

    local                          this machine (files stay where they are)
    ssh://[user@]host[:port][/dir] a Linux board (or Termux on Android) through the system OpenSSH client
    adb://[serial][/dir]           an Android device through the ``adb`` binary

A remote ``/dir`` is absolute; ``/~/dir`` (or no path: ``edgequant``) is relative to the login
directory. adb defaults to ``/data/local/tmp/edgequant``.

Why the system ``ssh`` and not paramiko/asyncssh: it already knows the user's keys, agent,
``~/.ssh/config`` (aliases, ProxyJump, ports) and ``known_hosts``, and it is what board vendors
document. We force ``BatchMode`` (never a password prompt: keys or agent only, so no password can
reach a process argument), ``StrictHostKeyChecking=yes`` (an unknown or changed host key is an
error, never silently accepted) and connect/keep-alive timeouts. ``EDGEQUANT_SSH_CONFIG`` names an
extra ssh config file (``ssh -F``); the tests use it for a throwaway server.

A deploy makes a few dozen short ssh calls (checksums, one upload and rename per file), so the
calls to one host share one connection (OpenSSH's ControlMaster): one handshake per host, not per
call. The control sockets live in a private folder of this process; the shared connections are
closed when the process exits.

Every remote command is an argument list joined with ``shlex.join``: paths and names reach the
remote shell quoted, never interpolated. Multi-step commands are constant ``sh -c`` scripts that
take their values as positional parameters.
"""

from __future__ import annotations

import atexit
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from edgequant.errors import EdgequantError

SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
ADB_DEFAULT_DIR = "/data/local/tmp/edgequant"
COMMAND_TIMEOUT = 120  # seconds for one short remote command; copies and benches pass their own
CHUNK = 1 << 20


class DeviceFull(EdgequantError):
    """The target ran out of space while a file was being written."""


@dataclass(frozen=True)
class Target:
    scheme: str  # "local", "ssh" or "adb"
    host: str | None = None  # ssh host (or ssh config alias); adb serial (None = the only device)
    user: str | None = None
    port: int | None = None
    directory: str | None = None  # where artifacts go on the target (None for local)

    def __str__(self) -> str:
        if self.scheme == "local":
            return "local"
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        path = self.directory if self.directory.startswith("/") else f"/~/{self.directory}"
        return f"{self.scheme}://{who}{self.host or ''}{port}{path}"


def parse_target(text: str) -> Target:
    """``local``, ``ssh://...`` or ``adb://...`` (see the module docstring); anything else is an error."""
    if text == "local":
        return Target("local")
    parts = urlsplit(text)
    if parts.scheme not in ("ssh", "adb") or parts.query or parts.fragment:
        raise EdgequantError(f"target {text!r} is not 'local', ssh://[user@]host[:port][/dir] or adb://[serial][/dir]")
    path = parts.path
    if parts.scheme == "ssh":
        if not parts.hostname:
            raise EdgequantError(f"target {text!r} names no host")
        try:
            port = parts.port
        except ValueError:
            raise EdgequantError(f"target {text!r} has a bad port") from None
        directory = path[3:] if path.startswith("/~/") else (path if path not in ("", "/") else "edgequant")
        return Target("ssh", parts.hostname, parts.username, port, directory.rstrip("/") or "/")
    serial = parts.netloc or None
    return Target("adb", serial, None, None, path.rstrip("/") if path not in ("", "/") else ADB_DEFAULT_DIR)


class Transport:
    """Runs argument lists on a target and moves bytes there. Subclasses say how to reach it."""

    def __init__(self, target: Target):
        self.target = target

    def command(self, argv: list[str]) -> list[str]:
        """The local process that runs ``argv`` on the target."""
        raise NotImplementedError

    def upload_command(self, remote_path: str) -> list[str]:
        """The local process that appends its stdin to ``remote_path`` on the target."""
        return self.command(["sh", "-c", 'cat >> "$1"', "edgequant", remote_path])

    def run(self, argv: list[str], timeout: float | None = COMMAND_TIMEOUT, stdin: BinaryIO | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on the target; output is bytes. A transport failure is a one-line error."""
        try:
            done = subprocess.run(self.command(argv), stdin=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgequantError(f"{self.target}: no answer within {timeout:.0f} s") from None
        except FileNotFoundError as e:
            raise EdgequantError(f"{e.filename} is not installed (needed for {self.target.scheme} targets)") from None
        self.raise_transport_error(done)
        if check and done.returncode:
            raise EdgequantError(f"{self.target}: {shlex.join(argv[:3])} failed: {last_line(done.stderr)}")
        return done

    def raise_transport_error(self, done: subprocess.CompletedProcess) -> None:
        """Turn a failure to reach the target (not of the remote command) into an error."""

    # ---- file operations, all built on ``run`` with POSIX sh and coreutils/toybox on the target

    def sha256(self, paths: list[str]) -> dict[str, str | None]:
        """sha256 of each remote path (None where it is missing or unreadable)."""
        if not paths:
            return {}
        out = self.run(["sh", "-c", 'for f; do [ -f "$f" ] && sha256sum -- "$f"; done; true', "edgequant", *paths]).stdout
        found = {}
        for line in out.decode(errors="replace").splitlines():
            digest, _, name = line.partition("  ")
            found[name] = digest
        return {p: found.get(p) for p in paths}

    def size(self, path: str) -> int | None:
        out = self.run(["sh", "-c", '[ -f "$1" ] && wc -c < "$1" || echo none', "edgequant", path]).stdout.strip()
        return None if out == b"none" else int(out)

    def free_bytes(self, directory: str) -> int | None:
        """Free space where ``directory`` lives (None if the target cannot say)."""
        done = self.run(["df", "-Pk", directory], check=False)
        rows = done.stdout.decode(errors="replace").split("\n")
        try:
            return int(rows[1].split()[3]) * 1024
        except (IndexError, ValueError):
            return None

    def mkdir(self, directory: str) -> None:
        self.run(["mkdir", "-p", "--", directory])

    def rename(self, src: str, dst: str) -> None:
        self.run(["mv", "-f", "--", src, dst])

    def remove(self, path: str) -> None:
        self.run(["rm", "-f", "--", path])

    def append(self, local: Path, offset: int, remote_path: str, progress=None) -> int:
        """Send ``local`` from byte ``offset`` onto the end of ``remote_path``; returns bytes sent."""
        with open(local, "rb") as f:
            f.seek(offset)
            proc = subprocess.Popen(self.upload_command(remote_path), stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            sent = 0
            try:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    proc.stdin.write(chunk)
                    sent += len(chunk)
                    if progress:
                        progress(len(chunk))
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the remote side stopped reading: its exit status says why
            err = proc.stderr.read()
            proc.wait()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)
        self.raise_transport_error(done)
        if proc.returncode:
            message = last_line(err)
            if "No space left" in message:
                raise DeviceFull(f"{self.target}: the device is full (writing {remote_path})")
            raise EdgequantError(f"{self.target}: copying to {remote_path} failed: {message}")
        return sent

    def put_file(self, local: Path, remote_path: str) -> None:
        """Copy a small file whole (temp name, then rename)."""
        part = part_name(remote_path)
        self.remove(part)
        self.append(local, 0, part)
        self.rename(part, remote_path)


class Local(Transport):
    def command(self, argv: list[str]) -> list[str]:
        return argv


class Ssh(Transport):
    def command(self, argv: list[str]) -> list[str]:
        t = self.target
        opts = SSH_OPTIONS + _shared_connection()
        if os.environ.get("EDGEQUANT_SSH_CONFIG"):
            opts += ["-F", os.environ["EDGEQUANT_SSH_CONFIG"]]
        if t.port:
            opts += ["-p", str(t.port)]
        if t.user:
            opts += ["-l", t.user]
        return ["ssh", *opts, "--", t.host, shlex.join(argv)]

    def raise_transport_error(self, done: subprocess.CompletedProcess) -> None:
        if done.returncode != 255:  # ssh's own failures exit 255; anything else is the remote command's
            return
        err = done.stderr.decode(errors="replace")
        where = self.target.host + (f":{self.target.port}" if self.target.port else "")
        for pattern, message in _SSH_ERRORS:
            if re.search(pattern, err, re.IGNORECASE):
                raise EdgequantError(f"ssh {where}: {message}")
        raise EdgequantError(f"ssh {where}: {last_line(done.stderr)}")


_control_dir: str | None = None
_control_lock = threading.Lock()
SOCKET_PATH_LIMIT = 100  # bytes: sun_path holds 104-108, and ssh binds a longer temporary name first


def _shared_connection() -> list[str]:
    """ssh options that make the calls to one host share one connection, opened by the first
    (none where the socket path would be too long: every call then connects on its own)."""
    global _control_dir
    with _control_lock:
        if _control_dir is None:
            _control_dir = tempfile.mkdtemp(prefix="eq-ssh-", dir="/tmp" if os.path.isdir("/tmp") else None)
            atexit.register(_close_shared_connections, _control_dir)
    if len(_control_dir) + 1 + 40 + 20 > SOCKET_PATH_LIMIT:  # %C is 40 hex digits; ssh adds ~20 while binding
        return []
    return ["-o", "ControlMaster=auto", "-o", f"ControlPath={_control_dir}/%C", "-o", "ControlPersist=30"]


def _close_shared_connections(folder: str) -> None:
    """Ask every shared connection's master to exit (at once, briefly), then remove the folder;
    nothing here may fail the exit."""
    try:
        closing = [subprocess.Popen(["ssh", "-F", "/dev/null", "-o", f"ControlPath={socket}", "-O", "exit", "edgequant"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for socket in Path(folder).iterdir()]
        for proc in closing:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
    except OSError:
        pass  # no ssh, or the folder already gone
    finally:
        shutil.rmtree(folder, ignore_errors=True)


_SSH_ERRORS = [
    (r"connection refused", "connection refused (is sshd running on that port?)"),
    (r"could not resolve hostname|name or service not known", "unreachable: the host name does not resolve"),
    (r"timed out|no route to host|network is unreachable", "unreachable (no answer; check the address and network)"),
    (r"host identification has changed", "the host key CHANGED since it was recorded in known_hosts; not connecting"),
    (r"host key verification failed|no .* host key is known",
     "the host key is not in known_hosts; connect once with `ssh` to check and accept it"),
    (r"permission denied", "authentication failed (no accepted key; edgequant uses keys or an agent, never passwords)"),
]


class Adb(Transport):
    """Android through ``adb`` (``adb shell`` for commands, ``adb exec-in`` for raw uploads).

    Written from adb's documented behaviour and unit-tested for command construction only; it
    has not been run against a physical phone here."""

    def _adb(self) -> list[str]:
        return ["adb", "-s", self.target.host] if self.target.host else ["adb"]

    def command(self, argv: list[str]) -> list[str]:
        return [*self._adb(), "shell", shlex.join(argv)]

    def upload_command(self, remote_path: str) -> list[str]:
        # exec-in passes stdin through unmodified (``shell`` may translate line endings on old devices)
        return [*self._adb(), "exec-in", shlex.join(["sh", "-c", 'cat >> "$1"', "edgequant", remote_path])]

    def raise_transport_error(self, done: subprocess.CompletedProcess) -> None:
        err = done.stderr.decode(errors="replace")
        if done.returncode and re.search(r"no devices/emulators found|device .* not found|device offline|unauthorized", err):
            raise EdgequantError(f"adb {self.target.host or '(default device)'}: {last_line(done.stderr)}")


def transport(target: Target) -> Transport:
    return {"local": Local, "ssh": Ssh, "adb": Adb}[target.scheme](target)


def remote_path(target: Target, relative: str) -> str:
    return posixpath.join(target.directory, relative) if target.directory else relative


def part_name(path: str) -> str:
    """The temporary name a file is written under before it is renamed into place."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.part")


def last_line(stderr: bytes) -> str:
    lines = [l for l in stderr.decode(errors="replace").strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else "no error message"

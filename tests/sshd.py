"""A real OpenSSH server on 127.0.0.1 for the deploy/bench tests: throwaway host and user keys,
a free high port, and an ssh client config (``EDGEQUANT_SSH_CONFIG``) that names it ``board``.

Given ``home``, every session starts there (as a login directory would) with this Python first
on its PATH as ``python3``, like a board with the runtimes installed."""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SshServer:
    root: Path  # keys, configs and the server's files
    port: int
    config: Path  # client config: Host board -> this server
    process: subprocess.Popen

    def env(self, config: Path | None = None) -> dict:
        return {**os.environ, "EDGEQUANT_SSH_CONFIG": str(config or self.config)}

    def client_config(self, name: str, host: str = "board", **overrides: str) -> Path:
        """Another client config for the same server, under another host alias or with some settings
        changed (a wrong key...)."""
        settings = {**self.settings, **overrides}
        path = self.root / name
        path.write_text(f"Host {host}\n" + "".join(f"  {k} {v}\n" for k, v in settings.items()))
        return path

    @property
    def settings(self) -> dict:
        return {"HostName": "127.0.0.1", "Port": str(self.port), "User": getpass.getuser(),
                "IdentityFile": str(self.root / "user_key"), "IdentitiesOnly": "yes",
                "UserKnownHostsFile": str(self.root / "known_hosts")}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(root: Path, home: Path | None) -> list[str]:
    """sshd settings that start each session in ``home`` with this Python as ``python3``."""
    if home is None:
        return []
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    home.mkdir(parents=True, exist_ok=True)
    script = root / "session.sh"
    script.write_text(f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"\ncd {shlex.quote(str(home))} || exit 1\n'
                      'exec sh -c "$SSH_ORIGINAL_COMMAND"\n')
    return [f"ForceCommand sh {script}"]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def start(root: Path, home: Path | None = None) -> SshServer:
    if not os.path.exists(SSHD):
        raise RuntimeError("sshd is not installed (Debian: apt-get install openssh-server; .ci/install does it)")
    root.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(root / "host_key")
    user_pub = keygen(root / "user_key")
    keygen(root / "other_key")
    (root / "authorized_keys").write_text(user_pub + "\n")
    port = free_port()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}", f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        "LogLevel ERROR", *_session(root, home), ""]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # root's sshd wants its privilege-separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=open(root / "sshd.log", "w"))
    server = SshServer(root, port, root / "ssh_config", process)
    server.client_config("ssh_config")
    for _ in range(100):  # up to 10 s for the server to listen
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    raise RuntimeError("sshd did not start listening")

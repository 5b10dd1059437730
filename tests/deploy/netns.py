"""Simulated hosts for the multi-host test: one network namespace per host, each with its own
address on a bridge, and an /etc/hosts of its own (`ip netns exec` mounts
/etc/netns/<ns>/hosts over /etc/hosts) that plays the part of cluster DNS.

Needs root and iproute2. Everything made here is named after the test process's pid and is
removed by `Network.close()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (the reason is the message)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def probe() -> None:
    """Raises NetnsUnavailable unless a network namespace can be made and entered here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` is not installed")
    name = f"syprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        raise NetnsUnavailable(f"ip netns add failed: {made.stderr.strip()}")
    try:
        entered = subprocess.run(["ip", "netns", "exec", name, "true"], capture_output=True,
                                 text=True, timeout=20)
        if entered.returncode != 0:
            raise NetnsUnavailable(f"ip netns exec failed: {entered.stderr.strip()}")
    finally:
        _ip("netns", "del", name, check=False)


@dataclass
class Host:
    """One simulated machine."""

    name: str
    netns: str
    address: str
    veth: str
    """The host side of its cable (on the bridge): down = the machine is cut off."""


@dataclass
class Network:
    """A bridge in the root namespace and hosts on it, 10.213.<n>.0/24."""

    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.subnet = f"10.213.{int(self.tag) % 250}"
        self.bridge = f"sy{self.tag}br"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @property
    def gateway(self) -> str:
        """The root namespace's address (where the test process talks from)."""
        return f"{self.subnet}.1"

    def add_host(self, name: str, last_octet: int) -> Host:
        netns = f"sy{self.tag}-{name}"
        veth, peer = f"sy{self.tag}h{len(self.hosts)}", f"sy{self.tag}p{len(self.hosts)}"
        host = Host(name, netns, f"{self.subnet}.{last_octet}", veth)
        self.hosts[name] = host
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        for args in (("link", "set", "lo", "up"), ("link", "set", peer, "name", "eth0"),
                     ("addr", "add", f"{host.address}/24", "dev", "eth0"),
                     ("link", "set", "eth0", "up")):
            _ip("-n", netns, *args)
        return host

    def set_hosts_file(self, host: Host, entries: list[tuple[str, str]]) -> None:
        """Writes the host's /etc/hosts: (address, name) pairs; a name may repeat (one
        record per address, as a headless Service's DNS name has one per pod). Written in
        place: running processes see it through their bind mount of this very file."""
        folder = Path("/etc/netns") / host.netns
        folder.mkdir(parents=True, exist_ok=True)
        text = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in entries)
        with open(folder / "hosts", "w") as f:  # same inode: no rename
            f.write(text)

    def popen(self, host: Host, argv: list[str], log: Path, env: dict[str, str],
              cwd: str | None = None) -> subprocess.Popen:
        """Starts `argv` on `host` (ip netns exec execs it: the pid is the program's)."""
        return subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], env=env, cwd=cwd,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def cut_off(self, host: Host) -> None:
        """Takes the host's link down: its packets are dropped silently, as when a machine's
        network fails (nothing answers with a reset)."""
        _ip("link", "set", host.veth, "down")

    def reconnect(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def close(self) -> None:
        """Removes everything. Deleting each veth explicitly: a namespace outlives `ip netns
        del` while its orphaned TCP sockets still retransmit to a cut-off host (minutes)."""
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(Path("/etc/netns") / host.netns)
        _ip("link", "del", self.bridge, check=False)

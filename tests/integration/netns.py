"""Separate network hosts on one machine: network namespaces joined by a bridge.

Each host gets its own namespace, a veth pair to a bridge living in a namespace of
its own, and an address in 10.251.N.0/24 that exists only inside these namespaces.
Nothing is added to the machine's own network namespace; everything is removed on
close. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

SUBNET = "10.251.{net}"


def available() -> str | None:
    """None if this machine can build the topology, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"apiary-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Topology:
    hosts: list[str]
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    net: int = 0
    addresses: dict[str, str] = field(default_factory=dict)

    def ns(self, host: str) -> str:
        return f"apiary-{self.tag}-{host}"

    @property
    def bridge_ns(self) -> str:
        return self.ns("switch")

    def veth(self, host: str) -> str:
        # Interface names are limited to 15 characters.
        return f"v{self.tag}{self.hosts.index(host)}"

    def up(self) -> Topology:
        self.net = int(self.tag, 16) % 200 + 20
        ip("netns", "add", self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                self.veth(host),
                "netns",
                self.bridge_ns,
            )
            ip("-n", self.bridge_ns, "link", "set", self.veth(host), "master", "br0")
            ip("-n", self.bridge_ns, "link", "set", self.veth(host), "up")
            address = f"{SUBNET.format(net=self.net)}.{i + 2}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            self.addresses[host] = address
        return self

    def cut(self, host: str) -> None:
        """Unplug the host's cable (at the switch): packets are dropped, nothing says so."""
        ip("-n", self.bridge_ns, "link", "set", self.veth(host), "down")

    def restore(self, host: str) -> None:
        ip("-n", self.bridge_ns, "link", "set", self.veth(host), "up")

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.bridge_ns], capture_output=True)

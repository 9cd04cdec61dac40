"""Separate "hosts" on one machine: network namespaces joined by a switch.

A partition test needs machines whose links can be cut and healed while the
processes on them keep running, unaware, as on real hosts. Each host is a
network namespace (`ip netns`, root only) with one interface, `eth0`, plugged
by a veth pair into a bridge (the switch) that lives in the namespace of the
first host, the data host, whose address is the bridge's. The test process
itself stays in the root namespace and reaches the data host through a port
of its own on the switch, which is never cut (the observer's link), so it
can watch Redis while the other hosts are partitioned.

Cutting a link sets the host's switch port down: the host's `eth0` loses
carrier and every packet either way is dropped in silence, as when a cable
or a switch port fails. Processes see no error; their TCP connections
retransmit, and survive if the link returns before their timeouts. `heal`
sets the port up again (the bridge runs without STP, so it forwards at once).

Facts this relies on (checked on the CI machine kind): `ip netns` works as
root; `ip netns exec` execs the command (same pid, so a process group kill
works); a redis-server reached over a veth needs `--protected-mode no`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import random
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

IP = "ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be built here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs as root"
    probe = f"awprobe{os.getpid()}"
    try:
        done = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` cannot run: {exc}"
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip() or done.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that no route of the root namespace covers but the default.

    Only the observer's address lands in the root namespace; a subnet the
    machine already uses (or another run's) would make it ambiguous.
    """
    routes = _ip("-4", "route", "show").stdout.split()
    used = []
    for word in routes:
        with suppress(ValueError):
            if "/" in word or word.count(".") == 3:
                used.append(ipaddress.ip_network(word, strict=False))
    choices = list(range(200, 250))
    random.shuffle(choices)
    for second in choices:
        net = ipaddress.ip_network(f"10.{second}.0.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.0.0/24 subnet for the test network")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies (a CI
    timeout's kill leaves no redis-server or submitter behind; exec keeps it)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1


@dataclass
class Host:
    name: str
    netns: str
    address: str
    port: str  # its switch port, in the data host's namespace

    @property
    def launcher(self) -> tuple[str, ...]:
        """Prefix that runs a command on this host (`ip netns exec` execs it)."""
        return (IP, "netns", "exec", self.netns)


@dataclass
class Network:
    """Hosts on one switch; `close()` removes everything, processes first."""

    tag: str
    subnet: ipaddress.IPv4Network
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    cuts: list[tuple[str, str]] = field(default_factory=list)  # (host, "cut" | "heal")
    observer_link: str = ""

    def _addr(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def data(self) -> Host:
        return next(iter(self.hosts.values()))

    def add_data_host(self, name: str) -> Host:
        """The first host: it holds the switch, and its address is the switch's."""
        assert not self.hosts, "the data host comes first"
        ns = f"{self.tag}-{name}"
        _ip("netns", "add", ns)
        host = Host(name, ns, self._addr(1), "br0")
        self.hosts[name] = host
        _ip("-n", ns, "link", "set", "lo", "up")
        # No STP: a port that comes back up forwards at once.
        _ip("-n", ns, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        _ip("-n", ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "br0")
        _ip("-n", ns, "link", "set", "br0", "up")
        # The observer (the test process, root namespace) on a port of its own.
        self.observer_link = f"{self.tag[-10:]}o"
        _ip("link", "add", self.observer_link, "type", "veth", "peer", "name", "obs", "netns", ns)
        _ip("-n", ns, "link", "set", "obs", "master", "br0")
        _ip("-n", ns, "link", "set", "obs", "up")
        _ip("addr", "add", f"{self._addr(254)}/{self.subnet.prefixlen}", "dev", self.observer_link)
        _ip("link", "set", self.observer_link, "up")
        return host

    def add_host(self, name: str) -> Host:
        ns = f"{self.tag}-{name}"
        index = 10 + len(self.hosts)
        port = f"p-{name}"[:15]
        _ip("netns", "add", ns)
        host = Host(name, ns, self._addr(index), port)
        self.hosts[name] = host
        data = self.data.netns
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", data)
        _ip("-n", data, "link", "set", port, "master", "br0")
        _ip("-n", data, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return host

    def cut(self, name: str) -> None:
        """Partition the host: its switch port goes down (no packet either way)."""
        _ip("-n", self.data.netns, "link", "set", self.hosts[name].port, "down")
        self.cuts.append((name, "cut"))

    def heal(self, name: str) -> None:
        _ip("-n", self.data.netns, "link", "set", self.hosts[name].port, "up")
        self.cuts.append((name, "heal"))

    def bytes_to(self, name: str) -> int:
        """Bytes the switch delivered to host `name` so far (its port's tx counter)."""
        out = _ip("-n", self.data.netns, "-s", "-j", "link", "show", "dev", self.hosts[name].port)
        return int(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])

    def popen(self, name: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` on host `name`; `close()` ends it if the caller did not."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            [*self.hosts[name].launcher, *cmd], preexec_fn=_die_with_parent, **kwargs
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill what runs in our namespaces (only processes this test started
        live there), then delete them; the veths go with them."""
        for proc in self.procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    proc.kill()
        for host in reversed(list(self.hosts.values())):
            pids = _ip("netns", "pids", host.netns, check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for host in reversed(list(self.hosts.values())):
            _ip("netns", "del", host.netns, check=False)
        if self.observer_link:
            _ip("link", "del", self.observer_link, check=False)  # gone already, normally
        self.hosts.clear()


@contextmanager
def network(tag: str | None = None) -> Iterator[Network]:
    """A switch with no hosts yet; everything is removed on exit, even on failure."""
    net = Network(tag or f"awp{os.getpid()}", _free_subnet())
    try:
        yield net
    finally:
        net.close()

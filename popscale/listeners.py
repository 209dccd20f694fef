"""Every socket a popscale run listens on: this process, its children (the embedded Ray's GCS,
raylet, agents, workers, Ray Data actors) and any other process of the same Ray session.

    for s in listening_sockets():
        print(s)            # tcp  127.0.0.1:6379  pid 1234 gcs_server

A socket is "listening" when it is a TCP socket in LISTEN state or a UDP socket with no remote
end (bound, accepting datagrams from anyone). runbooks/security.md says what each of Ray's is.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True, order=True)
class Listener:
    proto: str  # tcp, tcp6, udp, udp6
    ip: str
    port: int
    pid: int
    process: str  # the process name; for a Python process, also its script (log_monitor.py, ...)

    @property
    def loopback(self) -> bool:
        return is_loopback(self.ip)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.proto:4s} {host}:{self.port:<5d}  pid {self.pid:<7d} {self.process}"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x; a wildcard (0.0.0.0, ::) or any other address is not."""
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


def _process_label(proc: psutil.Process) -> str:
    name = proc.name()
    if name.startswith("python"):
        try:
            script = next((Path(a).name for a in proc.cmdline()[1:] if a.endswith(".py")), "")
        except (psutil.Error, StopIteration):
            script = ""
        if proc.pid == os.getpid():
            script = "this process"
        return f"{name} ({script})" if script else name
    return name


def _ray_session_dir() -> str | None:
    """The running Ray session's directory, when this process is connected to one."""
    try:
        # deferred: importing ray only when used keeps start-up light
        import ray

        if ray.is_initialized():
            return ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - no Ray, or a client-mode connection: children only
        pass
    return None


def session_pids(root: int | None = None, session_dir: str | None = None) -> set[int]:
    """`root` (default: this process), all its descendants, and every process whose command line
    names the Ray session directory (default: the session this process is connected to), with
    their descendants: Ray's daemons re-parent when started detached."""
    root = os.getpid() if root is None else root
    pids: set[int] = set()
    try:
        p = psutil.Process(root)
        pids = {root, *(c.pid for c in p.children(recursive=True))}
    except psutil.NoSuchProcess:
        pass
    session_dir = session_dir or _ray_session_dir()
    if session_dir:
        names = {session_dir, os.path.realpath(session_dir), Path(session_dir).name}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if any(n and n in cmd for n in names):
                pids.add(proc.pid)
                try:
                    pids.update(c.pid for c in proc.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
    return pids


def listening_sockets(pids: set[int] | None = None) -> list[Listener]:
    """The listening TCP/UDP sockets of `pids` (default: `session_pids()`), sorted."""
    pids = session_pids() if pids is None else pids
    out: set[Listener] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = _process_label(proc)
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        for c in conns:
            tcp = c.type == socket.SOCK_STREAM
            if tcp and c.status != psutil.CONN_LISTEN:
                continue
            if not tcp and (c.type != socket.SOCK_DGRAM or c.raddr):
                continue
            if not c.laddr:
                continue
            proto = ("tcp" if tcp else "udp") + ("6" if c.family == socket.AF_INET6 else "")
            out.add(Listener(proto, c.laddr.ip, c.laddr.port, pid, name))
    return sorted(out, key=lambda s: (s.process, s.proto, s.ip, s.port, s.pid))


def exposed(listeners: list[Listener]) -> list[Listener]:
    """The listeners that do not bind a loopback address."""
    return [s for s in listeners if not s.loopback]


def table(listeners: list[Listener]) -> str:
    return "\n".join(str(s) for s in listeners)


if __name__ == "__main__":  # `python -m popscale.listeners PID`: the listeners of PID's process tree
    import sys

    print(table(listening_sockets(session_pids(int(sys.argv[1])) if len(sys.argv) > 1 else None)))

"""Listeners: the frontends' listening sockets.

Rule of this module: a socket is bound once, by the master (or the single-process library),
with the configured backlog, non-blocking and inheritable so that worker processes can be
handed it; a socket whose address stays in the configuration is kept across reloads (so no
connection waiting in its accept queue is lost), and only an address that leaves the
configuration is closed. A bind error names the configuration key. It never reads a byte.
"""

from __future__ import annotations

import errno
import socket

from .config import Address, Config

__all__ = ["ListenError", "bind", "bind_config", "check_managed_ports", "key_of", "path_of"]


class ListenError(Exception):
    """A frontend address could not be bound; `path` is its key path in the configuration."""

    def __init__(self, path: str, address: Address, reason: str):
        self.path = path
        self.address = address
        self.reason = reason
        super().__init__(f"{path} = \"{address}\": cannot listen: {reason}")


def path_of(config: Config, frontend: str, index: int) -> str:
    n = len(config.frontends[frontend].bind)
    return f"frontends.{frontend}.bind" + (f"[{index}]" if n > 1 else "")


def key_of(frontend: str, index: int, addr: Address) -> tuple:
    """What identifies a listening socket across reloads: its address (or, for port 0, which
    the kernel chose, the frontend's own bind entry)."""
    return (addr.host, addr.port) if addr.port else (frontend, index, addr.host)


def bind(path: str, addr: Address, backlog: int, listen: bool = True) -> socket.socket:
    try:
        return _socket(addr, backlog, listen)
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        if e.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied (ports below 1024 need privileges)"
        elif e.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise ListenError(path, addr, reason) from None


def _socket(addr: Address, backlog: int, listen: bool) -> socket.socket:
    host = addr.host or "0.0.0.0"
    infos = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_config(config: Config, backlog: int, keep: dict[tuple, socket.socket] | None = None
                ) -> dict[tuple, socket.socket]:
    """A socket for every bind address of `config`, by `key_of`: taken from `keep` where the
    address is bound already (listening again with `backlog`), else bound now. On an error,
    what this call bound is closed again and ListenError raised."""
    keep = keep or {}
    out: dict[tuple, socket.socket] = {}
    fresh: list[socket.socket] = []
    try:
        for name, fcfg in config.frontends.items():
            for i, addr in enumerate(fcfg.bind):
                key = key_of(name, i, addr)
                sock = keep.get(key)
                if sock is None:
                    sock = bind(path_of(config, name, i), addr, backlog)
                    fresh.append(sock)
                else:
                    sock.listen(backlog)
                out[key] = sock
    except BaseException:
        for sock in fresh:
            sock.close()
        raise
    return out


def check_managed_ports(config: Config, running=lambda backend, server: False) -> None:
    """A managed server's port must be free (unless `running(backend, server)`: its process is
    ours already), or its process could never listen there: ListenError naming the key."""
    for bname, bcfg in config.backends.items():
        for i, scfg in enumerate(bcfg.servers):
            if scfg.command and not running(bname, scfg.name):
                bind(f"backends.{bname}.servers[{i}].address", scfg.address, 1, listen=False).close()

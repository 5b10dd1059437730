"""Worker discovery: a configured `host:port` stands for every address `host` resolves to.

On Kubernetes a worker tier is a headless Service, whose DNS name resolves to one A record per
pod; a plain Service would give one virtual IP, and gRPC would pin its one HTTP/2 connection
to a single pod behind it. Resolving the name ourselves gives the router one replica per pod,
each with its own load stream. Locally (and in tests) the names are IP literals, or names from
/etc/hosts, which plays the part of DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def resolve(address: str) -> list[str]:
    """Every address `address` stands for, sorted; [] when the name does not resolve (yet)."""
    host, port = split_address(address)
    if is_literal(host):
        return [join_address(host, port)]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({join_address(info[4][0], port) for info in infos})

"""TLS and mutual TLS for Switchyard's gRPC hops: the settings of each side, and the gRPC
credentials and channels built from them.

Every hop is optional TLS: a service with no `ServerTls` listens in plaintext, a client with no
`ClientTls` dials in plaintext, exactly as before TLS existed. With TLS the server presents
`cert_file`; with `require_client_cert` it also refuses every client whose certificate does not
chain to its `ca_file` (mTLS), so a stolen network position is not enough to call a worker.

The settings classes only check their shape; reading the files is deferred to
`server_credentials` / `channel_credentials` (called when a service binds or dials), because a
config is often built where the files do not exist: `switchyard render-config` renders configs
whose certificate paths only exist inside the pods' mounted Secret. Those functions check that
each file exists, is PEM, and that the key matches its certificate, and name the setting in
their errors, so a bad path fails at start-up with its key instead of at the first handshake
with an OpenSSL code.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A TLS file that cannot be used; the message starts with its setting's name."""


def _path(name: str, value: str | None, *, required: str = "") -> None:
    """Checks a file setting's shape; `required` (why it is needed) makes None an error."""
    if value is None:
        if required:
            raise ValueError(f"{name}: required ({required}), got None")
        return
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"{name}: expected a file path, got {value!r}")


@dataclass(frozen=True)
class ServerTls:
    """TLS of a gRPC server's main port. cert_file and key_file are required (they default to
    None only so that a missing one is reported by name, not as a TypeError)."""

    cert_file: str | None = None
    """PEM certificate chain the server presents (leaf first)."""
    key_file: str | None = None
    """PEM private key of `cert_file` (unencrypted: gRPC cannot prompt for a passphrase)."""
    ca_file: str | None = None
    """PEM CA bundle that client certificates must chain to; used with require_client_cert."""
    require_client_cert: bool = False
    """mTLS: refuse clients that present no certificate, or one not signed by `ca_file`."""

    def __post_init__(self) -> None:
        _path("cert_file", self.cert_file, required="the certificate a TLS server presents")
        _path("key_file", self.key_file, required="the private key of cert_file")
        _path("ca_file", self.ca_file)
        if not isinstance(self.require_client_cert, bool):
            raise ValueError(f"require_client_cert: expected true or false, "
                             f"got {self.require_client_cert!r}")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert: true needs ca_file (the CA that signs the "
                             "client certificates)")
        # A CA without require_client_cert would make gRPC ask for, but not demand, client
        # certificates: it reads like mTLS and is not. Refuse the half-setting.
        if self.ca_file is not None and not self.require_client_cert:
            raise ValueError("ca_file: only used to verify client certificates; set "
                             "require_client_cert: true for mTLS, or remove ca_file")


@dataclass(frozen=True)
class ClientTls:
    """TLS of a gRPC client's channel to one kind of server."""

    ca_file: str | None = None
    """PEM CA bundle the server's certificate must chain to; None = the system's roots."""
    cert_file: str | None = None
    """PEM certificate chain presented to servers that require client certificates (mTLS)."""
    key_file: str | None = None
    """PEM private key of `cert_file`."""
    server_name: str | None = None
    """Name checked against the server certificate instead of the dialled host. Needed when
    servers are dialled by IP (the router resolves a headless Service to pod IPs) while their
    certificate names a DNS name."""

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            _path(name, getattr(self, name))
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file: set both (mTLS) or neither, got "
                             f"cert_file={self.cert_file!r}, key_file={self.key_file!r}")
        if self.server_name is not None and (not isinstance(self.server_name, str)
                                             or not self.server_name.strip()):
            raise ValueError(f"server_name: expected a host name, got {self.server_name!r}")


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{key}: no such file {str(path)!r}") from None
    except OSError as exc:
        raise TlsError(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{key}: {str(path)!r} is not a PEM file")
    return data


def _no_passphrase() -> bytes:
    raise TlsError("encrypted private keys are not supported (gRPC cannot decrypt them)")


def _check_pair(prefix: str, cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """Reads a certificate and its key; checks they parse and belong together (OpenSSL would
    otherwise only say so at the first handshake, or crash the bind)."""
    cert, key = _read(f"{prefix}cert_file", cert_file), _read(f"{prefix}key_file", key_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert_file, key_file,
                                                                password=_no_passphrase)
    except TlsError as exc:
        raise TlsError(f"{prefix}key_file: {exc}") from None
    except ssl.SSLError as exc:
        raise TlsError(f"{prefix}cert_file / {prefix}key_file: {str(cert_file)!r} and "
                       f"{str(key_file)!r} are not a certificate and its key "
                       f"({exc.reason or exc})") from None
    return cert, key


def _check_ca(key: str, path: str) -> bytes:
    data = _read(key, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(f"{key}: {str(path)!r} holds no usable CA certificate "
                       f"({exc.reason or exc})") from None
    return data


def server_credentials(tls: ServerTls, prefix: str = "tls.") -> grpc.ServerCredentials:
    """gRPC server credentials (mTLS when `require_client_cert`). Reads the files; raises
    TlsError naming the setting (`prefix` + field) when one is missing or unusable."""
    cert, key = _check_pair(prefix, tls.cert_file, tls.key_file)
    ca = _check_ca(f"{prefix}ca_file", tls.ca_file) if tls.ca_file is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=tls.require_client_cert)


def channel_credentials(tls: ClientTls, prefix: str = "tls.") -> grpc.ChannelCredentials:
    """gRPC channel credentials: the CA to verify servers, and the client certificate for
    mTLS when configured. Raises TlsError like `server_credentials`."""
    ca = _check_ca(f"{prefix}ca_file", tls.ca_file) if tls.ca_file is not None else None
    cert = key = None
    if tls.cert_file is not None and tls.key_file is not None:
        cert, key = _check_pair(prefix, tls.cert_file, tls.key_file)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def _tls_options(tls: ClientTls) -> list[tuple[str, str]]:
    return [] if tls.server_name is None else [("grpc.ssl_target_name_override",
                                                tls.server_name)]


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: ServerTls | None,
             prefix: str = "tls.") -> int:
    """Binds `address` on a sync or asyncio server: TLS (mTLS when required) when `tls` is
    set, plaintext otherwise. Returns the bound port (useful when the port is 0)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls, prefix))


def aio_channel(target: str, options: Sequence[tuple[str, object]], tls: ClientTls | None,
                prefix: str = "tls.", interceptors=None) -> grpc.aio.Channel:
    """An asyncio channel to `target` with `options` (services/common/grpc_options.py):
    secure when `tls` is set, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options),
                                         interceptors=interceptors)
    return grpc.aio.secure_channel(target, channel_credentials(tls, prefix),
                                   options=list(options) + _tls_options(tls),
                                   interceptors=interceptors)


def sync_channel(target: str, options: Sequence[tuple[str, object]], tls: ClientTls | None,
                 prefix: str = "tls.") -> grpc.Channel:
    """The blocking counterpart of `aio_channel` (CLI clients, tests)."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, channel_credentials(tls, prefix),
                               options=list(options) + _tls_options(tls))

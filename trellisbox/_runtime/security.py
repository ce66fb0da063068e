"""Transport security: TLS and mutual TLS from files that may be rotated in place, and bearer tokens.

- Server side, :func:`server_credentials` builds gRPC's dynamic SSL credentials: gRPC asks
  :class:`CertificateFiles` for the configuration at every new handshake, and it rereads the files only when
  they changed (cert-manager and the kubelet replace a mounted Secret's files in place). New connections get the
  new certificate; connections already open keep theirs until they close (``max_connection_age_s``).
- Client side, :func:`channel_credentials` reads the CA and the client's own certificate; a long-lived channel
  that must follow a rotation rebuilds itself when :class:`FileWatch` says the files changed (gateway/stages.py).
- :class:`TokenInterceptor` requires ``authorization: Bearer <token>`` on every call except health checks (and
  reflection, unless told otherwise), against the tokens of a file reread when it changes, compared in constant
  time. A refused call raises :class:`~trellisbox._domain.errors.Unauthenticated`, which the one error mapping
  turns into ``UNAUTHENTICATED``.

Logs and error messages name files, never their content: no token, key or certificate text leaves this module.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc

from trellisbox._domain.errors import Unauthenticated
from trellisbox._runtime.interceptor import Handler, ServerInterceptor

_log = logging.getLogger(__name__)

#: off: plaintext; on: TLS; mutual: TLS, and the peer must present a certificate from the configured CA.
TlsMode = Literal["off", "on", "mutual"]

#: Services and methods callable without a token: health checks (kubelet probes, the gateway's health checking).
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
BEARER = "bearer "


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FileWatch:
    """Tells whether any of some files changed since the last look (identity, size and modification time: a Secret
    update swaps a symlink, an in-place rewrite changes the time)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = tuple(paths)
        self._seen = self._signature()

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        signature: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                status = path.stat()
            except OSError:
                signature.append(None)
            else:
                signature.append((status.st_ino, status.st_mtime_ns, status.st_size))
        return tuple(signature)

    def changed(self) -> bool:
        """True once after each change; a file that is missing for a moment (mid-rotation) counts as changed when
        it is back."""
        now = self._signature()
        if now == self._seen or None in now:
            return False
        self._seen = now
        return True


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or type(exc).__name__}") from None
    if not data.strip():
        raise ValueError(f"the {what} {path} is empty")
    return data


def _read_pem(path: Path, what: str) -> bytes:
    data = _read(path, what)
    if b"-----BEGIN " not in data:  # else gRPC's refusal comes later and reads like a network failure
        raise ValueError(f"the {what} {path} is not in PEM format (no -----BEGIN line)")
    return data


class CertificateFiles:
    """A server's certificate, key and (for mutual TLS) the CA of its clients, reread when they change.

    Args:
        cert_file: PEM certificate chain the server presents.
        key_file: Its PEM private key.
        client_ca_file: PEM CA bundle client certificates must chain to; None: clients present none.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._watch = FileWatch([p for p in (cert_file, key_file, client_ca_file) if p is not None])
        self._lock = threading.Lock()  # gRPC calls the fetcher from its own threads
        self.initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read_pem(self.key_file, "TLS key"), _read_pem(self.cert_file, "TLS certificate"))
        roots = _read_pem(self.client_ca_file, "client CA bundle") if self.client_ca_file is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: a new configuration when the files changed, else None (keep)."""
        with self._lock:
            if not self._watch.changed():
                return None
            try:
                configuration = self._load()
            except ValueError as exc:
                _log.warning("TLS files changed but cannot be used (%s); serving the previous certificate", exc)
                return None
        _log.info("TLS certificate reloaded from %s", self.cert_file)
        return configuration


def server_credentials(mode: TlsMode, cert_file: Path | None, key_file: Path | None,
                       client_ca_file: Path | None) -> grpc.ServerCredentials | None:
    """Credentials for a server port in ``mode`` (None: plaintext). Files must exist and be readable now.

    Raises:
        ValueError: a file is missing, unreadable or empty (the message names the file, never its content).
    """
    if mode == "off":
        return None
    if cert_file is None or key_file is None:
        raise ValueError(f"tls={mode} needs tls_cert_file and tls_key_file")
    if mode == "mutual" and client_ca_file is None:
        raise ValueError("tls=mutual needs tls_client_ca_file")
    files = CertificateFiles(cert_file, key_file, client_ca_file if mode == "mutual" else None)
    # The fetcher may return None ("keep the current configuration"), which grpc-stubs do not allow for.
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,  # type: ignore[arg-type]
                                               require_client_authentication=mode == "mutual")


def channel_credentials(ca_file: Path | None, cert_file: Path | None = None,
                        key_file: Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client: the server's CA (None: gRPC's bundled public roots) and, for mutual TLS, the
    client's own certificate and key (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both its certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA bundle") if ca_file is not None else None,
        private_key=_read_pem(key_file, "TLS key") if key_file is not None else None,
        certificate_chain=_read_pem(cert_file, "TLS certificate") if cert_file is not None else None,
    )


def describe_tls(mode: TlsMode, cert_file: Path | None, client_ca_file: Path | None) -> str:
    """The TLS mode of a port in words, for the start-up log (file names only)."""
    if mode == "off":
        return "PLAINTEXT (tls=off)"
    text = f"TLS with {cert_file}, reloaded when it changes"
    return text + f"; clients must present a certificate from {client_ca_file}" if mode == "mutual" else text


class TokenFile:
    """The bearer tokens of a file, one per line (blank lines and ``#`` comments ignored), reread when it changes.

    A file that becomes unreadable or empty keeps the previous tokens (and says so in the log) rather than letting
    every call in or none.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._watch = FileWatch([path])
        self._lock = threading.Lock()
        self._tokens = self._load()

    def _load(self) -> tuple[bytes, ...]:
        lines = _read(self.path, "token file").decode("utf-8", errors="replace").splitlines()
        tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        if not tokens:
            raise ValueError(f"the token file {self.path} holds no token")
        return tokens

    def tokens(self) -> tuple[bytes, ...]:
        with self._lock:
            if self._watch.changed():
                try:
                    self._tokens = self._load()
                except ValueError as exc:
                    _log.warning("token file changed but cannot be used (%s); keeping the previous tokens", exc)
                else:
                    _log.info("tokens reloaded from %s (%d)", self.path, len(self._tokens))
            return self._tokens

    def accepts(self, presented: str) -> bool:
        """Whether ``presented`` is one of the tokens; compares against every token in constant time each."""
        given = presented.encode("utf-8", errors="replace")
        found = False
        for token in self.tokens():
            found |= hmac.compare_digest(given, token)
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER):].strip()
    return None


_MISSING = ("this service needs a bearer token: send the metadata `authorization: Bearer <token>` "
            "(trellisbox --token-file, or TRELLISBOX_TOKEN)")
_INVALID = "the bearer token is not valid here (the gateway's token file does not hold it)"


class TokenInterceptor(ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED, before the handler runs.

    Placed after the error interceptor, so the refusal goes through the one error mapping (and is counted).

    Args:
        tokens: The accepted tokens.
        open_reflection: Let server reflection through without a token (grpcurl, GUI clients).
    """

    def __init__(self, tokens: TokenFile, *, open_reflection: bool = True) -> None:
        self._tokens = tokens
        self._open = {HEALTH_SERVICE, *(REFLECTION_SERVICES if open_reflection else ())}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service in self._open:
            return handler
        presented = bearer_token(handler_call_details.invocation_metadata)  # type: ignore[arg-type]
        if presented is not None and self._tokens.accepts(presented):
            return handler
        return _refusal(handler, Unauthenticated(_MISSING if presented is None else _INVALID))


def _refusal(handler: Handler, error: Unauthenticated) -> Handler:
    """``handler`` with its behaviour replaced by raising ``error``, in the handler's own calling style."""
    behaviours: Any = handler

    async def unary(request: Any, context: Any) -> Any:
        raise error

    async def streaming(request: Any, context: Any) -> Any:
        raise error
        yield  # an async generator, as the project's streaming handlers are

    async def client_streaming(requests: Any, context: Any) -> Any:  # reflection: no error mapping wraps it
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))

    if handler.request_streaming:
        if handler.response_streaming and inspect.isasyncgenfunction(behaviours.stream_stream):
            # The gateway's Generate reads its own request: the error mapping wraps such a handler (and counts it)
            # only as an async generator.
            return behaviours._replace(stream_stream=streaming)  # type: ignore[no-any-return]
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
        return behaviours._replace(**{kind: client_streaming})  # type: ignore[no-any-return]
    if handler.response_streaming:
        return behaviours._replace(unary_stream=streaming)  # type: ignore[no-any-return]
    return behaviours._replace(unary_unary=unary)  # type: ignore[no-any-return]


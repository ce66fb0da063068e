"""An in-process fake of the Kubernetes API server's Lease endpoints, on 127.0.0.1.

Serves ``/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`` (GET, POST, PUT, DELETE)
so tests drive the real ``kubernetes`` client over HTTP, and enforces the server's rules that the
lease depends on:

- create of an existing name → 409 ``AlreadyExists``;
- replace without ``metadata.resourceVersion`` → 422 ``Invalid``; with a stale one → 409
  ``Conflict``; of a missing object → it is created (201): Leases allow create-on-update;
- names must be DNS-1123 subdomains → 422 ``Invalid`` on create and replace (a read of such a name is
  simply 404, as upstream);
- writes into a namespace the server does not know → 404 ``NotFound`` naming the namespace (the
  NamespaceLifecycle admission plugin); reads there are plain 404s;
- RBAC: a request whose verb (get, list, create, update, delete) the caller was not granted → 403
  ``Forbidden``, worded as upstream (``verbs``; the lease tests grant what the overlay's Role grants);
- every write that changes the object gets a new ``resourceVersion`` from one global counter
  (like etcd's revision); a no-op replace keeps it, as the real server does;
- ``acquireTime``/``renewTime`` must be ``MicroTime`` (RFC 3339 with exactly six fractional
  digits) → 400 ``BadRequest`` otherwise; ``leaseDurationSeconds`` > 0, ``leaseTransitions`` ≥ 0 →
  422 otherwise.

Fault injection (:meth:`FakeApiServer.fail`) makes chosen methods answer an error status, hang, or
drop the connection, to test renewals that fail.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from kubernetes import client as k8s

_PATH = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/(?P<ns>[^/]+)/leases(?:/(?P<name>[^/]+))?/?\Z")
_MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)\Z")
_GROUP = "coordination.k8s.io"
# metadata.name of most objects, Leases included: a DNS-1123 subdomain.
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}
# The identity the fake's RBAC messages name (the shared pod's ServiceAccount).
_USER = "system:serviceaccount:trellisbox:models"


@dataclass
class Fault:
    methods: frozenset[str]
    status: int = 500
    mode: str = "status"  # "status": answer `status`; "hang": sleep `hang_s` first; "drop": close the socket
    hang_s: float = 5.0
    remaining: int | None = None  # None: until healed


class _Reply(Exception):
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        super().__init__(code)
        self.code = code
        self.body = body


def _status(code: int, reason: str, message: str, name: str | None = None, *, group: str = _GROUP,
            kind: str = "leases") -> _Reply:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if name is not None:
        body["details"] = {"name": name, "group": group, "kind": kind}
    return _Reply(code, body)


def _verb(method: str, name: str | None) -> str:
    if method == "GET":
        return "get" if name is not None else "list"
    return {"POST": "create", "PUT": "update", "DELETE": "delete", "PATCH": "patch"}.get(method, method.lower())


class FakeApiServer:
    """Start with ``with FakeApiServer() as api:``; point clients at :meth:`configuration`.

    Args:
        namespaces: The namespaces that exist.
        verbs: The verbs on ``leases`` the caller is granted (None: all of them).
    """

    def __init__(self, *, namespaces: Iterable[str] = ("default",), verbs: Iterable[str] | None = None) -> None:
        self.namespaces = set(namespaces)
        self.verbs = None if verbs is None else frozenset(verbs)
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._rv = 100
        self._fault: Fault | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self._barrier: threading.Barrier | None = None
        self._barrier_left = 0
        server = self
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class(server))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-apiserver")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def configuration(self) -> k8s.Configuration:
        cfg = k8s.Configuration(host=self.url)
        cfg.retries = False  # as trellisbox._runtime.lease.kube.coordination_api does for real clusters
        return cfg

    # -- test controls -----------------------------------------------------------------------

    def fail(self, methods: tuple[str, ...] = ("GET", "PUT", "POST", "DELETE"), *, status: int = 500,
             mode: str = "status", hang_s: float = 5.0, count: int | None = None) -> None:
        with self._lock:
            self._fault = Fault(frozenset(m.upper() for m in methods), status, mode, hang_s, count)

    def sync_writes(self, parties: int = 2) -> None:
        """Hold the next ``parties`` writes (POST/PUT) until all have arrived, so that writers who
        read the same resourceVersion really race: exactly one may win."""
        with self._lock:
            self._barrier, self._barrier_left = threading.Barrier(parties), parties

    def heal(self) -> None:
        with self._lock:
            self._fault = None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def count(self, method: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for m, _, s in self.requests if m == method and (status is None or s == status))

    # -- the API -----------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    @staticmethod
    def _validate(body: Any, name_in_url: str | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _status(400, "BadRequest", "the body of the request was in an unknown format")
        if body.get("kind", "Lease") != "Lease" or body.get("apiVersion", f"{_GROUP}/v1") != f"{_GROUP}/v1":
            raise _status(400, "BadRequest", f"expected Lease in {_GROUP}/v1, got {body.get('kind')} in "
                                             f"{body.get('apiVersion')}")
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name:
            raise _status(422, "Invalid", "Lease.coordination.k8s.io is invalid: metadata.name: Required value")
        if not isinstance(name, str) or len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            raise _status(422, "Invalid", f'Lease.{_GROUP} "{name}" is invalid: metadata.name: Invalid value: '
                                          f'"{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                                          "alphanumeric characters, '-' or '.', and must start and end with an "
                                          "alphanumeric character", str(name))
        if name_in_url is not None and name != name_in_url:
            raise _status(400, "BadRequest", f"the name of the object ({name}) does not match the name on "
                                             f"the URL ({name_in_url})")
        spec = body.get("spec") or {}
        for field in ("acquireTime", "renewTime"):
            value = spec.get(field)
            if value is not None and (not isinstance(value, str) or not _MICROTIME.match(value)):
                raise _status(400, "BadRequest",
                              f'Lease in version "v1" cannot be handled as a Lease: parsing time "{value}" as '
                              f'"2006-01-02T15:04:05.000000Z07:00": cannot parse')
        duration = spec.get("leaseDurationSeconds")
        if duration is not None and (not isinstance(duration, int) or duration <= 0):
            raise _status(422, "Invalid", f"Lease.coordination.k8s.io {name!r} is invalid: "
                                          "spec.leaseDurationSeconds: Invalid value: must be greater than 0")
        transitions = spec.get("leaseTransitions")
        if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
            raise _status(422, "Invalid", f"Lease.coordination.k8s.io {name!r} is invalid: "
                                          "spec.leaseTransitions: Invalid value: must be greater than or equal to 0")
        holder = spec.get("holderIdentity")
        if holder is not None and not isinstance(holder, str):
            raise _status(400, "BadRequest", "spec.holderIdentity must be a string")
        return body

    def _create(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        """Store a new object (call with the lock held); the namespace must exist (NamespaceLifecycle)."""
        if ns not in self.namespaces:
            raise _status(404, "NotFound", f'namespaces "{ns}" not found', ns, group="", kind="namespaces")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion=self._next_rv(),
                    creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        obj["kind"], obj["apiVersion"] = "Lease", f"{_GROUP}/v1"
        self._objects[(ns, meta["name"])] = obj
        return copy.deepcopy(obj)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        match = _PATH.match(path.split("?", 1)[0])
        if match is None:
            raise _status(404, "NotFound", "the server could not find the requested resource")
        ns, name = match["ns"], match["name"]
        verb = _verb(method, name)
        if self.verbs is not None and verb not in self.verbs:
            target = f'leases.{_GROUP} "{name}"' if name else f"leases.{_GROUP}"
            raise _status(403, "Forbidden", f'{target} is forbidden: User "{_USER}" cannot {verb} resource '
                                            f'"leases" in API group "{_GROUP}" in the namespace "{ns}"',
                          name or "")
        with self._lock:
            if method == "GET" and name is None:
                items = [copy.deepcopy(o) for (n, _), o in sorted(self._objects.items()) if n == ns]
                return 200, {"kind": "LeaseList", "apiVersion": f"{_GROUP}/v1",
                             "metadata": {"resourceVersion": str(self._rv)}, "items": items}
            if method == "POST" and name is None:
                obj = self._validate(body, None)
                key = (ns, obj["metadata"]["name"])
                if key in self._objects:
                    raise _status(409, "AlreadyExists", f'leases.{_GROUP} "{key[1]}" already exists', key[1])
                return 201, self._create(ns, obj)
            if name is None:
                raise _status(405, "MethodNotAllowed", f"{method} is not supported on the collection")
            key = (ns, name)
            current = self._objects.get(key)
            if current is None and method == "PUT":  # Leases allow create-on-update (no resourceVersion check)
                return 201, self._create(ns, self._validate(body, name))
            if current is None:
                raise _status(404, "NotFound", f'leases.{_GROUP} "{name}" not found', name)
            if method == "GET":
                return 200, copy.deepcopy(current)
            if method == "DELETE":
                del self._objects[key]
                self._next_rv()
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": name, "group": _GROUP, "kind": "leases",
                                         "uid": current["metadata"]["uid"]}}
            if method == "PUT":
                obj = copy.deepcopy(self._validate(body, name))
                meta = obj.setdefault("metadata", {})
                rv = meta.get("resourceVersion")
                if not rv:
                    raise _status(422, "Invalid", f'Lease.{_GROUP} "{name}" is invalid: metadata.resourceVersion: '
                                                  "Invalid value: 0x0: must be specified for an update", name)
                if rv != current["metadata"]["resourceVersion"]:
                    raise _status(409, "Conflict", f'Operation cannot be fulfilled on leases.{_GROUP} "{name}": '
                                                   "the object has been modified; please apply your changes to "
                                                   "the latest version and try again", name)
                for kept in ("uid", "creationTimestamp"):  # server-owned fields
                    meta[kept] = current["metadata"][kept]
                meta["namespace"] = ns
                obj["kind"], obj["apiVersion"] = "Lease", f"{_GROUP}/v1"
                if obj != current:  # a no-op update writes nothing and keeps the version
                    meta["resourceVersion"] = self._next_rv()
                    self._objects[key] = obj
                return 200, copy.deepcopy(self._objects[key])
            raise _status(405, "MethodNotAllowed", f"{method} is not supported")

    # -- HTTP plumbing -----------------------------------------------------------------------

    @staticmethod
    def _handler_class(server: FakeApiServer) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                method = self.command
                with server._lock:
                    fault = server._fault
                    if fault is not None and method in fault.methods:
                        if fault.remaining is not None:
                            fault.remaining -= 1
                            if fault.remaining <= 0:
                                server._fault = None
                    else:
                        fault = None
                barrier = None
                if method in ("POST", "PUT"):
                    with server._lock:
                        barrier = server._barrier
                        if barrier is not None:
                            server._barrier_left -= 1
                            if server._barrier_left <= 0:
                                server._barrier = None
                if barrier is not None:
                    barrier.wait(timeout=10)
                if fault is not None and fault.mode == "drop":
                    server._log(method, self.path, 0)
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None and fault.mode == "hang":
                    time.sleep(fault.hang_s)
                try:
                    if fault is not None:
                        raise _status(fault.status, _REASONS.get(fault.status, "InternalError"), "injected failure")
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        raise _status(400, "BadRequest", "the body of the request was not JSON") from None
                    code, payload = server.handle(method, self.path, body)
                except _Reply as reply:
                    code, payload = reply.code, reply.body
                data = json.dumps(payload).encode()
                server._log(method, self.path, code)
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and went away
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler

    def _log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

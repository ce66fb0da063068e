"""``kubernetes`` backend: one ``coordination.k8s.io/v1`` Lease object per GPU.

For clusters whose policy forbids the ``hostPath`` that the ``flock`` backend needs across pods.
Behaviour follows client-go's leader election (``tools/leaderelection``), with two additions that
the Python client's ``kubernetes.leaderelection`` lacks and a GPU hand-off needs:

- **Acquire**: read the Lease; create it when missing (409 ``AlreadyExists`` means someone else
  won), or take it over when it is free (empty ``holderIdentity``, i.e. released) or expired, with a
  ``replace`` that carries the ``resourceVersion`` read (409 ``Conflict`` means someone else wrote
  first). Every acquisition bumps ``leaseTransitions``; its new value is the fencing token.
- **Expiry is judged from local observation**, never from the ``renewTime`` in the object (clocks
  differ between nodes): a lease held by someone else counts as expired only once its spec has not
  changed for ``leaseDurationSeconds`` *as observed by this process*.
- **Renew** in a background thread every ``retry_period_s``. When no renewal succeeded for
  ``renew_deadline_s`` (measured from the moment the last successful renewal was *sent*) the holder
  marks itself ``lost``, records and logs it, and tells its observers so GPU work stops. Because
  ``lease_duration_s > renew_deadline_s``, it gives up before any peer may take over.
- **Release on exit**, client-go style: ``holderIdentity`` cleared, ``leaseDurationSeconds: 1``,
  so a peer takes over at its next poll instead of waiting out the duration.
- **Waiting peers** (fairness): a contender that waits writes the annotation
  ``trellisbox.io/waiting`` on the Lease (refreshed every ``lease_duration_s / 3``); the holder sees it
  on its renewals and yields at its next bounded-hold boundary.

Timing rule (client-go): ``lease_duration_s > renew_deadline_s > 1.2 × retry_period_s``.

Times written to the object are ``MicroTime`` values, which the API server parses with exactly six
fractional digits; the client's default serializer drops the fraction when it is zero (one write
in a million would get a 400), so requests go through :class:`MicroTimeApiClient`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from trellisbox._runtime.lease.base import AcquireCancelled, GpuLease, LeaseError, LeaseTimeout
from trellisbox._runtime.lease.records import LeaseRecorder

_log = logging.getLogger(__name__)

WAITING_ANNOTATION = "trellisbox.io/waiting"


def format_microtime(value: dt.datetime) -> str:
    """RFC 3339 with exactly six fractional digits, in UTC (naive values are taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class MicroTimeApiClient(k8s.ApiClient):
    """An ApiClient that writes every datetime as a ``MicroTime`` the API server accepts."""

    def sanitize_for_serialization(self, obj: Any) -> Any:
        if isinstance(obj, dt.datetime):
            return format_microtime(obj)
        return super().sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]


def coordination_api(configuration: k8s.Configuration | None = None) -> k8s.CoordinationV1Api:
    """A ``CoordinationV1Api`` over :class:`MicroTimeApiClient`.

    Without ``configuration``: the in-cluster service account, else the local kubeconfig. Hidden
    urllib3 retries are turned off so that every request fits inside the renew deadline.
    """
    if configuration is None:
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.retries = False
    return k8s.CoordinationV1Api(MicroTimeApiClient(configuration))


def check_timing(lease_duration_s: float, renew_deadline_s: float, retry_period_s: float) -> None:
    """Raise ValueError unless ``lease_duration_s > renew_deadline_s > 1.2 × retry_period_s > 0``."""
    if not (retry_period_s > 0 and lease_duration_s > renew_deadline_s > 1.2 * retry_period_s):
        raise ValueError(
            "lease timing must satisfy lease_duration_s > renew_deadline_s > 1.2 × retry_period_s > 0 "
            f"(client-go rule); got {lease_duration_s:g} > {renew_deadline_s:g} > "
            f"1.2 × {retry_period_s:g} = {1.2 * retry_period_s:g}"
        )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def describe_error(exc: BaseException) -> str:
    """One line for a failed API call (ApiException's str() carries headers and the whole body)."""
    if isinstance(exc, ApiException):
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(exc.body or "").get("message", "")
        hint = _HINTS.get(exc.status or 0, "")
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "") + (f" ({hint})" if hint else "")
    return f"{type(exc).__name__}: {exc}"


# What an operator checks first for the API errors that never heal by themselves.
_HINTS = {
    401: "the service account token is missing or invalid: automountServiceAccountToken",
    403: "RBAC: the pod's ServiceAccount needs get, create and update on leases.coordination.k8s.io in the "
         "lease namespace (Role/RoleBinding gpu-lease)",
    404: "does the lease namespace exist?",
    422: "the Lease name must be a DNS-1123 subdomain",
}


def _spec_key(lease: k8s.V1Lease) -> tuple[object, ...]:
    """What counts as "the record changed": the spec only. Annotation writes by waiters bump the
    resourceVersion but must not make a dead holder look alive."""
    spec = lease.spec or k8s.V1LeaseSpec()
    return (spec.holder_identity or "", spec.renew_time, spec.acquire_time, spec.lease_duration_seconds,
            spec.lease_transitions)


class KubernetesLease(GpuLease):
    """A GPU lease held as a ``coordination.k8s.io/v1`` Lease named ``name`` in ``namespace``.

    Args:
        name: Lease object name (one per GPU, e.g. ``node-a-gpu-0``).
        holder: ``holderIdentity``: the pod name; must be unique per contender.
        namespace: Namespace of the Lease object.
        api: A ready ``CoordinationV1Api`` (best built by :func:`coordination_api`).
        configuration: Used to build one when ``api`` is not given.
        lease_duration_s: ``leaseDurationSeconds`` written to the object (whole seconds).
        renew_deadline_s: A holder that could not renew for this long marks itself lost.
        retry_period_s: Renew interval and poll interval while waiting.
        request_timeout_s: Bound on each API request (default: ``renew_deadline_s / 3``, so that a
            hung request still leaves room for retries before the deadline).
        handoff_grace_s: Default bound for :meth:`wait_for_peer`.
    """

    def __init__(self, name: str, holder: str, *, namespace: str = "default",
                 api: k8s.CoordinationV1Api | None = None,
                 configuration: k8s.Configuration | None = None,
                 lease_duration_s: int = 15, renew_deadline_s: float = 10.0, retry_period_s: float = 2.0,
                 service: str = "", recorder: LeaseRecorder | None = None,
                 request_timeout_s: float | None = None, handoff_grace_s: float | None = None) -> None:
        super().__init__(name, holder, service=service, recorder=recorder)
        check_timing(lease_duration_s, renew_deadline_s, retry_period_s)
        if int(lease_duration_s) != lease_duration_s or lease_duration_s < 1:
            raise ValueError(f"lease_duration_s must be a whole number of seconds ≥ 1, got {lease_duration_s}")
        self.namespace = namespace
        self.lease_duration_s = int(lease_duration_s)
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.request_timeout_s = request_timeout_s or renew_deadline_s / 3
        self.handoff_grace_s = (handoff_grace_s if handoff_grace_s is not None
                                else 1.2 * retry_period_s + 2 * self.request_timeout_s)
        self._owns_api = api is None
        self._api = api if api is not None else coordination_api(configuration)
        self._state = threading.Lock()  # guards everything below; never held across a request
        self._held = False
        self._lost = False
        self._lost_reason = ""
        self._token: int | None = None
        self._last_renew = 0.0  # monotonic time the last successful write was *sent*
        self._gen = 0  # bumped on every acquire/release so a stale renew thread cannot touch state
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._acquiring = False
        self._closed = False
        # Local observations of the object (client-go's observedRecord / observedTime).
        self._obs_key: tuple[object, ...] | None = None
        self._obs_at = 0.0
        self._waiting_value: str | None = None
        self._waiting_at = 0.0
        self._my_wait_written_at: float | None = None
        self._last_error = ""  # the most recent failed renewal, for the lost reason
        self._acquire_cause = ""  # why the last acquisition attempt did not succeed, for LeaseTimeout

    # -- API helpers -------------------------------------------------------------------------

    def _get(self) -> k8s.V1Lease | None:
        try:
            return self._api.read_namespaced_lease(self.name, self.namespace,
                                                   _request_timeout=self.request_timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _replace(self, lease: k8s.V1Lease) -> k8s.V1Lease:
        """``PUT`` carrying the resourceVersion that was read: 409 when someone wrote in between."""
        return self._api.replace_namespaced_lease(self.name, self.namespace, lease,
                                                  _request_timeout=self.request_timeout_s)

    def _observe(self, lease: k8s.V1Lease, now: float) -> None:
        key = _spec_key(lease)
        annotations = (lease.metadata.annotations if lease.metadata else None) or {}
        waiting = annotations.get(WAITING_ANNOTATION)
        with self._state:
            if key != self._obs_key:
                self._obs_key, self._obs_at = key, now
            if waiting != self._waiting_value:
                self._waiting_value, self._waiting_at = waiting, now

    def _waiter(self) -> str | None:
        """The identity named by a fresh waiting annotation, if any (call with _state held)."""
        if not self._waiting_value:
            return None
        if time.monotonic() - self._waiting_at >= self.lease_duration_s:
            return None  # not refreshed for a whole lease duration: that waiter gave up or died
        try:
            who = json.loads(self._waiting_value).get("holder")
        except (ValueError, AttributeError):
            return None
        return who if isinstance(who, str) and who else None

    # -- acquire -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, *,
                cancelled: Callable[[], bool] | None = None) -> int:
        with self._state:
            if self._closed:
                raise LeaseError(f"lease {self.name} is closed")
            if self._held or self._lost:
                raise LeaseError(f"lease {self.name} is already held by this contender")
            if self._acquiring:
                raise LeaseError(f"an acquire of lease {self.name} is already in progress")
            self._acquiring = True
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        warned = ""  # the API error last logged at WARNING: each new cause once, repeats at DEBUG
        self._acquire_cause = ""
        try:
            while True:
                try:
                    got = self._try_acquire()
                except Exception as exc:  # API down, timeouts, bad responses: just try again later
                    cause = describe_error(exc)
                    self._acquire_cause = f"last API error: {cause}"
                    if cause != warned:
                        warned = cause
                        _log.warning("GPU lease %s/%s: acquiring as %s failed: %s; retrying every %g s",
                                     self.namespace, self.name, self.holder, cause, self.retry_period_s)
                    else:
                        _log.debug("acquire %s/%s: %s", self.namespace, self.name, cause)
                    got = None
                if got is not None:
                    token, sent_at = got
                    self._start_holding(token, sent_at)
                    return token
                # Jitter 1.0-1.2x: tighter than client-go's 1.0-2.2x (JitterFactor 1.2), since a waiter's poll
                # is the whole hand-off latency; two waiters (one per GPU) cannot stampede the API server.
                wake = time.monotonic() + self.retry_period_s * random.uniform(1.0, 1.2)  # nosec B311  # jitter
                if deadline is not None:
                    wake = min(wake, deadline)
                while (now := time.monotonic()) < wake:
                    if cancelled is not None and cancelled():
                        self._withdraw_waiting()
                        raise AcquireCancelled(f"stopped waiting for GPU lease {self.name}")
                    time.sleep(min(0.05, wake - now))
                if deadline is not None and time.monotonic() >= deadline:
                    self._withdraw_waiting()
                    raise LeaseTimeout(f"GPU lease {self.namespace}/{self.name} not acquired within "
                                       f"{timeout:.3g} s; {self._acquire_cause or 'no answer from the API server'}")
        finally:
            with self._state:
                self._acquiring = False

    def _try_acquire(self) -> tuple[int, float] | None:
        """One client-go ``tryAcquireOrRenew`` for a contender that does not hold the lease."""
        sent_at = time.monotonic()  # the holder's renew clock starts when its write is sent (safe side)
        lease = self._get()
        seen_at = time.monotonic()  # observations count from when the read returned (client-go; safe side)
        now = _utcnow()
        if lease is None:
            body = k8s.V1Lease(
                api_version="coordination.k8s.io/v1", kind="Lease",
                metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=k8s.V1LeaseSpec(holder_identity=self.holder, lease_duration_seconds=self.lease_duration_s,
                                     acquire_time=now, renew_time=now, lease_transitions=0),
            )
            try:
                created = self._api.create_namespaced_lease(self.namespace, body,
                                                            _request_timeout=self.request_timeout_s)
            except ApiException as exc:
                if exc.status == 409:  # AlreadyExists: another contender created it first
                    self._acquire_cause = "another contender created it first"
                    return None
                raise
            self._observe(created, time.monotonic())
            return 0, sent_at
        self._observe(lease, seen_at)
        spec = lease.spec or k8s.V1LeaseSpec()
        current = spec.holder_identity or ""
        duration = spec.lease_duration_seconds or self.lease_duration_s
        with self._state:
            valid = bool(current) and self._obs_at + duration > seen_at
        if valid and current != self.holder:
            self._acquire_cause = f"held by {current}"
            self._announce_waiting(lease)
            return None
        # Bumped on every acquisition, the same holder's re-acquisition after its own release included: it
        # counts turns (not changes of holder), and is the fencing token.
        token = (spec.lease_transitions or 0) + 1
        lease.spec = k8s.V1LeaseSpec(
            holder_identity=self.holder, lease_duration_seconds=self.lease_duration_s,
            acquire_time=now, renew_time=now, lease_transitions=token,
            preferred_holder=spec.preferred_holder, strategy=spec.strategy,
        )
        self._drop_own_waiting(lease)
        try:
            updated = self._replace(lease)
        except ApiException as exc:
            if exc.status == 409:  # Conflict: someone wrote since we read
                self._acquire_cause = "another contender wrote it first"
                return None
            raise
        self._observe(updated, time.monotonic())
        return token, sent_at

    def _start_holding(self, token: int, sent_at: float) -> None:
        with self._state:
            self._gen += 1
            gen = self._gen
            self._held, self._lost, self._lost_reason, self._last_error = True, False, "", ""
            self._token, self._last_renew = token, sent_at
            self._my_wait_written_at = None
            self._stop = threading.Event()
            self._renewer = threading.Thread(target=self._renew_loop, args=(gen, self._stop), daemon=True,
                                             name=f"lease-renew-{self.name}")
            self._renewer.start()
        self._record("acquire", token)
        _log.debug("acquired GPU lease %s/%s as %s (token %d)", self.namespace, self.name, self.holder, token)

    # -- waiting annotation ------------------------------------------------------------------

    def _announce_waiting(self, lease: k8s.V1Lease) -> None:
        """Tell the holder we wait (refreshing the annotation every lease_duration/3)."""
        now = time.monotonic()
        with self._state:
            recent = (self._my_wait_written_at is not None
                      and now - self._my_wait_written_at < self.lease_duration_s / 3)
        if lease.metadata is None:
            return
        annotations = dict(lease.metadata.annotations or {})
        if recent and self._names_me(annotations.get(WAITING_ANNOTATION)):
            return
        annotations[WAITING_ANNOTATION] = json.dumps(
            {"holder": self.holder, "at": format_microtime(_utcnow())}, separators=(",", ":"))
        lease.metadata.annotations = annotations
        try:
            updated = self._replace(lease)  # spec untouched: the holder's record does not change
        except ApiException as exc:
            if exc.status != 409:
                raise
            return  # the holder renewed in between; try again at the next poll
        with self._state:
            self._my_wait_written_at = now
        self._observe(updated, now)

    def _names_me(self, value: str | None) -> bool:
        try:
            return bool(value) and json.loads(value or "").get("holder") == self.holder
        except (ValueError, AttributeError):
            return False

    def _drop_own_waiting(self, lease: k8s.V1Lease) -> None:
        if lease.metadata is None:
            return
        annotations = lease.metadata.annotations or {}
        if self._names_me(annotations.get(WAITING_ANNOTATION)):
            lease.metadata.annotations = {k: v for k, v in annotations.items() if k != WAITING_ANNOTATION}

    def _withdraw_waiting(self) -> None:
        """Best effort: remove our waiting annotation when we stop waiting."""
        with self._state:
            if self._my_wait_written_at is None:
                return
            self._my_wait_written_at = None
        try:
            lease = self._get()
            if lease is not None and self._names_me(((lease.metadata.annotations or {}) if lease.metadata
                                                     else {}).get(WAITING_ANNOTATION)):
                self._drop_own_waiting(lease)
                self._replace(lease)
        except Exception as exc:  # it goes stale by itself after one lease duration
            _log.debug("could not withdraw waiting annotation on %s: %s", self.name, describe_error(exc))

    # -- renew -------------------------------------------------------------------------------

    def _renew_loop(self, gen: int, stop: threading.Event) -> None:
        failing_since: float | None = None
        while not stop.wait(self.retry_period_s):
            while True:  # one renewal: retry until it lands or the renew deadline passes
                if stop.is_set():
                    return
                with self._state:
                    if gen != self._gen or not self._held or self._lost:
                        return
                    silent = time.monotonic() - self._last_renew
                if silent > self.renew_deadline_s:
                    self._mark_lost(gen, self._silence_reason(silent))
                    return
                try:
                    outcome = self._renew_once(gen)
                except Exception as exc:  # API unreachable, 5xx, timeouts: retry within the deadline
                    outcome = "retry-later"
                    with self._state:
                        self._last_error = describe_error(exc)
                    if failing_since is None:  # once per outage; the rest at debug level
                        failing_since = time.monotonic()
                        _log.warning("renewing GPU lease %s/%s failed (%s); retrying until the renew "
                                     "deadline (%g s)", self.namespace, self.name, self._last_error,
                                     self.renew_deadline_s)
                    else:
                        _log.debug("renewing GPU lease %s/%s failed again: %s", self.namespace, self.name,
                                   self._last_error)
                if outcome == "ok":
                    with self._state:
                        self._last_error = ""
                    if failing_since is not None:
                        _log.info("GPU lease %s/%s renewed again after %.1f s of failures", self.namespace,
                                  self.name, time.monotonic() - failing_since)
                        failing_since = None
                if outcome in ("ok", "gone"):
                    break
                # "conflict" (a waiter annotated the object between our read and write): retry soon
                pause = min(self.retry_period_s / 2, 0.5) if outcome == "retry-later" else 0.01
                if stop.wait(pause):
                    return

    def _silence_reason(self, silent: float) -> str:
        with self._state:
            last = self._last_error
        return (f"no successful renewal for {silent:.1f} s (renew deadline {self.renew_deadline_s:g} s)"
                + (f"; last error: {last}" if last else ""))

    def _renew_once(self, gen: int) -> str:
        sent_at = time.monotonic()
        lease = self._get()
        if lease is None:
            self._mark_lost(gen, "the Lease object was deleted")
            return "gone"
        self._observe(lease, sent_at)
        spec = lease.spec or k8s.V1LeaseSpec()
        if (spec.holder_identity or "") != self.holder:
            self._mark_lost(gen, f"taken over by {spec.holder_identity!r}")
            return "gone"
        spec.renew_time = _utcnow()
        spec.lease_duration_seconds = self.lease_duration_s
        try:
            updated = self._replace(lease)
        except ApiException as exc:
            if exc.status == 409:
                return "conflict"
            raise
        self._observe(updated, sent_at)
        with self._state:
            if gen == self._gen and not self._lost:
                self._last_renew = sent_at
        return "ok"

    def _mark_lost(self, gen: int, reason: str) -> None:
        with self._state:
            if gen != self._gen or not self._held or self._lost:
                return
            self._lost, self._lost_reason = True, reason
            self._stop.set()
            token = self._token
        _log.error("GPU lease %s/%s LOST by %s: %s; no new GPU work starts until it is re-acquired",
                   self.namespace, self.name, self.holder, reason)
        self._record("lost", token, reason=reason)
        self._notify_lost()

    # -- release -----------------------------------------------------------------------------

    def release(self) -> None:
        with self._state:
            if not self._held and not self._lost:
                return
            self._gen += 1  # a renew thread still in flight can no longer change our state
            token = self._token
            self._held = self._lost = False
            self._lost_reason = ""
            self._token = None
            self._stop.set()
            renewer, self._renewer = self._renewer, None
        self._record("release", token)  # before the write: the recorded turn encloses the GPU work
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=self.request_timeout_s + 1.0)
        self._release_remote()

    def _release_remote(self) -> None:
        """client-go's release: clear holderIdentity, duration 1 s, keep leaseTransitions."""
        for _ in range(3):
            try:
                lease = self._get()
                if lease is None or (lease.spec and lease.spec.holder_identity) != self.holder:
                    return  # not ours (any more): nothing to give back
                now = _utcnow()
                spec = lease.spec or k8s.V1LeaseSpec()
                spec.holder_identity = ""
                spec.lease_duration_seconds = 1
                spec.acquire_time = now
                spec.renew_time = now
                self._replace(lease)
                return
            except ApiException as exc:
                if exc.status == 409:
                    continue
                _log.warning("releasing GPU lease %s/%s failed (%s); it expires by itself within %d s",
                             self.namespace, self.name, describe_error(exc), self.lease_duration_s)
                return
            except Exception as exc:
                _log.warning("releasing GPU lease %s/%s failed (%s); it expires by itself within %d s",
                             self.namespace, self.name, describe_error(exc), self.lease_duration_s)
                return

    def access_problem(self) -> str | None:
        """One read of the Lease: None when it answers (a missing Lease is fine: the first acquire creates it)."""
        try:
            self._get()
        except Exception as exc:
            return f"GPU lease {self.namespace}/{self.name} cannot be read: {describe_error(exc)}"
        return None

    def abandon(self) -> None:
        """Stop renewing without releasing, as if the process had died (for tests and drills).

        The object keeps naming this holder; peers take over once it has not changed for
        ``leaseDurationSeconds``. Locally the lease reads as not held.
        """
        with self._state:
            self._gen += 1
            self._held = self._lost = False
            self._token = None
            self._stop.set()

    # -- state -------------------------------------------------------------------------------

    def _check_expiry(self) -> None:
        with self._state:
            if not self._held or self._lost:
                return
            silent = time.monotonic() - self._last_renew
            gen = self._gen
        if silent > self.renew_deadline_s:  # the renew thread may be stuck in a request: judge here
            self._mark_lost(gen, self._silence_reason(silent))

    @property
    def held(self) -> bool:
        self._check_expiry()
        with self._state:
            return self._held and not self._lost

    @property
    def lost(self) -> bool:
        self._check_expiry()
        with self._state:
            return self._lost

    @property
    def lost_reason(self) -> str:
        with self._state:
            return self._lost_reason

    @property
    def token(self) -> int | None:
        with self._state:
            return self._token if self._held else None

    def peer_waiting(self) -> bool:
        with self._state:
            who = self._waiter()
        return who is not None and who != self.holder

    def wait_for_peer(self, timeout: float | None = None) -> bool:
        end = time.monotonic() + (self.handoff_grace_s if timeout is None else timeout)
        seen = False
        while time.monotonic() < end:
            try:
                lease = self._get()
            except Exception:
                return seen
            if lease is None:
                return seen
            self._observe(lease, time.monotonic())
            with self._state:
                who = self._waiter()
            if who is None or who == self.holder:
                return seen
            if lease.spec is not None and lease.spec.holder_identity == who:
                return True  # the peer has its turn
            seen = True
            time.sleep(min(self.retry_period_s / 4, max(0.0, end - time.monotonic())))
        return False

    def close(self) -> None:
        self.release()
        with self._state:
            if self._closed:
                return
            self._closed = True
        if self._owns_api:
            with contextlib.suppress(Exception):
                self._api.api_client.close()

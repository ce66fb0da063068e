"""flock backend: exclusion across processes, release on holder death, fencing tokens, fairness."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.lease.lease_helpers import HERE, check_records, child_env, wait_until
from trellisbox._runtime.lease import (
    AcquireCancelled,
    FlockLease,
    LeaseError,
    LeaseRecorder,
    LeaseTimeout,
    read_records,
)
from trellisbox._runtime.lease.flock import read_lock_file

pytestmark = pytest.mark.timeout(60)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "flock_contender.py"), *args], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_mutual_exclusion_across_processes(tmp_path: Path, record_path: Path) -> None:
    lease_dir, marker, turns = tmp_path / "lease", tmp_path / "inside", 12
    procs = [_spawn("--dir", str(lease_dir), "--holder", f"p{i}", "--service", f"svc{i}", "--record",
                    str(record_path), "--turns", str(turns), "--hold-ms", "3", "--marker", str(marker))
             for i in range(3)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    for proc in procs:  # release them together so that they really contend
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=45)[0] for proc in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all("VIOLATION" not in out for out in outputs)

    result = check_records(record_path)  # the independent checker agrees: no overlap
    assert not result["problems"]
    acquires = [r for r in result["records"] if r["event"] == "acquire"]
    assert len(acquires) == 3 * turns
    tokens = [r["token"] for r in acquires]  # records are in t_mono order
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), "tokens must strictly increase"
    assert tokens == list(range(1, 3 * turns + 1))
    assert read_lock_file(lease_dir / "gpu-0.lock")[0] == 3 * turns


def test_kill_9_of_holder_releases_at_once(tmp_path: Path, record_path: Path) -> None:
    lease_dir = tmp_path / "lease"
    proc = _spawn("--dir", str(lease_dir), "--holder", "victim", "--record", str(record_path), "--mode", "hang")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "HELD"
        victim_token = int(line[1])
        other = FlockLease("gpu-0", "survivor", lease_dir, service="svc",
                           recorder=LeaseRecorder(record_path))
        got: dict[str, float] = {}

        def take() -> None:
            got["token"] = other.acquire(timeout=20)
            got["at"] = time.monotonic()

        waiter = threading.Thread(target=take)
        waiter.start()
        time.sleep(0.3)
        assert "token" not in got, "the lock must stay held while its holder lives"
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)  # mid-turn: no release, no record
        waiter.join(timeout=10)
        assert "token" in got
        assert got["at"] - killed_at < 0.5, "the kernel must drop the dead holder's lock at once"
        assert got["token"] == victim_token + 1
        other.close()
    finally:
        proc.kill()
        proc.wait()
    result = check_records(record_path)
    assert any("never released" in p for p in result["problems"])  # the victim's open turn is reported


def test_tokens_strictly_increase_across_lease_objects(tmp_path: Path) -> None:
    tokens = []
    for i in range(5):
        with FlockLease("gpu-0", f"h{i}", tmp_path) as lease:
            tokens.append(lease.token)
    assert tokens == [1, 2, 3, 4, 5]
    assert read_lock_file(tmp_path / "gpu-0.lock") == (5, "h4")
    assert FlockLease("gpu-1", "x", tmp_path).acquire() == 1  # one counter per GPU


def test_timeout_cancel_and_abandoned_waits_pass_the_lock_on(tmp_path: Path) -> None:
    a, b, c = (FlockLease("gpu-0", h, tmp_path) for h in "abc")
    a.acquire()
    started = time.monotonic()
    with pytest.raises(LeaseTimeout, match="held by another contender"):
        b.acquire(timeout=0.2)
    assert 0.15 < time.monotonic() - started < 3.0  # gave up at about its timeout; margin for stalls
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    with pytest.raises(AcquireCancelled):
        b.acquire(cancelled=stop.is_set)
    a.release()
    # b's abandoned helper may grab the lock for a moment, but must hand it on: c gets it.
    assert c.acquire(timeout=2) > 0
    assert not b.held
    c.release()
    assert b.acquire(timeout=2) > 0  # and b itself can still acquire later
    b.release()


def _locked_by_someone(lock_path: Path) -> bool:
    """Whether some descriptor holds the exclusive flock on ``lock_path`` now (a fresh probe, not a lease)."""
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_peer_waiting_and_wait_for_peer(tmp_path: Path) -> None:
    a, b = FlockLease("gpu-0", "a", tmp_path), FlockLease("gpu-0", "b", tmp_path)
    a.acquire()
    assert not a.peer_waiting()
    thread = threading.Thread(target=b.acquire, kwargs={"timeout": 5})
    thread.start()
    assert wait_until(a.peer_waiting, 2), "a waiting contender must be visible to the holder"
    assert a.wait_for_peer(0.1) is False  # a still holds the lock, so b cannot take its turn: the grace runs out
    assert a.held and not b.held
    a.release()
    # Returns once b has taken its turn. Its value says whether a saw b still waiting, which depends on
    # whether b's thread took the lock before this line ran: the property is that b holds it afterwards.
    a.wait_for_peer(2)
    assert _locked_by_someone(a.lock_path), "wait_for_peer returned before the waiting peer had the lock"
    assert wait_until(lambda: b.held, 2)
    thread.join()
    assert not a.peer_waiting() and not b.peer_waiting()
    b.release()
    assert a.wait_for_peer(0.1) is False  # nobody waits: returns at once


def test_misuse_is_refused(tmp_path: Path) -> None:
    lease = FlockLease("gpu-0", "a", tmp_path)
    lease.release()  # not held: no-op
    lease.acquire()
    with pytest.raises(LeaseError):
        lease.acquire()
    assert lease.held and not lease.lost and lease.token == 1
    lease.close()
    assert not lease.held
    with pytest.raises(LeaseError):
        lease.acquire()


def test_records_bracket_the_hold(tmp_path: Path, record_path: Path) -> None:
    lease = FlockLease("gpu-0", "a", tmp_path, service="refiner", recorder=LeaseRecorder(record_path))
    with lease:
        pass
    events = read_records(record_path)
    assert [(e["event"], e["service"], e["holder"], e["gpu"], e["token"]) for e in events] == [
        ("acquire", "refiner", "a", "gpu-0", 1), ("release", "refiner", "a", "gpu-0", 1)]
    assert events[0]["t_mono"] <= events[1]["t_mono"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_access_problem_names_an_unwritable_lock_directory(tmp_path: Path) -> None:
    lease = FlockLease("gpu-0", "a", tmp_path)
    assert lease.access_problem() is None
    tmp_path.chmod(0o500)
    try:
        assert f"{tmp_path} is not writable" in (lease.access_problem() or "")
    finally:
        tmp_path.chmod(0o700)
    lease.close()

"""The result store on its own: retention, the size bound (oldest first), jobs that died with their gateway."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gateway.results import ResultStore


def _finished(store: ResultStore, request_id: str, size: int, fingerprint: str = "f") -> None:
    job_file = store.new_job_file(request_id)
    job_file.write_bytes(b"x" * size)
    store.publish(request_id, fingerprint, job_file)


def _age(store: ResultStore, request_id: str, seconds: float) -> None:
    meta_path = store.root / f"{request_id}.json"
    meta = json.loads(meta_path.read_text())
    meta["finished_at"] -= seconds
    meta_path.write_text(json.dumps(meta))


def test_a_result_is_found_until_its_retention_ends(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, retention_s=60, max_bytes=2**20, stale_after_s=600)
    _finished(store, "a", 100, fingerprint="fa")
    found = store.lookup("a")
    assert found is not None and found.fingerprint == "fa" and found.size == 100
    assert found.path.read_bytes() == b"x" * 100
    _age(store, "a", 61)
    assert store.lookup("a") is None
    assert not list(tmp_path.iterdir())  # the expired result's files are gone


def test_the_oldest_results_go_first_beyond_the_size_bound(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, retention_s=3600, max_bytes=250, stale_after_s=600)
    for index, request_id in enumerate(("old", "middle", "new")):
        _finished(store, request_id, 100)
        _age(store, request_id, 30 - index * 10)  # "old" finished first
    store.evict()
    assert store.lookup("old") is None
    assert store.lookup("middle") is not None and store.lookup("new") is not None


def test_nothing_is_kept_with_zero_retention(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, retention_s=0, max_bytes=2**20, stale_after_s=600)
    _finished(store, "a", 10)
    assert store.lookup("a") is None and not list(tmp_path.iterdir())


def test_job_files_of_a_dead_gateway_are_removed_at_start_and_live_ones_kept(tmp_path: Path) -> None:
    stale, live = tmp_path / "a.1234.partial", tmp_path / "b.5678.partial"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    ResultStore(tmp_path, retention_s=60, max_bytes=2**20, stale_after_s=600)
    assert not stale.exists() and live.exists()  # another replica sharing the directory may be writing the live one


def test_delete_says_whether_there_was_a_result(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, retention_s=60, max_bytes=2**20, stale_after_s=600)
    _finished(store, "a", 10)
    assert store.delete("a") is True
    assert store.delete("a") is False and store.lookup("a") is None

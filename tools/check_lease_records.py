#!/usr/bin/env python3
"""Check GPU lease records: no two holders may be GPU-active on the same GPU at the same time.

Usage: check_lease_records.py [--strict] [--json] FILE...

Reads JSON-lines lease records (one object per line; only these keys are used: ``event`` —
acquire | release | lost —, ``gpu``, ``holder``, ``service``, ``t_mono``, ``token``), pairs each
contender's acquire with its next release into a GPU-active interval, and fails when two intervals
of different contenders on the same GPU overlap. Records from several files (one per service, or
one shared file) are merged by ``t_mono``, which is one clock for all processes on a Linux host.

A turn that is never released (the holder was killed) has no known end: it is reported and
counted as ending at its last record. A ``lost`` event without a later ``release`` ends the turn at
the loss. ``--strict`` turns these, and fencing tokens that do not increase, into failures.

Exit status: 0 no overlap, 1 overlap (or a problem under --strict), 2 unreadable input.
Standalone on purpose: it only knows the record format, not the code that writes it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any


@dataclass
class Turn:
    gpu: str
    contender: str  # "service@holder"
    start: float
    end: float | None = None
    token: Any = None
    src: str = ""
    end_src: str = ""
    how: str = ""  # how it ended: release | lost | open

    @property
    def stop(self) -> float:
        return self.end if self.end is not None else self.start

    @property
    def length(self) -> float:
        return self.stop - self.start

    def describe(self) -> str:
        end = f"{self.end:.6f}" if self.end is not None else "never released"
        return f"{self.contender} [t_mono {self.start:.6f} → {end}, token {self.token}] ({self.src})"


class BadInput(Exception):
    pass


def load(paths: list[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in paths:
        try:
            fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below; line numbers needed
        except OSError as exc:
            raise BadInput(f"cannot read {path}: {exc}") from exc
        with fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                    if rec.get("event") not in ("acquire", "release", "lost"):
                        raise ValueError(f"unknown event {rec.get('event')!r}")
                    for key in ("gpu", "holder"):
                        if not isinstance(rec.get(key), str) or not rec[key]:
                            raise ValueError(f"missing {key!r}")
                    rec["t_mono"] = float(rec["t_mono"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise BadInput(f"{path}:{lineno}: malformed lease record: {exc}") from exc
                rec["_src"] = f"{path}:{lineno}"
                rec["_order"] = len(records)
                records.append(rec)
    records.sort(key=lambda r: (r["t_mono"], r["_order"]))
    return records


def build_turns(records: list[dict[str, Any]]) -> tuple[list[Turn], list[str], list[str]]:
    """Pair events into turns. Returns (turns, problems, notes): problems fail under --strict."""
    turns: list[Turn] = []
    problems: list[str] = []
    notes: list[str] = []
    open_turns: dict[tuple[str, str], Turn] = {}
    last_seen: dict[tuple[str, str], float] = {}
    for rec in records:
        contender = f"{rec.get('service') or '?'}@{rec['holder']}"
        key = (rec["gpu"], contender)
        t = rec["t_mono"]
        current = open_turns.get(key)
        if rec["event"] == "acquire":
            if current is not None:
                problems.append(f"{contender} acquired {rec['gpu']} again at {t:.6f} ({rec['_src']}) "
                                f"without releasing its turn from {current.start:.6f} ({current.src})")
                current.end, current.how, current.end_src = t, "open", rec["_src"]
                turns.append(current)
            open_turns[key] = Turn(rec["gpu"], contender, t, token=rec.get("token"), src=rec["_src"])
        elif rec["event"] == "release":
            if current is None:
                problems.append(f"{contender} released {rec['gpu']} at {t:.6f} ({rec['_src']}) without "
                                "an open turn")
                continue
            current.end, current.how, current.end_src = t, "release", rec["_src"]
            turns.append(open_turns.pop(key))
        else:  # lost: the turn stays open until the release that follows once GPU work stopped
            if current is None:
                notes.append(f"{contender} reported {rec['gpu']} lost at {t:.6f} ({rec['_src']}) with no "
                             "open turn")
                continue
            current.how = "lost"
            current.end_src = rec["_src"]
        last_seen[key] = t
    for key, turn in open_turns.items():
        if turn.how == "lost":
            turn.end = last_seen[key]
            problems.append(f"{turn.contender} lost {turn.gpu} and never recorded a release "
                            f"({turn.end_src}); its turn is taken to end at the loss")
        else:
            turn.end, turn.how = last_seen[key], "open"
            problems.append(f"{turn.contender}'s turn on {turn.gpu} from {turn.start:.6f} ({turn.src}) was "
                            "never released (holder killed?); its end is unknown")
        turns.append(turn)
    turns.sort(key=lambda tr: (tr.gpu, tr.start))
    # Fencing tokens must increase with acquisition order on each GPU (integers only).
    previous: dict[str, Turn] = {}
    for turn in turns:
        before = previous.get(turn.gpu)
        if (before is not None and isinstance(turn.token, int) and isinstance(before.token, int)
                and turn.token <= before.token):
            problems.append(f"fencing token did not increase on {turn.gpu}: {before.describe()} then "
                            f"{turn.describe()}")
        previous[turn.gpu] = turn
    return turns, problems, notes


def find_overlaps(turns: list[Turn]) -> list[tuple[Turn, Turn, float]]:
    """Pairs of turns of different contenders on one GPU whose intervals intersect (touching is fine)."""
    overlaps: list[tuple[Turn, Turn, float]] = []
    by_gpu: dict[str, list[Turn]] = defaultdict(list)
    for turn in turns:
        by_gpu[turn.gpu].append(turn)
    for gpu_turns in by_gpu.values():
        gpu_turns.sort(key=lambda tr: tr.start)
        active: list[Turn] = []
        for turn in gpu_turns:
            active = [a for a in active if a.stop > turn.start]
            for other in active:
                if other.contender != turn.contender:
                    overlap = min(other.stop, turn.stop) - turn.start
                    overlaps.append((other, turn, overlap))
            active.append(turn)
    return overlaps


def summarize(turns: list[Turn]) -> dict[str, Any]:
    gpus: dict[str, Any] = {}
    by_gpu: dict[str, list[Turn]] = defaultdict(list)
    for turn in turns:
        by_gpu[turn.gpu].append(turn)
    for gpu, gpu_turns in sorted(by_gpu.items()):
        gpu_turns.sort(key=lambda tr: tr.start)
        holders: dict[str, dict[str, float]] = {}
        for turn in gpu_turns:
            h = holders.setdefault(turn.contender, {"turns": 0, "active_s": 0.0, "max_hold_s": 0.0})
            h["turns"] += 1
            h["active_s"] += turn.length
            h["max_hold_s"] = max(h["max_hold_s"], turn.length)
        alternations = sum(1 for a, b in itertools.pairwise(gpu_turns)
                           if a.contender != b.contender)
        longest = max(gpu_turns, key=lambda tr: tr.length)
        gpus[gpu] = {
            "holders": {k: {"turns": int(v["turns"]), "active_s": round(v["active_s"], 6),
                            "max_hold_s": round(v["max_hold_s"], 6)} for k, v in sorted(holders.items())},
            "turns": len(gpu_turns), "alternations": alternations,
            "max_hold_s": round(longest.length, 6), "max_hold_by": longest.contender,
            "span_s": round(max(t.stop for t in gpu_turns) - gpu_turns[0].start, 6),
        }
    return gpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSONL lease record files")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on unreleased turns, unpaired events and non-increasing tokens")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        records = load(args.files)
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    turns, problems, notes = build_turns(records)
    overlaps = find_overlaps(turns)
    summary = summarize(turns)
    for a, b, seconds in overlaps:
        print(f"OVERLAP on {a.gpu} ({seconds * 1000:.3f} ms):\n  {a.describe()}\n  {b.describe()}")
    for line in problems:
        print(f"{'ERROR' if args.strict else 'warning'}: {line}", file=sys.stderr)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({"records": len(records), "overlaps": len(overlaps), "problems": problems,
                          "gpus": summary}, indent=2))
    else:
        print(f"{len(records)} records, {len(turns)} turns, {len(overlaps)} overlaps")
        for gpu, info in summary.items():
            print(f"{gpu}: {info['turns']} turns, {info['alternations']} alternations, max hold "
                  f"{info['max_hold_s']:.3f} s ({info['max_hold_by']})")
            for holder, h in info["holders"].items():
                print(f"  {holder}: {h['turns']} turns, active {h['active_s']:.3f} s, "
                      f"max hold {h['max_hold_s']:.3f} s")
    if overlaps:
        return 1
    return 1 if (args.strict and problems) else 0


if __name__ == "__main__":
    sys.exit(main())

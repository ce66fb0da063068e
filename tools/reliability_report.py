"""Write docs/reliability.md from what the reliability scenarios measured (``make reliability``).

    TRELLISBOX_RELIABILITY_OUT=bench/results/reliability.json pytest tests/reliability
    python tools/reliability_report.py bench/results/reliability.json docs/reliability.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HEADER = """# Reliability

Written by `make reliability`, which runs the scenarios in `tests/reliability` against real services on
loopback (they also run in `make test`) and renders what they measured. Each scenario asserts its own
outcome; this page is the record of one run.

| scenario | what was done | outcome | requests lost |
|---|---|---|---|
"""

LIMITS = """
## The gateway's memory ceiling

The gateway reads a request only when its byte budget (`--max-held-bytes`, 512 MiB) has room for the largest
request (`--max-request-bytes`, 64 MiB); until then HTTP/2 flow control keeps the upload at the client (the
servers do not probe bandwidth-delay, so a stream that is not being read buffers nothing). A read request then
holds its bytes, its costliest decode while its images are validated (refused before decoding when that does not
fit), and twice its bytes while routed (the stage request is a copy). The transport's buffers, the received bytes,
the parsed message and the serialized stage request exist side by side for a moment, so the ceiling is

    gateway RSS <= idle (about 80 MiB) + 2 x max_held_bytes

whatever the number of uploads: about 1.1 GiB at the defaults (the Kubernetes manifests give the gateway 1.5 GiB).
The scenario above checks it at a smaller budget with valid, invalid, corrupt and slow uploads at once. Uploads
are read `max_held_bytes / max_request_bytes` (8) at a time, in the order they came; one that takes longer than
`--receive-timeout-s` (120 s) to arrive is refused, so slow senders cannot hold the budget for long. Behind slow
client links, raise the budget or lower `--max-request-bytes`.

Durable requests (a `request_id`) survive a dropped connection: `tests/gateway/test_durable.py` cuts a client's
connection mid-request, and the client reattaches and gets the result computed once.
"""


def _row(name: str, fact: dict[str, Any]) -> str:
    if name.startswith("burst"):
        done = (f"{fact['sent']} requests at once against a capacity of {fact['capacity']} "
                f"(2 running + 4 queued); gateway peak RSS {fact['gateway_peak_rss_mib']} MiB")
        outcome = f"{fact['completed']} completed, {fact['refused']} refused cleanly (RESOURCE_EXHAUSTED only)"
        return f"| {name} | {done} | {outcome} | {fact['lost']} |"
    if name == "fuzz":
        statuses = ", ".join(f"{code} {count}" for code, count in sorted(fact["statuses"].items()))
        return (f"| fuzz (bad inputs) | {fact['cases']} calls: raw and mutated bytes, lying and broken images, NaN, "
                f"infinite, out-of-range and overlong values, to the gateway and each model service | {statuses}; "
                f"undocumented statuses {fact['undocumented']}; every service still up | 0 |")
    if name == "refiner replica killed mid-refinement":
        return (f"| {name} | kill -9 of the replica running the request | retried on the other replica, same seeds, "
                f"completed in {fact['seconds']} s | 0 |")
    if name == "TRELLIS killed mid-job":
        return (f"| {name} | kill -9 of the only TRELLIS service during the job | the caller got {fact['status']} "
                f"naming the stage after {fact['seconds_to_fail']} s; the gateway stayed up | 0 (failed cleanly) |")
    if name == "call past its connection's age":
        return (f"| {name} | a {fact['call_s']} s call on a server that ages connections out after "
                f"{fact['connection_age_s']} s | completed; the next call used a new connection | 0 |")
    if name.startswith("TRELLIS memory"):
        return (f"| {name} | 2048² noisy input, 4096² texture, GLB + PLY | RSS after each job "
                f"{fact['rss_mib_after_each']} MiB (growth {fact['growth_mib']} MiB) | 0 |")
    if name == "large and slow uploads":
        outcomes = "; ".join(f"{kind}: " + ", ".join(f"{count} {code}" for code, count in sorted(codes.items()))
                             for kind, codes in fact["outcomes"].items())
        return (f"| {name} | {fact['sent']} uploads of {fact['upload_mib']} MiB at once (valid, not an image, corrupt, "
                f"slow at 12 MiB/s) against a {fact['max_held_mib']} MiB budget | {outcomes}; gateway RSS "
                f"{fact['gateway_idle_rss_mib']} MiB idle, peak {fact['gateway_peak_rss_mib']} MiB (ceiling "
                f"{fact['ceiling_mib']} MiB) | 0 |")
    if name == "upload slower than the receive timeout":
        return (f"| {name} | {fact['upload_mib']} MiB at {fact['rate_mib_s']} MiB/s, receive timeout "
                f"{fact['receive_timeout_s']} s | {fact['outcome']} after {fact['refused_after_s']} s; "
                f"{fact['served_meanwhile']} other requests served meanwhile | 0 |")
    if name == "slow reader":
        return (f"| {name} | {fact['artifact_mib']} MiB of artifacts read at {fact['read_at_kib_s']} KiB/s | "
                f"every byte in {fact['slow_call_s']} s; {fact['fast_calls_meanwhile']} other calls served meanwhile "
                f"(slowest {fact['fast_call_max_s']} s); gateway RSS grew {fact['gateway_rss_growth_mib']} MiB | 0 |")
    return f"| {name} | | {json.dumps(fact)} | |"


def render(report: dict[str, Any]) -> str:
    rows = [_row(name, fact) for name, fact in report["facts"].items()]
    lost = sum(fact.get("lost", 0) for fact in report["facts"].values() if isinstance(fact, dict))
    footer = (f"\nRun {report['when']} on {report['machine']}; all scenarios passed: {report['passed']}. "
              f"Requests lost in all: {lost}.\n")
    return HEADER + "\n".join(rows) + "\n" + footer + LIMITS


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(render(json.loads(source.read_text())))
    print(f"wrote {target}")

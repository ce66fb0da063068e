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

NOT_YET = """
## Not covered yet

- **A hard memory ceiling for many large uploads at once.** gRPC receives each unary request whole before any
  handler runs. The gateway bounds what it holds past the transport (`--max-held-bytes`, refusal before any
  decoding, one image decoded at a time, the heap returned after large requests) and the calls it takes at
  once (`--max-concurrent-rpcs`), but 24 concurrent 62 MiB uploads still peaked at 2.5–4.6 GiB in the
  gateway here (4.9 GiB before), most of it in the transport's receive buffers. A real ceiling needs uploads
  streamed in chunks (a contract change).
- **Results that survive a disconnect** (idempotent request ids, a result store): not built yet.
- **A slow reader** is bounded by HTTP/2 flow control (`make bench` measures the gateway's memory with
  stalled readers); there is no scenario for it here yet.
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
    return f"| {name} | | {json.dumps(fact)} | |"


def render(report: dict[str, Any]) -> str:
    rows = [_row(name, fact) for name, fact in report["facts"].items()]
    lost = sum(fact.get("lost", 0) for fact in report["facts"].values() if isinstance(fact, dict))
    footer = (f"\nRun {report['when']} on {report['machine']}; all scenarios passed: {report['passed']}. "
              f"Requests lost in all: {lost}.\n")
    return HEADER + "\n".join(rows) + "\n" + footer + NOT_YET


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.write_text(render(json.loads(source.read_text())))
    print(f"wrote {target}")

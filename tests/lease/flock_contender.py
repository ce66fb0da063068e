"""A contender process for the flock tests (run as a script with the repository on PYTHONPATH).

turns mode: take ``--turns`` turns of ``--hold-ms`` each, proving exclusivity with an O_EXCL marker
file that only the holder may create. hang mode: acquire, print ``HELD <token>``, sleep until killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from trellisbox._runtime.lease import FlockLease, LeaseRecorder


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--name", default="gpu-0")
    parser.add_argument("--holder", required=True)
    parser.add_argument("--service", default="svc")
    parser.add_argument("--record", required=True)
    parser.add_argument("--mode", choices=("turns", "hang"), default="turns")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--hold-ms", type=float, default=2.0)
    parser.add_argument("--marker", default="")
    args = parser.parse_args()
    lease = FlockLease(args.name, args.holder, args.dir, service=args.service,
                       recorder=LeaseRecorder(args.record, backend="flock"))
    if args.mode == "hang":
        token = lease.acquire(timeout=30)
        print(f"HELD {token}", flush=True)
        time.sleep(120)
        return 0
    marker = Path(args.marker)
    print("READY", flush=True)
    sys.stdin.readline()  # start together
    for _ in range(args.turns):
        lease.acquire(timeout=60)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        except FileExistsError:
            print(f"VIOLATION {args.holder}", flush=True)
            return 3
        os.write(fd, args.holder.encode())
        os.close(fd)
        time.sleep(args.hold_ms / 1000)
        os.unlink(marker)
        lease.release()
    lease.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

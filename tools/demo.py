"""``make demo`` / ``make run``: the three services on this machine, and one image through them.

    python -m tools.demo --out out          # start, refine + generate the bundled example, stop
    python -m tools.demo --serve            # start and keep serving until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import trellisbox
from tools.stack import LocalStack
from trellisbox.cli import StageBars, print_summary, write_outputs
from trellisbox.client import TrellisBoxClient
from webui.app import WebUI

EXAMPLE_IMAGE = Path(trellisbox.__file__).parent / "assets" / "example.png"
_console = Console(stderr=True)


def _explain_backends(refiner_backend: str, generator_backend: str, requested: tuple[str, str]) -> None:
    if requested[0] == "auto" and refiner_backend != "sdxl":
        _console.print(f"[yellow]refiner: auto chose '{refiner_backend}' (no CUDA GPU or no SDXL-refiner "
                       "weights here); point --refiner-model at weights on a GPU host for SDXL[/yellow]")
    if requested[1] == "auto" and generator_backend != "trellis":
        _console.print(f"[yellow]generator: auto chose '{generator_backend}' (no CUDA GPU, TRELLIS install or "
                       "weights here); run the TRELLIS image on a GPU host for the real model[/yellow]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default %(default)s)")
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE, help="input image (default: bundled example)")
    parser.add_argument("--refiner-backend", default="auto", choices=("auto", "sdxl", "classic"))
    parser.add_argument("--refiner-model", default=None, help="refiner model id, local folder or 'tiny'")
    parser.add_argument("--trellis-backend", default="auto", choices=("auto", "trellis", "preview"))
    parser.add_argument("--trellis-model", default=None, help="TRELLIS model id or local folder")
    parser.add_argument("--placement", default="dedicated", choices=("dedicated", "shared"),
                        help="shared: both model services time-share one GPU under a flock lease")
    parser.add_argument("--serve", action="store_true", help="keep the stack running until Ctrl-C")
    parser.add_argument("--web-port", type=int, default=8080, help="with --serve: the web form's port (0: off)")
    parser.add_argument("--gateway-port", type=int, default=0)
    parser.add_argument("--refiner-port", type=int, default=0)
    parser.add_argument("--trellis-port", type=int, default=0)
    args = parser.parse_args(argv)

    refiner_args = ["--backend", args.refiner_backend] + (["--model", args.refiner_model] if args.refiner_model else [])
    trellis_args = ["--backend", args.trellis_backend] + (["--model", args.trellis_model] if args.trellis_model else [])
    if args.placement == "shared":
        # One lease for both services; the record shows every hand-off (tools/check_lease_records.py).
        shared = ["--placement", "shared", "--lease-backend", "flock", "--lease-dir", str(args.out / "lease"),
                  "--lease-record", str(args.out / "lease-records.jsonl")]
        refiner_args += shared
        trellis_args += shared
    ports = {name: port for name, port in (("gateway", args.gateway_port), ("refiner", args.refiner_port),
                                           ("trellis", args.trellis_port)) if port}
    log_dir = args.out / "logs"
    _console.print(f"starting refiner, trellis and gateway (logs in {log_dir}/) ...")
    started = time.monotonic()
    try:
        with LocalStack(log_dir, refiner_args=refiner_args, trellis_args=trellis_args, ports=ports) as stack:
            _console.print(f"stack ready in {time.monotonic() - started:.1f} s; gateway at {stack.gateway_target}")
            if args.serve:
                stop = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                if args.web_port:
                    web = WebUI(stack.gateway_target, args.out / "web").server("127.0.0.1", args.web_port)
                    threading.Thread(target=web.serve_forever, daemon=True).start()
                    _console.print(f"web form on http://127.0.0.1:{web.server_port}")
                _console.print("serving; Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    stop.wait()
                return 0
            with TrellisBoxClient(stack.gateway_target) as client, Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=_console,
            ) as progress:
                result = client.generate([args.image], refine=True, formats=["glb", "refined", "ply"],
                                         on_progress=StageBars(progress))
            stem = args.image.stem
            written = write_outputs(result, args.out / f"{stem}.glb", args.out / f"{stem}.refined.png",
                                    args.out / f"{stem}.ply")
            print_summary(result, written)
            _explain_backends(result.refiner_backend, result.generator_backend,
                              (args.refiner_backend, args.trellis_backend))
    except (RuntimeError, TimeoutError) as exc:
        _console.print(f"[red]demo failed: {exc}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

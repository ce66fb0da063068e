"""``make demo`` / ``make run``: the three services on this machine, and one image through them.

    python -m tools.demo --out out          # start, refine + generate the bundled example, stop
    python -m tools.demo --serve            # start and keep serving until Ctrl-C
    python -m tools.demo --serve --secure   # the same with TLS everywhere and a token (certificates in out/tls)
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

import trellisbox
from tools.devcerts import write_dev_certs, write_private
from tools.stack import LocalStack, StackSecurity, check_ports
from trellisbox.cli import OutputError, StageBars, print_summary, stage_progress, write_outputs
from trellisbox.client import TrellisBoxClient

EXAMPLE_IMAGE = Path(trellisbox.__file__).parent / "assets" / "example.png"
_console = Console(stderr=True)


def _explain_backends(refiner_backend: str, generator_backend: str, requested: tuple[str, str]) -> None:
    if requested[0] == "auto" and refiner_backend != "sdxl":
        _console.print(f"[yellow]refiner: auto chose '{refiner_backend}' (no CUDA GPU or no SDXL-refiner "
                       "weights here); point --refiner-model at weights on a GPU host for SDXL[/yellow]")
    if requested[1] == "auto" and generator_backend != "trellis":
        _console.print(f"[yellow]generator: auto chose '{generator_backend}' (no CUDA GPU, TRELLIS install or "
                       "weights here); run the TRELLIS image on a GPU host for the real model[/yellow]")


def _dev_security(folder: Path) -> StackSecurity:
    """A new dev CA and certificates in ``folder``, and a token (kept from an earlier run, else a new one)."""
    write_dev_certs(folder)
    token_file = folder / "token"
    if not token_file.is_file():
        write_private(token_file, f"{secrets.token_urlsafe(32)}\n".encode())
    return StackSecurity(folder, token_file)


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
    parser.add_argument("--gaussian-refinement", type=int, default=0, metavar="STEPS",
                        help="also fit the generated Gaussians to the image with this step budget "
                             "(docs/gaussian-refinement.md; 0: off, the default)")
    parser.add_argument("--novel-views", action="store_true",
                        help="with --gaussian-refinement: also fit to views from around the object refined by the "
                             "refiner (written as OUT/NAME.novel-N.png)")
    parser.add_argument("--serve", action="store_true", help="keep the stack running until Ctrl-C")
    parser.add_argument("--secure", action="store_true", help="TLS at the gateway, mutual TLS inside and a bearer "
                        "token: a new dev CA and certificates in OUT/tls, the token in OUT/tls/token")
    parser.add_argument("--web-port", type=int, default=8080, help="with --serve: the web app's port (-1: off)")
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
    security = _dev_security(args.out / "tls") if args.secure else None
    connection = security.client_options() if security else {}
    started = time.monotonic()
    try:
        web_port = args.web_port if args.serve and args.web_port >= 0 else None
        check_ports({**ports, **({"web": web_port} if web_port else {})},
                    "; e.g. make run GATEWAY_PORT=50061 REFINER_PORT=50062 TRELLIS_PORT=50063 WEB_PORT=8081")
        _console.print(f"starting refiner, trellis and gateway (logs in {log_dir}/) ...")
        with LocalStack(log_dir, refiner_args=refiner_args, trellis_args=trellis_args, ports=ports,
                        security=security) as stack:
            _console.print(f"stack ready in {time.monotonic() - started:.1f} s; gateway at {stack.gateway_target}")
            if security is not None:
                _console.print(f"TLS and a token: trellisbox generate IMAGE -o model.glb --target "
                               f"{stack.gateway_target} --ca-file {security.ca_file} --token-file "
                               f"{security.token_file}", markup=False)
            if args.serve:
                stop = threading.Event()
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
                if web_port is not None:
                    _console.print("starting the web app ...")
                    from webui.app import WebApp  # Gradio: only when serving

                    web = WebApp(stack.gateway_target, args.out / "web", connection=connection)
                    _, url = web.launch("127.0.0.1", web_port, block=False)
                    _console.print(f"web app on [bold]{url}[/bold]")
                _console.print("serving; Ctrl-C to stop")
                with contextlib.suppress(KeyboardInterrupt):
                    stop.wait()
                _console.print("stopping ...")
                return 0
            with TrellisBoxClient(stack.gateway_target, **connection) as client, \
                    stage_progress(_console) as progress:
                bars = StageBars(progress, f"sending {args.image.name}")
                try:
                    novel_views = bool(args.gaussian_refinement and args.novel_views)
                    refinement = ({"gaussian_refinement": {"enabled": True, "steps": args.gaussian_refinement,
                                                           "novel_views": novel_views}}
                                  if args.gaussian_refinement else {})
                    result = client.generate([args.image], refine=True,
                                             formats=["glb", "refined", "ply"] + (["novel_views"] if novel_views
                                                                                  else []),
                                             generation=refinement, on_progress=bars)
                except BaseException:
                    bars.finish(done=False)
                    raise
                bars.finish()
            stem = args.image.stem
            written = write_outputs(result, args.out / f"{stem}.glb", args.out / f"{stem}.refined.png",
                                    args.out / f"{stem}.ply", args.out / f"{stem}.novel.png")
            print_summary(result, written)
            _explain_backends(result.refiner_backend, result.generator_backend,
                              (args.refiner_backend, args.trellis_backend))
    except (RuntimeError, TimeoutError, OutputError) as exc:
        _console.print(f"{'make run' if args.serve else 'demo'} failed: {exc}", style="red", markup=False)
        return 1
    except KeyboardInterrupt:
        _console.print("stopped")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wheels the refiner benchmarks need on a CUDA host whose Python already has PyTorch but not this project.

``python tools/device_wheels.py [--dest .whl] [--python-version 3.12]`` (``make device-wheels``)

A lent GPU machine here reaches no package registry. Its Python (3.12) brings torch, transformers,
accelerate, huggingface-hub, safetensors, numpy, pillow, prometheus-client, rich and the rest of the
scientific stack, but not diffusers, pydantic(-settings), the gRPC companions, or this project's pinned
grpcio and protobuf (the generated stubs check the protobuf version at import). This downloads those, at
the versions installed in this environment (the ones ``make test`` ran against), as wheels for that Python
on x86-64 Linux, into a folder that travels with the working tree. docs/refiner-performance.md gives the
command that installs them there and runs the benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess  # nosec B404  # runs pip download, an argv list
import sys
from pathlib import Path

#: Distributions the refiner code path imports that the device image lacks, or has at another version
#: than the one this project pins.
MISSING_ON_DEVICE = (
    "diffusers",
    "importlib-metadata",  # a diffusers requirement
    "zipp",  # importlib-metadata's
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "typing-inspection",
    "annotated-types",
    "typing-extensions",
)
#: Tags pip matches exactly, newest first (manylinux wheels name one or several of them).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: What may travel to the device in one call, the working tree included.
CARRY_LIMIT_BYTES = 64 * 2**20


def pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for each distribution as installed here; a missing one is an error."""
    requirements = []
    for name in names:
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in this environment: run `make install` first") from None
    return requirements


def download(dest: Path, python_version: str) -> int:
    """Fetch the wheels into an emptied ``dest``; returns their total size in bytes."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += pinned(MISSING_ON_DEVICE)
    subprocess.run(command, check=True)  # nosec B603  # pip with pinned names, no shell
    return sum(path.stat().st_size for path in dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="an ignored folder in the repository")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (major.minor)")
    args = parser.parse_args(argv)
    total = download(args.dest, args.python_version)
    wheels = sorted(path.name for path in args.dest.glob("*.whl"))
    print("\n".join(wheels))
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}/")
    if total > CARRY_LIMIT_BYTES // 2:
        print(f"warning: over half of the {CARRY_LIMIT_BYTES // 2**20} MiB a device call may carry", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate the Python stubs of ``proto/trellisbox/v1`` (``make proto``; also used by the drift test).

    python -m tools.protogen OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Write ``trellisbox/v1/*_pb2*.py[i]`` under ``out_dir``; returns the files written."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    plugin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "trellisbox" / "v1").glob("*.proto"))
    (out_dir / "trellisbox" / "v1").mkdir(parents=True, exist_ok=True)
    for mypy_plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        if not (plugin_dir / mypy_plugin).exists() and shutil.which(mypy_plugin) is None:
            raise SystemExit(f"{mypy_plugin} not found: install the dev extra (mypy-protobuf)")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy', path=str(plugin_dir)) or 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc="
        f"{shutil.which('protoc-gen-mypy_grpc', path=str(plugin_dir)) or 'protoc-gen-mypy_grpc'}",
        f"--mypy_out=quiet:{out_dir}",
        f"--mypy_grpc_out=quiet:{out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "trellisbox" / "v1").glob("*_pb2*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)

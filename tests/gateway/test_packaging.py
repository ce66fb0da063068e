"""What each part installs and imports: the gateway and the client without torch, the services without the
client apps and dev tools."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gateway_and_client_import_no_model_library() -> None:
    code = (
        "import sys, gateway.__main__, gateway.router, trellisbox.client, trellisbox.cli, tools.demo\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'trimesh', 'scipy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_services_import_neither_the_client_apps_nor_the_dev_tools() -> None:
    # The services' images install only the base dependencies and their own extra: rich (the CLI's) is not there.
    code = (
        "import sys, gateway.__main__, refiner_service.__main__, trellis_service.__main__\n"
        "apps = sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'tools', 'webui', 'bench')\n"
        "              or m in ('trellisbox.cli', 'trellisbox.client'))\n"
        "assert not apps, apps\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_service_dependencies_leave_out_the_client_apps() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for service in ("gateway", "refiner", "trellis"):
        names = {d.split("=")[0].split(">")[0].split("<")[0].strip().lower()
                 for d in project["dependencies"] + extras[service]}
        assert "rich" not in names, service
    assert any(d.startswith("rich") for d in extras["client"])


def test_base_and_gateway_dependencies_pull_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gateway = project["dependencies"] + project["optional-dependencies"]["gateway"]
    assert not [d for d in gateway if d.split("=")[0].split(">")[0].strip().lower() in {"torch", "diffusers"}]


def test_grpc_stack_and_protobuf_are_pinned_together() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in deps["dependencies"] + deps["optional-dependencies"]["dev"]
            if d.startswith(("grpcio", "protobuf"))]
    assert all("==" in d for d in pins), pins
    versions = {d.split("==")[1] for d in pins if d.startswith("grpcio")}
    assert len(versions) == 1, pins

"""The layout's rules, read from the imports: backends never see protobuf or gRPC, the shared runtime never
reaches for the apps or tools, and no service imports another service."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "refiner_service", "trellis_service")


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative imports resolved against its package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            yield node.lineno, module
            for alias in node.names:  # `from trellisbox import v1` imports the stubs too
                yield node.lineno, f"{module}.{alias.name}"


def files(*patterns: str) -> list[Path]:
    return sorted(path for pattern in patterns for path in ROOT.glob(pattern))


def offending(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in paths for line, module in imports(path)
            if module.startswith(forbidden)]


def test_backends_never_see_protobuf_or_grpc() -> None:
    backends = files("refiner_service/backends/**/*.py", "trellis_service/backends/**/*.py",
                     "trellis_service/domain.py", "trellis_service/exporters.py", "refiner_service/api.py")
    assert len(backends) >= 8
    assert offending(backends, ("trellisbox.v1", "google.protobuf", "grpc")) == []


def test_the_shared_runtime_never_reaches_for_apps_or_tools() -> None:
    runtime = files("trellisbox/_domain/**/*.py", "trellisbox/_runtime/**/*.py")
    apps = ("tools", "webui", "bench", "rich", "trellisbox.cli", "trellisbox.client", *SERVICES)
    assert offending(runtime, apps) == []
    # The domain is what the client needs too: nothing of the server runtime.
    assert offending(files("trellisbox/_domain/**/*.py"), ("trellisbox._runtime", "grpc")) == []


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another(service: str) -> None:
    others = (*(s for s in SERVICES if s != service), "tools", "webui", "bench")
    assert offending(files(f"{service}/**/*.py"), others) == []

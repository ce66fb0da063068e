"""Every image can import what the rendered configuration selects, with only that image's extras installed.

The class of bug: a module that the manifests switch on (a lease backend, a model backend) imports a package
that only another extra (``dev``, say) installs, so the pod fails with ImportError at start although every
test passes in the development environment, which has all extras. For each overlay and each container of
a project image, a fresh interpreter gets the container's rendered environment, with every distribution that
the project's other extras would bring (and this image's extras do not) made unimportable, and then imports
the service's entry module and its configured backend module and builds the configured GPU lease.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.k8s import k8sutil

DOCKER = k8sutil.REPO / "docker"
# Image (repository name in the manifests) -> the service package it runs and its settings class.
SERVICES = {
    "gateway": ("gateway", "gateway.config:GatewaySettings"),
    "refiner": ("refiner_service", "refiner_service.config:RefinerSettings"),
    "trellis": ("trellis_service", "trellis_service.config:TrellisSettings"),
}
# Sample values for the downward-API fields the manifests expand with $(VAR).
FIELD_SAMPLES = {"metadata.name": "models-5d8f7c9b4-x2x7q", "metadata.namespace": "trellisbox",
                 "spec.nodeName": "gpu-node-a"}

# Runs in a fresh interpreter: block the distributions, apply the environment, import and build.
_PROBE = r"""
import importlib, importlib.abc, json, os, sys
spec = json.loads(sys.argv[1])
blocked = frozenset(spec["blocked"])

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in the {spec['image']} image)",
                                      name=name)
        return None

sys.meta_path.insert(0, Block())
os.environ.update(spec["env"])
for module in spec["modules"]:
    importlib.import_module(module)
if spec["settings"]:
    module, _, cls = spec["settings"].partition(":")
    settings = getattr(importlib.import_module(module), cls)(_env_file=None)
    if hasattr(settings, "shared"):
        from trellisbox._runtime.lease import make_lease
        lease = make_lease(settings, spec["image"], kube_api=object())
        print(type(lease).__name__ if lease is not None else "no lease")
"""


def dockerfile_extras(image: str) -> set[str]:
    """The project extras the image's Dockerfile installs (``pip install '...[refiner]'``)."""
    text = (DOCKER / f"{image}.Dockerfile").read_text()
    found = re.findall(r"pip install(?:\\\n|[^\n])*?\[([a-z0-9_,-]+)\]", text)  # across continued lines
    assert found, f"docker/{image}.Dockerfile installs no project extra"
    return {extra for group in found for extra in group.split(",")}


@cache
def project_requirements() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((k8sutil.REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _closure(requirements: list[str], extras: set[str]) -> set[str]:
    """Canonical names of these requirements and, through the installed metadata, of all they depend on."""
    _, optional = project_requirements()
    self_name = canonicalize_name("trellisbox-serving")
    names: set[str] = set()
    todo: list[tuple[str, str]] = [(r, extra) for extra in extras for r in optional.get(extra, [])]
    todo += [(r, "") for r in requirements]
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if name == self_name:  # `all = [trellisbox-serving[...]]`
            todo += [(r, e) for e in req.extras for r in optional.get(e, [])]
            continue
        if name in names:
            continue
        names.add(name)
        try:
            dist_requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [(r, e) for r in dist_requires for e in (req.extras or {""})]
    return names


def image_distributions(image: str) -> set[str]:
    base, _ = project_requirements()
    return _closure(base, dockerfile_extras(image))


def blocked_modules(image: str) -> list[str]:
    """Top-level modules that only distributions outside the image (but inside some extra) provide."""
    _, optional = project_requirements()
    everything = _closure([], set(optional))
    allowed = image_distributions(image)
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        providers = {canonicalize_name(d) for d in dists}
        if providers & everything and not providers & allowed:
            blocked.add(module)
    return sorted(blocked)


def expanded_env(objs: tuple[k8sutil.Obj, ...], container: k8sutil.Obj) -> dict[str, str]:
    """The container's configured environment with the downward-API references ``$(VAR)`` filled in."""
    fields = {item["name"]: FIELD_SAMPLES[item["valueFrom"]["fieldRef"]["fieldPath"]]
              for item in container.get("env", []) if "fieldRef" in item.get("valueFrom", {})}
    env = {**fields, **k8sutil.config_env(objs, container)}
    return {key: re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value) for key, value in env.items()}


def image_of(container: k8sutil.Obj) -> str | None:
    """The project image a container runs ("refiner"), whatever registry, tag or digest it names."""
    match = re.search(r"trellisbox/(gateway|refiner|trellis)(?=[:@]|$)", container["image"])
    return match[1] if match else None


def probe_cases() -> list[Any]:
    cases = []
    for overlay in k8sutil.OVERLAYS:
        for workload, container in k8sutil.iter_containers(k8sutil.render(overlay)):
            image = image_of(container)
            if image is not None:
                cases.append(pytest.param(overlay, workload["metadata"]["name"], container["name"],
                                          id=f"{overlay}-{workload['metadata']['name']}-{container['name']}"))
    return cases


def test_extras_of_each_image_are_known() -> None:
    _, optional = project_requirements()
    for image in SERVICES:
        assert dockerfile_extras(image) <= set(optional), image


def test_the_kubernetes_lease_backend_ships_in_both_model_images() -> None:
    for image in ("refiner", "trellis"):
        assert "kubernetes" in image_distributions(image), f"{image} image cannot run LEASE_BACKEND=kubernetes"
    assert "kubernetes" not in image_distributions("gateway")


def test_the_probe_catches_a_missing_distribution() -> None:
    """The blocker really blocks: the gateway image has no kubernetes client."""
    spec = {"image": "gateway", "blocked": blocked_modules("gateway"), "env": {},
            "modules": ["trellisbox._runtime.lease.kube"], "settings": ""}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True,
                          cwd=k8sutil.REPO, timeout=120, check=False)
    assert proc.returncode != 0
    assert "No module named 'kubernetes'" in proc.stderr


#: What turning tracing on (TRACING=true or OTLP_ENDPOINT) imports: any deployment may, without a new image.
TRACING_MODULES = ["trellisbox._runtime.tracing", "opentelemetry.sdk.trace",
                   "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry.instrumentation.grpc"]


@pytest.mark.parametrize("image", list(SERVICES))
def test_every_service_image_can_turn_tracing_on(image: str) -> None:
    package, settings = SERVICES[image]
    spec = {"image": image, "blocked": blocked_modules(image), "env": {f"TRELLISBOX_{image.upper()}_TRACING": "true"},
            "modules": [f"{package}.__main__", *TRACING_MODULES], "settings": settings}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True,
                          cwd=k8sutil.REPO, timeout=120, check=False)
    assert proc.returncode == 0, f"{image} image cannot trace:\n{proc.stderr[-3000:]}"


def test_the_web_app_image_carries_no_tracing_sdk() -> None:
    """The probe would notice a missing extra: the web app's image has no OpenTelemetry SDK (it needs none)."""
    assert "opentelemetry-sdk" in _closure([], {"tracing"})
    assert "opentelemetry-sdk" not in image_distributions("webui")


@pytest.mark.parametrize(("overlay", "workload", "container"), probe_cases())
def test_configured_modules_import_with_the_image_extras(overlay: str, workload: str, container: str) -> None:
    objs = k8sutil.render(overlay)
    spec_container = next(c for w, c in k8sutil.iter_containers(objs)
                          if w["metadata"]["name"] == workload and c["name"] == container)
    image = image_of(spec_container)
    assert image is not None
    package, settings = SERVICES[image]
    env = expanded_env(objs, spec_container)
    modules = [f"{package}.__main__"]
    backend = env.get(f"TRELLISBOX_{image.upper()}_BACKEND")
    if backend is not None and backend != "auto":
        modules.append(f"{package}.backends.{backend}")
    spec = {"image": image, "blocked": blocked_modules(image), "env": env, "modules": modules, "settings": settings}
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True,
                          cwd=k8sutil.REPO, timeout=120, check=False)
    assert proc.returncode == 0, f"{overlay} {workload}/{container} ({image} image):\n{proc.stderr[-3000:]}"
    lease_backend = env.get(f"TRELLISBOX_{image.upper()}_LEASE_BACKEND")
    if env.get(f"TRELLISBOX_{image.upper()}_PLACEMENT") == "shared":
        expected = {"flock": "FlockLease", "kubernetes": "KubernetesLease"}[lease_backend or "flock"]
        assert proc.stdout.strip() == expected

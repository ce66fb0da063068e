"""The optional web app component (k8s/components/webui) renders on an overlay and validates strictly, and its
pod is hardened like the others."""

from __future__ import annotations

from pathlib import Path

from tests.k8s import k8sutil


def test_the_webui_component_renders_and_validates(tmp_path: Path) -> None:
    objs = k8sutil.render_with_component("webui", "cpu-preview", tmp_path)
    assert k8sutil.validate_all(objs, k8sutil.K8S_VERSION) == []
    deployment = k8sutil.get(objs, "Deployment", "webui")
    service = k8sutil.get(objs, "Service", "webui")
    assert k8sutil.selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    (container,) = k8sutil.containers(deployment)
    assert container["image"].endswith("trellisbox/webui")
    assert "--target" in container["args"] and "gateway:50051" in container["args"]
    assert k8sutil.get(objs, "Service", "gateway")["spec"]["ports"][0]["port"] == 50051
    pod = k8sutil.pod_spec(deployment)
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert {"startupProbe", "readinessProbe", "livenessProbe", "resources"} <= set(container)
    policies = [p for p in k8sutil.of_kind(objs, "NetworkPolicy")
                if k8sutil.label_selector_matches(p["spec"]["podSelector"], {"app.kubernetes.io/name": "webui"})]
    ports = {port["port"] for p in policies for rule in p["spec"].get("ingress", []) for port in rule.get("ports", [])}
    assert 8080 in ports

"""Properties of the rendered manifests that schemas cannot check (no API server runs here).

GPU placement, the headless refiner Service and the gateway's target, the autoscaler, probes,
security contexts, the shared-GPU pod and its lease, cross-references between objects (ConfigMaps,
ServiceAccounts, volumes, selectors, ports), and the service settings the ConfigMaps produce.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s import k8sutil
from tests.k8s.k8sutil import Obj
from trellisbox._runtime.observability import REQUESTS_OUTSTANDING

OVERLAYS = k8sutil.OVERLAYS
ALL = list(k8sutil.KUSTOMIZATIONS)
GPU_OVERLAYS = ("dedicated-gpus", "dedicated-gpus-keda", "shared-gpu", "shared-gpu-k8s-lease")
SHARED = ("shared-gpu", "shared-gpu-k8s-lease")
READINESS = {
    "gateway": "trellisbox.v1.GatewayService",
    "refiner": "trellisbox.v1.RefinerService",
    "trellis": "trellisbox.v1.TrellisService",
}
GRPC_PORTS = {"gateway": 50051, "refiner": 50052, "trellis": 50053}
PREFIXES = {"gateway": "TRELLISBOX_GATEWAY_", "refiner": "TRELLISBOX_REFINER_", "trellis": "TRELLISBOX_TRELLIS_"}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")


def role(container: Obj) -> str:
    """gateway / refiner / trellis, from the image (trellisbox/<role>)."""
    match = re.search(r"trellisbox/(gateway|refiner|trellis)(?=[:@]|$)", container["image"])
    assert match is not None, container["image"]
    return match[1]


def model_containers(objs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    return [(w, c) for w, c in k8sutil.iter_containers(objs) if role(c) in ("refiner", "trellis")]


def grpc_port(container: Obj) -> int:
    return GRPC_PORTS[role(container)]


def probe_port(objs: tuple[Obj, ...] | list[Obj], container: Obj) -> int:
    """Where the kubelet's gRPC probes must go: the plaintext health port when the gRPC port serves TLS (the
    kubelet's probe speaks plaintext only), else the gRPC port."""
    env = k8sutil.config_env(objs, container)
    prefix = PREFIXES[role(container)]
    if env.get(prefix + "TLS", "off") != "off":
        assert int(env.get(prefix + "HEALTH_PORT", "0")), f"{container['name']}: TLS without a health port for probes"
    return int(env.get(prefix + "HEALTH_PORT", "0")) or grpc_port(container)


# ---- GPUs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("dedicated-gpus", "dedicated-gpus-keda"))
def test_dedicated_gpus_only_on_model_services(name: str) -> None:
    objs = k8sutil.render(name)
    seen = set()
    for workload, container in k8sutil.iter_containers(objs, init=True):
        req, lim = k8sutil.gpus(container)
        if role(container) in ("refiner", "trellis") and container in k8sutil.containers(workload):
            assert (req, lim) == (1, 1), f"{container['name']} must request and limit exactly one GPU"
            assert any(t.get("key") == "nvidia.com/gpu" for t in k8sutil.pod_spec(workload).get("tolerations", []))
            seen.add(role(container))
        else:
            assert (req, lim) == (0, 0), f"{k8sutil.describe(workload)}/{container['name']} must not request a GPU"
    assert seen == {"refiner", "trellis"}
    gateway = k8sutil.get(objs, "Deployment", "gateway")
    assert "tolerations" not in k8sutil.pod_spec(gateway), "the gateway should stay off GPU nodes"


@pytest.mark.parametrize("name", ("cpu-preview",))
def test_cpu_preview_requests_no_gpu_and_runs_cpu_backends(name: str) -> None:
    objs = k8sutil.render(name)
    for _, container in k8sutil.iter_containers(objs, init=True):
        assert k8sutil.gpus(container) == (0, 0)
        mem = container["resources"]["requests"]["memory"]
        assert mem.endswith("Mi") or mem in ("1Gi",), f"{container['name']}: laptop-sized requests, got {mem}"
    env = {role(c): k8sutil.config_env(objs, c) for _, c in k8sutil.iter_containers(objs)}
    assert env["refiner"]["TRELLISBOX_REFINER_BACKEND"] == "classic"
    assert env["trellis"]["TRELLISBOX_TRELLIS_BACKEND"] == "preview"
    assert env["refiner"]["TRELLISBOX_REFINER_DEVICE"] == env["trellis"]["TRELLISBOX_TRELLIS_DEVICE"] == "cpu"
    assert not k8sutil.of_kind(objs, "PersistentVolumeClaim"), "no weights needed on a laptop"


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_production_overlays_name_real_backends(name: str) -> None:
    objs = k8sutil.render(name)
    for _, container in model_containers(objs):
        env = k8sutil.config_env(objs, container)
        prefix = PREFIXES[role(container)]
        assert env[prefix + "BACKEND"] == {"refiner": "sdxl", "trellis": "trellis"}[role(container)]
        assert env[prefix + "MODEL"].startswith("/weights/models/"), "weights are read from the volume"
        assert env[prefix + "DEVICE"].startswith("cuda")


# ---- Services, targets, autoscaling -----------------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_gateway_targets_the_headless_model_services(name: str) -> None:
    objs = k8sutil.render(name)
    gateway = k8sutil.get(objs, "Deployment", "gateway")
    env = k8sutil.config_env(objs, k8sutil.containers(gateway)[0])
    for service_name, key in (("refiner", "REFINER_TARGET"), ("trellis", "TRELLIS_TARGET")):
        service = k8sutil.get(objs, "Service", service_name)
        port = service["spec"]["ports"][0]["port"]
        assert service["spec"].get("clusterIP") == "None", f"{service_name} must be headless"
        # A relative name: the resolver's search list completes it with the gateway's own namespace.
        assert env["TRELLISBOX_GATEWAY_" + key] == f"dns:///{service_name}:{port}"
    assert env["TRELLISBOX_GATEWAY_REFINER_TARGET"].startswith("dns:///")
    gateway_service = k8sutil.get(objs, "Service", "gateway")
    assert gateway_service["spec"].get("clusterIP") != "None"
    assert gateway_service["spec"]["type"] == "ClusterIP"


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_select_pods_and_ports_that_exist(name: str) -> None:
    objs = k8sutil.render(name)
    for service in k8sutil.of_kind(objs, "Service"):
        selector = service["spec"]["selector"]
        matches = [
            w for w in k8sutil.workloads(objs) if k8sutil.selects(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert matches, f"Service {service['metadata']['name']} selects no pod template"
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            offered = [
                p["name"] if isinstance(target, str) else p["containerPort"]
                for w in matches
                for c in k8sutil.containers(w)
                for p in c.get("ports", [])
            ]
            assert target in offered, f"Service {service['metadata']['name']} targets {target}, pods offer {offered}"


@pytest.mark.parametrize("name", ("dedicated-gpus",))
def test_hpa_scales_the_refiner_on_load_per_pod(name: str) -> None:
    objs = k8sutil.render(name)
    (hpa,) = k8sutil.of_kind(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "refiner")
    refiner = k8sutil.get(objs, "Deployment", "refiner")
    assert "replicas" not in refiner["spec"], "the HPA owns the refiner's replica count"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "trellisbox_refiner_load"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600
    # The adapter rule names the same metric: the refiner's outstanding requests per pod (a batch counts each
    # request; the job gauges would read a fraction of the load).
    rules = yaml.safe_load((k8sutil.K8S / "components/refiner-hpa/prometheus-adapter-values.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "trellisbox_refiner_load"
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert AUTOSCALING_SERIES in rule["metricsQuery"] and AUTOSCALING_SERIES in rule["seriesQuery"]
    assert 'service="refiner"' in rule["metricsQuery"]


#: The series the autoscalers read, as the services export it.
AUTOSCALING_SERIES = REQUESTS_OUTSTANDING._name


def test_keda_alternative_replaces_the_hpa() -> None:
    objs = k8sutil.render("dedicated-gpus-keda")
    assert not k8sutil.of_kind(objs, "HorizontalPodAutoscaler"), "KEDA owns its own HPA"
    (scaled,) = k8sutil.of_kind(objs, "ScaledObject")
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref["name"] == "refiner" and k8sutil.get(objs, "Deployment", "refiner")
    assert (
        scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        >= 600
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    ns = scaled["metadata"]["namespace"]
    namespaces = set(re.findall(r'namespace="([^"]+)"', trigger["metadata"]["query"]))
    assert namespaces == {ns}, "the query must watch the overlay's namespace"
    assert AUTOSCALING_SERIES in trigger["metadata"]["query"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_model_services_recycle_connections_so_the_gateway_re_resolves(name: str) -> None:
    objs = k8sutil.render(name)
    for _, container in k8sutil.iter_containers(objs):
        env = k8sutil.config_env(objs, container)
        age = float(env[PREFIXES[role(container)] + "MAX_CONNECTION_AGE_S"])
        assert 0 < age <= 600


# ---- probes, lifecycle, resources, security ------------------------------------------------------


@pytest.mark.parametrize("name", OVERLAYS)
def test_grpc_probes_on_every_container(name: str) -> None:
    objs = k8sutil.render(name)
    for workload, container in k8sutil.iter_containers(objs):
        what = f"{name}:{k8sutil.describe(workload)}/{container['name']}"
        port = probe_port(objs, container)
        assert port in [p["containerPort"] for p in container["ports"]], what
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert "grpc" in container.get(probe, {}), f"{what}: {probe} must use the grpc handler"
            assert container[probe]["grpc"]["port"] == port, f"{what}: {probe} port"
        assert container["livenessProbe"]["grpc"].get("service", "") == "", f"{what}: liveness is service ''"
        assert container["readinessProbe"]["grpc"]["service"] == READINESS[role(container)], what
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        if role(container) != "gateway":
            # Startup covers the model load and warm-up (readiness name), for at least 15 minutes.
            assert startup["grpc"].get("service") == READINESS[role(container)], what
            assert budget >= 900, f"{what}: startup budget {budget}s"


@pytest.mark.parametrize("name", OVERLAYS)
def test_graceful_shutdown_outlasts_the_drain(name: str) -> None:
    objs = k8sutil.render(name)
    for workload, container in k8sutil.iter_containers(objs):
        grace = float(k8sutil.config_env(objs, container)[PREFIXES[role(container)] + "GRACE_S"])
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        period = k8sutil.pod_spec(workload)["terminationGracePeriodSeconds"]
        assert period >= grace + pre_stop, f"{container['name']}: {period}s < GRACE_S {grace} + preStop {pre_stop}"


@pytest.mark.parametrize("name", ALL)
def test_resources_on_every_container(name: str) -> None:
    objs = k8sutil.render(name)
    for _, container in k8sutil.iter_containers(objs, init=True):
        resources = container.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), container["name"]
        assert "memory" in resources.get("limits", {}), f"{container['name']}: memory limit"


@pytest.mark.parametrize("name", ALL)
def test_security_context_everywhere(name: str) -> None:
    objs = k8sutil.render(name)
    for workload in k8sutil.workloads(objs):
        spec = k8sutil.pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 1000
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True
        assert not any("hostPath" in v for v in spec.get("volumes", [])), "no hostPath"
        for container in k8sutil.containers(workload, init=True):
            sc = container["securityContext"]
            what = f"{k8sutil.describe(workload)}/{container['name']}"
            assert sc["runAsNonRoot"] is True, what
            assert sc["allowPrivilegeEscalation"] is False, what
            assert sc["readOnlyRootFilesystem"] is True, what
            assert sc.get("privileged", False) is False, what
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), what
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", what


@pytest.mark.parametrize("name", ALL)
def test_writable_paths_are_emptydirs_and_weights_read_only(name: str) -> None:
    objs = k8sutil.render(name)
    for workload in k8sutil.workloads(objs):
        volumes = {v["name"]: v for v in k8sutil.pod_spec(workload).get("volumes", [])}
        for container in k8sutil.containers(workload, init=True):
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for mount in mounts.values():
                assert mount["name"] in volumes, f"{container['name']} mounts unknown volume {mount['name']}"
            if container in k8sutil.containers(workload) and workload["kind"] != "Job":
                assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{container['name']}: /tmp emptyDir"
            if role(container) in ("refiner", "trellis") and workload["kind"] != "Job":
                assert "emptyDir" in volumes[mounts["/var/cache/trellisbox"]["name"]]
            if "/weights" in mounts and workload["kind"] != "Job":
                assert mounts["/weights"].get("readOnly") is True, f"{container['name']}: weights read-only"
                claim = volumes[mounts["/weights"]["name"]].get("persistentVolumeClaim")
                if claim:
                    assert claim.get("readOnly") is True


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_model_pods_mount_the_weights_claim_and_wait_for_it(name: str) -> None:
    objs = k8sutil.render(name)
    (pvc,) = k8sutil.of_kind(objs, "PersistentVolumeClaim")
    job_objs = k8sutil.render("weights")
    (job,) = k8sutil.of_kind(job_objs, "Job")
    job_claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in k8sutil.pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert job_claims == [pvc["metadata"]["name"]], "the Job fills the claim the services mount"
    assert job["metadata"]["namespace"] == pvc["metadata"]["namespace"]
    for workload, _ in model_containers(objs):
        spec = k8sutil.pod_spec(workload)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]]
        (init,) = spec["initContainers"]
        assert init["name"] == "wait-for-weights"
        assert ".trellisbox-weights-complete" in " ".join(init["command"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_disruption_budgets_cover_every_deployment(name: str) -> None:
    objs = k8sutil.render(name)
    pdbs = k8sutil.of_kind(objs, "PodDisruptionBudget")
    for deployment in k8sutil.of_kind(objs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in pdbs if k8sutil.label_selector_matches(p["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{k8sutil.describe(deployment)}: {len(covering)} PDBs"
        assert "maxUnavailable" in covering[0]["spec"], "maxUnavailable keeps one-replica drains possible"


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_only_gateway_reaches_model_services(name: str) -> None:
    objs = k8sutil.render(name)
    policies = k8sutil.of_kind(objs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and "Ingress" in deny[0]["spec"]["policyTypes"], "a default-deny ingress policy"
    for workload in k8sutil.of_kind(objs, "Deployment"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        applying = [
            p
            for p in policies
            if p["spec"]["podSelector"] and k8sutil.label_selector_matches(p["spec"]["podSelector"], labels)
        ]
        assert applying, f"{k8sutil.describe(workload)} has no ingress policy"
        for container in k8sutil.containers(workload):
            port = grpc_port(container)
            rules = [
                r for p in applying for r in p["spec"]["ingress"] if port in [x["port"] for x in r.get("ports", [])]
            ]
            assert rules, f"{container['name']}: gRPC port {port} not admitted by any rule"
            if role(container) == "gateway":
                assert any("from" not in r for r in rules), "clients reach the gateway"
            else:
                for rule in rules:
                    assert rule.get("from") == [
                        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
                    ], f"{container['name']}: only the gateway may reach port {port}"
                    gateway_labels = k8sutil.get(objs, "Deployment", "gateway")["spec"]["template"]["metadata"][
                        "labels"
                    ]
                    assert k8sutil.selects(rule["from"][0]["podSelector"]["matchLabels"], gateway_labels)


@pytest.mark.parametrize("name", OVERLAYS)
def test_metrics_scrape_annotations_and_ports(name: str) -> None:
    objs = k8sutil.render(name)
    for workload in k8sutil.of_kind(objs, "Deployment"):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        ports: dict[int, str] = {}
        for container in k8sutil.containers(workload):
            metrics = int(k8sutil.config_env(objs, container)[PREFIXES[role(container)] + "METRICS_PORT"])
            assert metrics in (9090, 9091)
            assert metrics not in ports, f"{k8sutil.describe(workload)}: two containers on metrics port {metrics}"
            ports[metrics] = container["name"]
            declared = {p["containerPort"]: p["name"] for p in container["ports"]}
            assert declared.get(metrics, "").endswith("metrics"), f"{container['name']}: metrics port declared"
        assert int(annotations["prometheus.io/port"]) in ports


@pytest.mark.parametrize("name", ALL)
def test_references_resolve(name: str) -> None:
    """ConfigMaps, ServiceAccounts, claims and port names referred to exist; names are valid."""
    objs = k8sutil.render(name)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for workload in k8sutil.workloads(objs):
        spec = k8sutil.pod_spec(workload)
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
        if name != "weights":
            for volume in spec.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        port_names: list[str] = []
        for container in k8sutil.containers(workload, init=True):
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            for port in container.get("ports", []):
                assert len(port["name"]) <= 15 and IANA_SVC_NAME.match(port["name"]), port["name"]
                port_names.append(port["name"])
            image = k8sutil.IMAGE_REF.match(container["image"])
            assert image is not None and image["tag"] != "latest", container["image"]
        assert len(port_names) == len(set(port_names)), f"duplicate port names in {k8sutil.describe(workload)}"
    for obj in objs:
        assert DNS_1123_LABEL.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63


@pytest.mark.parametrize("name", ALL)
def test_service_accounts_do_not_mount_tokens_without_need(name: str) -> None:
    objs = k8sutil.render(name)
    for sa in k8sutil.of_kind(objs, "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False
    for workload in k8sutil.workloads(objs):
        mounts = k8sutil.pod_spec(workload).get("automountServiceAccountToken")
        needs_api = name == "shared-gpu-k8s-lease" and workload["metadata"]["name"] == "models"
        assert mounts is needs_api, f"{k8sutil.describe(workload)}: automountServiceAccountToken={mounts}"


# ---- the shared GPU and its lease ------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED)
def test_shared_gpu_pod_has_exactly_one_gpu_and_both_services(name: str) -> None:
    objs = k8sutil.render(name)
    models = k8sutil.get(objs, "Deployment", "models")
    roles = sorted(role(c) for c in k8sutil.containers(models))
    assert roles == ["refiner", "trellis"]
    assert sum(k8sutil.gpus(c)[0] for c in k8sutil.containers(models, init=True)) == 1
    assert sum(k8sutil.gpus(c)[1] for c in k8sutil.containers(models, init=True)) == 1
    assert models["spec"]["strategy"]["type"] == "Recreate"
    spec = k8sutil.pod_spec(models)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.count": "1"}, "NVIDIA_VISIBLE_DEVICES=all needs one-GPU nodes"
    refiner = next(c for c in k8sutil.containers(models) if role(c) == "refiner")
    if k8sutil.gpus(refiner) == (0, 0):
        assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"} in refiner["env"]
    # No separate refiner/trellis Deployments: the Services select the models pod.
    assert {d["metadata"]["name"] for d in k8sutil.of_kind(objs, "Deployment")} == {"gateway", "models"}
    assert not k8sutil.of_kind(objs, "HorizontalPodAutoscaler")


@pytest.mark.parametrize("name", SHARED)
def test_shared_gpu_lease_settings_and_volume(name: str) -> None:
    objs = k8sutil.render(name)
    models = k8sutil.get(objs, "Deployment", "models")
    volumes = {v["name"]: v for v in k8sutil.pod_spec(models)["volumes"]}
    backend = "kubernetes" if name.endswith("k8s-lease") else "flock"
    lease_mounts = set()
    lease_names = set()
    for container in k8sutil.containers(models):
        prefix = PREFIXES[role(container)]
        env = k8sutil.config_env(objs, container)
        assert env[prefix + "PLACEMENT"] == "shared"
        assert env[prefix + "LEASE_BACKEND"] == backend
        assert env[prefix + "RESIDENCY"] in ("resident", "offload", "unload")
        lease_names.add(env[prefix + "LEASE_NAME"])
        if backend == "flock":
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env[prefix + "LEASE_DIR"])
            assert "emptyDir" in volumes[mount["name"]], "the lock file lives on an emptyDir"
            assert not mount.get("readOnly"), "both contenders write the lock file"
            lease_mounts.add(mount["name"])
    assert len(lease_names) == 1, f"both services must contend for the same lease, got {lease_names}"
    if backend == "flock":
        assert len(lease_mounts) == 1, "both containers share one lease emptyDir"
    # Holder identities: from the pod name (downward API), different for the two containers (which
    # share the pod name, and would otherwise both default to <hostname>-1 as PID 1).
    holders = set()
    for container in k8sutil.containers(models):
        prefix = PREFIXES[role(container)]
        by_name = {e["name"]: e for e in container["env"]}
        assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "$(POD_NAME)" in by_name[prefix + "LEASE_HOLDER"]["value"]
        holders.add(container_environment(objs, container)[prefix + "LEASE_HOLDER"])
    assert len(holders) == 2, f"the two contenders need different holder identities, got {holders}"
    for container in k8sutil.containers(models):
        names = [e["name"] for e in container["env"]]
        for item in container["env"]:
            # $(VAR) expands only from variables defined earlier in the list.
            for ref in re.findall(r"\$\((\w+)\)", item.get("value", "")):
                assert names.index(ref) < names.index(item["name"]), f"{item['name']} uses $({ref}) too early"


def test_k8s_lease_variant_rbac_and_identity() -> None:
    objs = k8sutil.render("shared-gpu-k8s-lease")
    models = k8sutil.get(objs, "Deployment", "models")
    sa = k8sutil.pod_spec(models)["serviceAccountName"]
    (role_obj,) = k8sutil.of_kind(objs, "Role")
    (rule,) = role_obj["rules"]
    assert rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
    assert set(rule["verbs"]) == {"get", "create", "update"}
    (binding,) = k8sutil.of_kind(objs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role_obj["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": models["metadata"]["namespace"]}]
    assert not k8sutil.of_kind(objs, "ClusterRole"), "namespace-scoped only"
    for container in k8sutil.containers(models):
        prefix = PREFIXES[role(container)]
        by_name = {e["name"]: e for e in container["env"]}
        assert by_name["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert by_name["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert by_name[prefix + "LEASE_NAMESPACE"]["value"] == "$(POD_NAMESPACE)"
        assert by_name[prefix + "LEASE_NAME"]["value"] == "trellisbox-gpu-$(NODE_NAME)", "one Lease per GPU (node)"


# ---- the settings the ConfigMaps produce ------------------------------------------------------------

FAKE_DOWNWARD = {
    "metadata.name": "models-5d8f7c9b4-x2x7q",
    "metadata.namespace": "trellisbox",
    "spec.nodeName": "gpu-node-1",
}


def settings_class(which: str) -> Any:
    if which == "gateway":
        from gateway.config import GatewaySettings

        return GatewaySettings
    if which == "refiner":
        from refiner_service.config import RefinerSettings

        return RefinerSettings
    from trellis_service.config import TrellisSettings

    return TrellisSettings


def container_environment(objs: tuple[Obj, ...], container: Obj) -> dict[str, str]:
    """What the kubelet would hand the process: envFrom, then env (downward API faked, $(VAR) expanded)."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(k8sutil.get(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = FAKE_DOWNWARD[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("name", OVERLAYS)
def test_config_keys_are_real_settings_and_values_parse(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown TRELLISBOX_* variables are silently ignored by the services, so a typo would go unnoticed:
    every key must name a field, and the services' own settings classes must accept every value."""
    from trellisbox._runtime.config import load_settings

    objs = k8sutil.render(name)
    for _, container in k8sutil.iter_containers(objs):
        which = role(container)
        prefix = PREFIXES[which]
        cls = settings_class(which)
        env = container_environment(objs, container)
        keys = {k[len(prefix) :].lower() for k in env if k.startswith(prefix)}
        unknown = keys - set(cls.model_fields)
        assert not unknown, f"{name}/{container['name']}: {sorted(unknown)} are not fields of {cls.__name__}"
        for key in [k for k in os.environ if k.startswith("TRELLISBOX_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith(prefix) and key[len(prefix) :].lower() in cls.model_fields:
                monkeypatch.setenv(key, value)
        settings = load_settings(cls, [])
        assert settings.port == grpc_port(container)
        assert settings.host == "0.0.0.0"


#: The gateway's resident memory with no request (docs/reliability.md measures 72-92 MiB), with room to spare.
GATEWAY_IDLE_BYTES = 128 * 2**20


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_gateway_memory_limit_holds_its_byte_budget(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/reliability.md: gateway RSS <= idle + 2 x max_held_bytes under any uploads. A limit below that lets
    large uploads get the gateway OOM-killed, which the byte budget exists to prevent."""
    from kubernetes.utils import parse_quantity

    from trellisbox._runtime.config import load_settings

    objs = k8sutil.render(name)
    for _, container in k8sutil.iter_containers(objs):
        if role(container) != "gateway":
            continue
        for key in [k for k in os.environ if k.startswith("TRELLISBOX_")]:
            monkeypatch.delenv(key)
        for key, value in container_environment(objs, container).items():
            if key.startswith(PREFIXES["gateway"]):
                monkeypatch.setenv(key, value)
        settings = load_settings(settings_class("gateway"), [])
        limit = parse_quantity(container["resources"]["limits"]["memory"])
        ceiling = GATEWAY_IDLE_BYTES + 2 * settings.max_held_bytes
        assert limit >= ceiling, (f"{name}: gateway memory limit {limit / 2**20:.0f} MiB < idle + 2 x max_held_bytes "
                                  f"= {ceiling / 2**20:.0f} MiB; lower TRELLISBOX_GATEWAY_MAX_HELD_BYTES or raise it")


# ---- weights layout: the Job, the images and the ConfigMaps agree -----------------------------------


def test_weights_layout_agrees_between_job_images_and_config() -> None:
    script = (k8sutil.K8S / "weights" / "download_weights.py").read_text()
    job_objs = k8sutil.render("weights")
    (job,) = k8sutil.of_kind(job_objs, "Job")
    (container,) = k8sutil.containers(job)
    assert container["command"][-1].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "script")
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HUB_OFFLINE"] == "0", "the Job is the one place allowed online"
    assert ".trellisbox-weights-complete" in script
    objs = k8sutil.render("dedicated-gpus")
    for _, model in model_containers(objs):
        path = k8sutil.config_env(objs, model)[PREFIXES[role(model)] + "MODEL"]
        repo = env[{"refiner": "REFINER_REPO", "trellis": "TRELLIS_REPO"}[role(model)]]
        assert path == f"{env['WEIGHTS_DIR']}/models/{repo.split('/')[-1]}"
    dockerfile = (k8sutil.REPO / "docker" / "refiner.Dockerfile").read_text()
    for variable in ("HF_HOME=/weights/", "TORCH_HOME=/weights/torch", "U2NET_HOME=/weights/u2net"):
        assert variable in dockerfile


def test_env_files_hold_only_prefixed_keys() -> None:
    for env_file in Path(k8sutil.K8S).rglob("*.env"):
        for line in env_file.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key = line.split("=", 1)[0]
                assert key.startswith(tuple(PREFIXES.values())), f"{env_file}: {key}"

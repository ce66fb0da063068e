"""TLS at the gateway, mutual TLS inside, bearer tokens: what components/tls, components/cert-manager and
components/gateway-token produce, on the dedicated-gpus-secure overlay and on the other shapes they compose with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s import k8sutil
from tests.k8s.k8sutil import Obj
from tests.k8s.test_properties import PREFIXES, probe_port, role

SECURE = "dedicated-gpus-secure"


def _secret_mounts(workload: Obj, container: Obj) -> dict[str, str]:
    """mountPath -> secretName of the container's Secret volumes (all read-only, whole directories)."""
    volumes = {v["name"]: v for v in k8sutil.pod_spec(workload)["volumes"]}
    found = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            assert mount.get("readOnly") is True, f"{container['name']}: {mount['mountPath']} must be read-only"
            assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, "keys are not world-readable"
            found[mount["mountPath"]] = secret["secretName"]
    return found


def _secret_of(path: str, mounts: dict[str, str]) -> str:
    folder, _, _ = path.rpartition("/")
    assert folder in mounts, f"{path} is not in a mounted Secret ({mounts})"
    return mounts[folder]


def _certificates(objs: tuple[Obj, ...] | list[Obj]) -> dict[str, Obj]:
    return {c["spec"]["secretName"]: c for c in k8sutil.of_kind(objs, "Certificate")}


def test_tls_at_the_gateway_and_mutual_tls_inside_from_issued_certificates() -> None:
    objs = k8sutil.render(SECURE)
    certificates = _certificates(objs)
    issuers = {i["metadata"]["name"]: i for i in k8sutil.of_kind(objs, "Issuer")}
    for workload, container in k8sutil.iter_containers(objs):
        env = k8sutil.config_env(objs, container)
        prefix = PREFIXES[role(container)]
        mounts = _secret_mounts(workload, container)
        served = _secret_of(env[prefix + "TLS_CERT_FILE"], mounts)
        assert _secret_of(env[prefix + "TLS_KEY_FILE"], mounts) == served
        assert "server auth" in certificates[served]["spec"]["usages"]
        if role(container) == "gateway":
            assert env[prefix + "TLS"] == "on" and env[prefix + "STAGE_TLS"] == "mutual"
            presented = _secret_of(env[prefix + "STAGE_CERT_FILE"], mounts)
            assert _secret_of(env[prefix + "STAGE_KEY_FILE"], mounts) == presented
            assert "client auth" in certificates[presented]["spec"]["usages"]
            assert _secret_of(env[prefix + "STAGE_CA_FILE"], mounts) == presented  # its ca.crt: the same CA
            assert _secret_of(env[prefix + "TOKEN_FILE"], mounts) == "gateway-tokens"
            # The model services' certificates name the hosts the gateway dials (hostname verification).
            for stage in ("REFINER", "TRELLIS"):
                host = env[f"{prefix}{stage}_TARGET"].removeprefix("dns:///").rpartition(":")[0]
                assert host in certificates[f"{stage.lower()}-tls"]["spec"]["dnsNames"]
        else:
            assert env[prefix + "TLS"] == "mutual"
            assert _secret_of(env[prefix + "TLS_CLIENT_CA_FILE"], mounts) == served  # ca.crt of its own Secret
        assert probe_port(objs, container) == int(env[prefix + "HEALTH_PORT"])
    for certificate in certificates.values():
        issuer = issuers[certificate["spec"]["issuerRef"]["name"]]
        expected = "selfSigned" if certificate["spec"].get("isCA") else "ca"
        assert expected in issuer["spec"], k8sutil.describe(certificate)
        assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"
    assert issuers["trellisbox-ca"]["spec"]["ca"]["secretName"] == certificates["trellisbox-ca"]["metadata"]["name"]


def test_certificates_name_the_services_in_the_overlays_namespace() -> None:
    objs = k8sutil.render(SECURE)
    for certificate in k8sutil.of_kind(objs, "Certificate"):
        names = certificate["spec"].get("dnsNames", [])
        if names:
            assert names[1] == f"{names[0]}.{certificate['metadata']['namespace']}.svc", names


def test_plaintext_overlays_choose_plaintext_explicitly() -> None:
    objs = k8sutil.render("dedicated-gpus")
    for _, container in k8sutil.iter_containers(objs):
        env = k8sutil.config_env(objs, container)
        assert env[PREFIXES[role(container)] + "TLS"] == "off"
    assert all(p.get("appProtocol") == "kubernetes.io/h2c" for s in k8sutil.of_kind(objs, "Service")
               for p in s["spec"]["ports"])
    secure = k8sutil.render(SECURE)
    assert not any("appProtocol" in p for s in k8sutil.of_kind(secure, "Service") for p in s["spec"]["ports"])


def test_tls_on_the_shared_gpu_pod_gives_each_container_its_own_health_port(tmp_path: Path) -> None:
    objs = k8sutil.render_with_components(["cert-manager", "tls"], "shared-gpu", tmp_path)
    assert k8sutil.validate_all(objs) == []
    models = k8sutil.get(objs, "Deployment", "models")
    ports = set()
    for container in k8sutil.containers(models):
        env = k8sutil.config_env(objs, container)
        assert env[PREFIXES[role(container)] + "TLS"] == "mutual"
        ports.add(probe_port(objs, container))
        assert _secret_mounts(models, container) == {"/var/run/trellisbox/tls": f"{role(container)}-tls"}
    assert len(ports) == 2


@pytest.mark.parametrize("order", [["webui", "tls", "gateway-token"]])
def test_the_web_app_gets_the_ca_and_a_token(tmp_path: Path, order: list[str]) -> None:
    objs = k8sutil.render_with_components(["cert-manager", *order], "cpu-preview", tmp_path)
    assert k8sutil.validate_all(objs) == []
    webui = k8sutil.get(objs, "Deployment", "webui")
    (container,) = k8sutil.containers(webui)
    flags = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    mounts = _secret_mounts(webui, container)
    assert _secret_of(flags["--ca-file"], mounts) == "gateway-tls"
    assert _secret_of(flags["--token-file"], mounts) == "gateway-tokens"
    items = next(v for v in k8sutil.pod_spec(webui)["volumes"] if v["name"] == "gateway-ca")["secret"]["items"]
    assert [i["key"] for i in items] == ["ca.crt"]  # the CA only, not the gateway's key

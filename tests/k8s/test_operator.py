"""The manifests as an operator uses them: another namespace, more replicas, another registry.

Each test renders what an operator would write around the shipped overlays (a wrapper kustomization, a
replica count, an image edit) and checks the result, rather than the overlays as shipped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s import k8sutil
from tests.k8s.k8sutil import Obj

GPU_OVERLAYS = ("dedicated-gpus", "dedicated-gpus-keda", "shared-gpu", "shared-gpu-k8s-lease")
SHIPPED_NAMESPACE = k8sutil.SHIPPED_NAMESPACE
PLACEHOLDER_REGISTRY = "registry.example.com"
DIGEST = "sha256:" + "0123456789abcdef" * 4


def _wrap(workdir: Path, target: Path, **fields: Any) -> list[Obj]:
    """Render a kustomization in ``workdir`` that takes ``target`` as its resource, plus ``fields``."""
    workdir.mkdir(parents=True, exist_ok=True)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [os.path.relpath(target, workdir)], **fields}
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return k8sutil.render_dir(workdir)


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string in a nested object."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value


def _namespace_references(obj: Obj, namespace: str) -> list[str]:
    """Every place an object names ``namespace``: namespace fields, DNS names and PromQL matchers."""
    found = []
    for path, text in _strings(obj):
        if (path.endswith(".namespace") and text == namespace) or f".{namespace}.svc" in text \
                or f'namespace="{namespace}"' in text:
            found.append(f"{k8sutil.describe(obj)} {path}: {text}")
    return found


# ---- another namespace ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", list(k8sutil.KUSTOMIZATIONS))
def test_a_wrapper_with_another_namespace_moves_every_reference(overlay: str, tmp_path: Path) -> None:
    """`namespace: ml` around an overlay, and nothing else: nothing may still point at the shipped namespace.

    The KEDA query is PromQL; its namespace is a kustomize var, resolved after the outermost namespace is set
    (k8s/components/refiner-keda), so the wrapper repeats nothing.
    """
    objs = _wrap(tmp_path / "wrapper", k8sutil.KUSTOMIZATIONS[overlay], namespace="ml")
    leftovers = [ref for obj in objs for ref in _namespace_references(obj, SHIPPED_NAMESPACE)]
    assert not leftovers, "\n".join(leftovers)
    namespaces = [n["metadata"]["name"] for n in k8sutil.of_kind(objs, "Namespace")]
    assert namespaces == ([] if overlay == "weights" else ["ml"])  # the Namespace object itself is renamed
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "ml", k8sutil.describe(obj)
    for binding in k8sutil.of_kind(objs, "RoleBinding"):  # the Lease RBAC binds the pod's own account
        assert [s.get("namespace") for s in binding["subjects"]] == ["ml"] * len(binding["subjects"])
    for scaled in k8sutil.of_kind(objs, "ScaledObject"):
        assert 'namespace="ml"' in scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert not k8sutil.validate_all(objs)


def test_the_keda_query_follows_the_outermost_of_nested_wrappers(tmp_path: Path) -> None:
    """A wrapper of a wrapper (each with its own namespace): the query names the namespace
    the ScaledObject finally lands in, and the shipped overlay's own query names `trellisbox`."""
    def query(objs: list[Obj] | tuple[Obj, ...]) -> str:
        scaled = k8sutil.of_kind(list(objs), "ScaledObject")
        assert len(scaled) == 1
        return str(scaled[0]["spec"]["triggers"][0]["metadata"]["query"])

    assert 'namespace="trellisbox"' in query(k8sutil.render("dedicated-gpus-keda"))
    inner = tmp_path / "inner"
    _wrap(inner, k8sutil.KUSTOMIZATIONS["dedicated-gpus-keda"], namespace="team-a")
    objs = _wrap(tmp_path / "outer", inner, namespace="ml")
    assert 'trellisbox_requests_outstanding{namespace="ml",service="refiner"}' in query(objs)
    assert not k8sutil.validate_all(objs)


def test_no_overlay_leaves_a_kustomize_var_unresolved() -> None:
    for name in k8sutil.KUSTOMIZATIONS:
        leftovers = [f"{k8sutil.describe(obj)} {path}" for obj in k8sutil.render(name) for path, text in _strings(obj)
                     if "$(TRELLISBOX_NAMESPACE)" in text]
        assert not leftovers, f"{name}: {leftovers}"


def test_the_gateway_targets_name_no_namespace() -> None:
    """Relative names: the pod's DNS search list adds the gateway's own namespace, whatever it is."""
    objs = k8sutil.render("dedicated-gpus")
    env = k8sutil.config_env(objs, k8sutil.containers(k8sutil.get(objs, "Deployment", "gateway"))[0])
    for key in ("TRELLISBOX_GATEWAY_REFINER_TARGET", "TRELLISBOX_GATEWAY_TRELLIS_TARGET"):
        host = env[key].removeprefix("dns:///").rsplit(":", 1)[0]
        assert "." not in host, f"{key}={env[key]} names a namespace or domain"


# ---- more replicas ------------------------------------------------------------------------------------


def _claims_of(workload: Obj) -> set[str]:
    return {v["persistentVolumeClaim"]["claimName"] for v in k8sutil.pod_spec(workload).get("volumes", [])
            if "persistentVolumeClaim" in v}


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_every_scalable_workload_can_mount_the_weights_on_any_node(overlay: str) -> None:
    """A Deployment that may run several pods (on different nodes) needs a ReadWriteMany claim."""
    objs = k8sutil.render(overlay)
    claims = {c["metadata"]["name"]: c for c in k8sutil.of_kind(objs, "PersistentVolumeClaim")}
    for workload in k8sutil.of_kind(objs, "Deployment"):
        for claim in _claims_of(workload):
            assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], \
                f"{k8sutil.describe(workload)} scales out but {claim} is {claims[claim]['spec']['accessModes']}"


def test_shared_gpu_scaled_to_three_replicas_spreads_and_shares_the_weights(tmp_path: Path) -> None:
    """What docs/deploy.md tells an operator to do: add single-GPU nodes, raise `models` replicas."""
    patch = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "models"}, "spec": {"replicas": 3}}
    objs = _wrap(tmp_path / "scaled", k8sutil.K8S / "overlays" / "shared-gpu-k8s-lease",
                 patches=[{"patch": yaml.safe_dump(patch)}])
    models = k8sutil.get(objs, "Deployment", "models")
    assert models["spec"]["replicas"] == 3
    (claim,) = _claims_of(models)
    assert k8sutil.get(objs, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    _assert_spreads_over_nodes(models)
    # One Lease per GPU, named by the node: replicas on different nodes never share a Lease.
    for container in k8sutil.containers(models):
        names = [e["value"] for e in container["env"] if e["name"].endswith("_LEASE_NAME")]
        assert names == ["trellisbox-gpu-$(NODE_NAME)"], container["name"]
    assert not k8sutil.validate_all(objs)


def _assert_spreads_over_nodes(workload: Obj) -> None:
    spec = k8sutil.pod_spec(workload)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    by_host = [c for c in spec.get("topologySpreadConstraints", []) if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_host, f"{k8sutil.describe(workload)} has no spread over nodes"
    for constraint in by_host:
        assert constraint["maxSkew"] == 1
        assert k8sutil.label_selector_matches(constraint["labelSelector"], labels), "must select its own pods"


@pytest.mark.parametrize("overlay", k8sutil.OVERLAYS)
def test_every_deployment_spreads_its_replicas_over_nodes(overlay: str) -> None:
    for workload in k8sutil.of_kind(k8sutil.render(overlay), "Deployment"):
        _assert_spreads_over_nodes(workload)


# ---- images -------------------------------------------------------------------------------------------


def _images(objs: list[Obj] | tuple[Obj, ...]) -> list[str]:
    return [c["image"] for _, c in k8sutil.iter_containers(objs, init=True)]


@pytest.mark.parametrize("name", [*GPU_OVERLAYS, "weights"])
def test_images_are_fully_qualified_from_the_one_mapping(name: str) -> None:
    for image in _images(k8sutil.render(name)):
        ref = k8sutil.IMAGE_REF.match(image)
        assert ref is not None, f"{name}: {image} is not a fully qualified trellisbox image"
        assert ref["registry"] == PLACEHOLDER_REGISTRY and ref["tag"], image


def test_only_the_images_component_and_cpu_preview_map_images() -> None:
    """One `kustomize edit set image`, in components/images, retargets every GPU overlay and the weights Job."""
    mapping = {"components/images"}
    for path in k8sutil.K8S.rglob("kustomization.yaml"):
        where = str(path.parent.relative_to(k8sutil.K8S))
        doc = yaml.safe_load(path.read_text())
        if where in mapping:
            assert {i["name"] for i in doc["images"]} == {f"trellisbox/{n}" for n in ("gateway", "refiner", "trellis")}
        elif where != "overlays/cpu-preview":
            assert "images" not in doc, f"k8s/{where} maps images of its own: the one edit would miss it"


def test_a_digest_pinned_in_the_mapping_reaches_the_overlays_and_the_weights_job(tmp_path: Path) -> None:
    tree = tmp_path / "k8s"
    shutil.copytree(k8sutil.K8S, tree)
    images_file = tree / "components" / "images" / "kustomization.yaml"
    doc = yaml.safe_load(images_file.read_text())
    for image in doc["images"]:
        image["newName"] = image["newName"].replace(PLACEHOLDER_REGISTRY, "registry.internal:5000")
        image["digest"] = DIGEST
    images_file.write_text(yaml.safe_dump(doc))
    for target in (tree / "weights", tree / "overlays" / "shared-gpu-k8s-lease", tree / "overlays" / "dedicated-gpus"):
        for image in _images(k8sutil.render_dir(target)):
            ref = k8sutil.IMAGE_REF.match(image)
            assert ref is not None and ref["registry"] == "registry.internal:5000" and ref["digest"] == DIGEST, image


# ---- weights revisions --------------------------------------------------------------------------------


def test_weights_job_pins_every_download_by_an_environment_variable() -> None:
    (job,) = k8sutil.of_kind(k8sutil.render("weights"), "Job")
    env = {e["name"]: e.get("value") for e in k8sutil.containers(job)[0]["env"]}
    script = (k8sutil.K8S / "weights" / "download_weights.py").read_text()
    for variable in ("REFINER_REVISION", "TRELLIS_REVISION", "DINOV2_REF"):
        assert variable in env, f"the Job does not expose {variable}"
        assert f'os.environ.get("{variable}"' in script, f"download_weights.py ignores {variable}"
    assert 'f"facebookresearch/dinov2:{ref}"' in script, "the DINOv2 hub code must be loaded at the pinned ref"


# ---- resources, as docs/deploy.md states them ---------------------------------------------------------


@pytest.mark.parametrize("overlay", k8sutil.OVERLAYS)
def test_resources_are_as_documented(overlay: str) -> None:
    """Requests (CPU, memory) and a memory limit on every container; CPU limits only on the small ones.

    Model containers have no CPU limit on purpose (docs/deploy.md, "Operability"): CFS throttling of
    the process that feeds the GPU stalls it, and the CPU request already reserves their share.
    """
    for workload, container in k8sutil.iter_containers(k8sutil.render(overlay), init=True):
        resources = container.get("resources", {})
        where = f"{overlay} {k8sutil.describe(workload)} {container['name']}"
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert "memory" in resources.get("limits", {}), where
        is_model = container["name"] in ("refiner", "trellis")
        assert ("cpu" in resources.get("limits", {})) != is_model, where

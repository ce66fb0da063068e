"""``python -m tests.k8s.validate``: render every kustomization and validate every object.

Exit status 0 when every overlay (plus the weights Job and the optional components) renders and every
object passes kubernetes-validate --strict against K8S_VERSION (or the structural check of its CRD
kind). ``make k8s-validate`` runs this, then the property tests in tests/k8s.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.k8s import k8sutil


def main() -> int:
    version = k8sutil.K8S_VERSION
    if version not in k8sutil.bundled_versions():
        print(f"kubernetes-validate has no schemas for {version}; bundled: {k8sutil.bundled_versions()}")
        return 2
    print(f"renderer: {k8sutil.kubectl()} ({k8sutil.kubectl_version()})")
    print(f"validator: kubernetes-validate --strict, Kubernetes {version}")
    failures = 0
    targets: list[tuple[str, list[dict[str, Any]]]] = []
    for name in k8sutil.KUSTOMIZATIONS:
        try:
            targets.append((name, list(k8sutil.render(name))))
        except k8sutil.RenderError as exc:
            print(f"FAIL {name}: {exc}")
            failures += 1
    for component, overlay in k8sutil.OPTIONAL_COMPONENTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                objs = k8sutil.render_with_component(component, overlay, Path(tmp))
            except k8sutil.RenderError as exc:
                print(f"FAIL {overlay}+{component}: {exc}")
                failures += 1
                continue
        targets.append((f"{overlay}+{component}", objs))
    for name, objs in targets:
        start = time.perf_counter()
        errors = k8sutil.validate_all(objs, version)
        kinds = Counter(o["kind"] for o in objs)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        status = "ok  " if not errors else "FAIL"
        print(f"{status} {name}: {len(objs)} objects ({summary}) in {time.perf_counter() - start:.1f}s")
        for error in errors:
            print(f"     {error}")
        failures += len(errors)
    print(f"{'all valid' if not failures else f'{failures} problem(s)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

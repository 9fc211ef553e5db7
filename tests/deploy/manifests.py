"""Offline checks of the deployment files: render the chart (helm-python-sdk), build the
kustomize overlays (`kubectl kustomize`), validate every object against the Kubernetes schemas
in strict mode (kubernetes-validate) or, for custom resources, against the operators' published
CRDs (vendored in k8s/vendor/crds) with unknown fields refused."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "coralline"
CRDS = ROOT / "k8s" / "vendor" / "crds"
K8S_VERSION = "1.33.0"  # a current Kubernetes release
VALUES = {
    "default": None,
    "cpu-dev": CHART / "ci" / "values-cpu-dev.yaml",
    "gpu-prod": CHART / "ci" / "values-gpu-prod.yaml",
    "minimal": CHART / "ci" / "values-minimal.yaml",
}
CRD_FILES = {
    ("ray.io", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
}


def values(name: str) -> dict:
    path = VALUES[name]
    return yaml.safe_load(path.read_text()) if path else {}


def render(vals: dict | None = None, name: str = "coralline", namespace: str = "serving"):
    """Every object the chart renders with `vals`: [dict]."""
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    docs = []
    for path, text in sorted(chart.render(vals or {}, name=name, namespace=namespace).items()):
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the kustomize overlays (kubectl kustomize)"
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs, kind: str, component: str | None = None) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def one(docs, kind: str, component: str) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"{len(found)} {kind} objects of {component}"
    return found[0]


@functools.cache
def _crd_schema(group: str, kind: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[(group, kind)]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{group}/{version} {kind} is not in the vendored CRD")


def _unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the structural schema does not declare (what the API server would prune)."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
            for k, v in obj.items():
                if k in props:
                    out += _unknown_fields(v, props[k], f"{path}.{k}")
                elif isinstance(extra, dict):
                    out += _unknown_fields(v, extra, f"{path}.{k}")
                elif not extra:
                    out.append(f"{path}.{k}")
        elif isinstance(extra, dict):
            for k, v in obj.items():
                out += _unknown_fields(v, extra, f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += _unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def validate(doc: dict) -> None:
    """Raise AssertionError naming what is wrong with one object."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if (group, doc["kind"]) in CRD_FILES:
        import jsonschema

        schema = _crd_schema(group, doc["kind"], version)
        body = {k: v for k, v in doc.items() if k != "metadata"}
        errors = sorted(
            jsonschema.Draft7Validator({**schema, "properties": {
                k: v for k, v in schema["properties"].items() if k != "metadata"
            }}).iter_errors(body),
            key=str,
        )  # fmt: skip
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors[0].message}"
        unknown = _unknown_fields(body, schema)
        assert not unknown, f"{doc['kind']} {doc['metadata']['name']}: unknown fields {unknown}"
        return
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(
            f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}"
        ) from None


def pod_specs(docs) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every pod-bearing object, RayService pods included."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            out.append((name, d["spec"]["template"]["spec"]))
        elif d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            out.append((name + "/head", cluster["headGroupSpec"]["template"]["spec"]))
            for g in cluster.get("workerGroupSpecs", []):
                out.append((f"{name}/{g['groupName']}", g["template"]["spec"]))
    return out

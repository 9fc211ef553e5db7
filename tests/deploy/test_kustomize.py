"""The plain manifests (k8s/): the base is the chart rendered with k8s/base-values.yaml (no
drift), and every overlay builds with `kubectl kustomize` and validates strictly."""

import sys

import pytest

from . import manifests as m

OVERLAYS = ["base", "overlays/cpu-dev", "overlays/gpu-prod"]


def test_the_base_is_the_chart_rendered():
    sys.path.insert(0, str(m.ROOT / "k8s"))
    try:
        import render_base
    finally:
        sys.path.pop(0)
    want = render_base.render()
    base = m.ROOT / "k8s" / "base"
    have = {p.name: p.read_text() for p in base.glob("*.yaml")}
    assert sorted(have) == sorted(want), "run `make k8s` after changing the chart"
    stale = [name for name in want if have[name] != want[name]]
    assert not stale, f"k8s/base is stale ({stale}): run `make k8s`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_and_validates_strictly(overlay):
    docs = m.kustomize(m.ROOT / "k8s" / overlay)
    assert docs
    for doc in docs:
        m.validate(doc)
        assert doc["metadata"]["namespace"] == "coralline", doc["metadata"]["name"]
    assert {d["kind"] for d in docs} >= {"Deployment", "StatefulSet", "RayService", "Service"}


def test_cpu_dev_runs_one_of_each_without_gpus():
    docs = m.kustomize(m.ROOT / "k8s" / "overlays" / "cpu-dev")
    assert m.one(docs, "Deployment", "drafter")["spec"]["replicas"] == 1
    assert m.one(docs, "StatefulSet", "verifier")["spec"]["replicas"] == 1
    assert not m.find(docs, "PodDisruptionBudget")
    for _, spec in m.pod_specs(docs):
        for c in spec["containers"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
        assert "nodeSelector" not in spec and "tolerations" not in spec  # no GPU pools


def test_the_base_schedules_drafters_on_the_small_gpu_pool_and_verifiers_on_the_large():
    docs = m.kustomize(m.ROOT / "k8s" / "base")
    drafter = m.one(docs, "Deployment", "drafter")["spec"]["template"]["spec"]
    verifier = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]
    assert drafter["nodeSelector"] == {"coralline.io/pool": "small-gpu"}
    assert verifier["nodeSelector"] == {"coralline.io/pool": "large-gpu"}
    for spec in (drafter, verifier):
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]


def test_gpu_prod_puts_drafters_on_small_gpus_and_verifiers_on_large_ones():
    docs = m.kustomize(m.ROOT / "k8s" / "overlays" / "gpu-prod")
    drafter = m.one(docs, "Deployment", "drafter")["spec"]["template"]["spec"]
    verifier = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]
    assert drafter["nodeSelector"]["coralline.io/pool"] == "small-gpu"
    assert verifier["nodeSelector"]["coralline.io/pool"] == "large-gpu"
    for spec, device in ((drafter, "cuda"), (verifier, "cuda")):
        c = spec["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert f"--device={device}" in c["args"]
        assert c["image"].endswith(":0.1.0-cuda")
        assert "grpc" in c["readinessProbe"]  # the base's probes survive the patch
    assert len(m.find(docs, "HorizontalPodAutoscaler")) == 2
    assert {p["spec"]["minAvailable"] for p in m.find(docs, "PodDisruptionBudget")} == {2}

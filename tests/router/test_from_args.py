"""What a Kubernetes deployment hands the router: the Serve application builder's args (a
RayService's serveConfigV2) and discovery of the release's workers from EndpointSlices."""

import pytest

from coralline.router.app import from_args
from coralline.router.core import RouterConfig, make_discovery
from coralline.router.discovery import KubernetesDiscovery, StaticDiscovery


def test_from_args_builds_the_serve_application_with_expanded_secrets(monkeypatch):
    from ray.serve import Application

    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    args = {
        "model": "smollm2-135m-instruct",
        "redis": "redis://:${REDIS_PASSWORD}@coralline-redis:6379/0",
        "kubernetes_namespace": "serving",
        "kubernetes_selector": "app.kubernetes.io/instance=coralline",
        "routers": 2,
        "max_ongoing_requests": 32,
    }
    app = from_args(args)
    assert isinstance(app, Application)
    config = app._bound_deployment.init_args[0]  # what each replica's RouterCore gets
    assert config.redis == "redis://:s3cret@coralline-redis:6379/0"
    assert config.kubernetes_namespace == "serving"
    assert app._bound_deployment._deployment_config.num_replicas == 2
    static = from_args({"verifiers": ["10.0.0.1:50051"], "drafters": ["10.0.1.1:50052"]})
    assert static._bound_deployment.init_args[0].verifiers == ("10.0.0.1:50051",)


def test_from_args_names_unknown_and_missing_settings():
    with pytest.raises(ValueError, match=r"unknown router args \['kubernetes'\]"):
        from_args({"kubernetes": "serving"})
    with pytest.raises(ValueError, match="needs verifier addresses"):
        from_args({})
    with pytest.raises(ValueError, match="not both"):
        from_args({"verifiers": ["10.0.0.1:50051"], "kubernetes_namespace": "serving"})


def test_a_kubernetes_namespace_discovers_the_releases_workers():
    d = make_discovery(
        RouterConfig(
            kubernetes_namespace="serving",
            kubernetes_selector="app.kubernetes.io/instance=coralline",
        )
    )
    assert isinstance(d, KubernetesDiscovery) and d.namespace == "serving"
    assert d.verifier_selector == (
        "app.kubernetes.io/component=verifier,app.kubernetes.io/instance=coralline"
    )
    assert d.drafter_selector.startswith("app.kubernetes.io/component=drafter,")
    assert isinstance(make_discovery(RouterConfig(verifiers=("127.0.0.1:1",))), StaticDiscovery)

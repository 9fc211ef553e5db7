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


def test_from_args_http_puts_the_http_ingress_in_front_of_the_router(monkeypatch):
    """`http` (the chart's router.http.enabled): the application's ingress is HttpIngress,
    bound to the Router deployment and the HttpConfig; tokens from $CORALLINE_API_TOKENS."""
    from coralline.router.http import HttpConfig

    token = "k8s-secret-token-" + "x" * 8
    monkeypatch.setenv("CORALLINE_API_TOKENS", token)
    base = {"verifiers": ["10.0.0.1:50051"], "model": "/models/smollm2-135m-instruct"}
    app = from_args({**base, "routers": 2, "http": {}})
    ingress = app._bound_deployment
    assert ingress.name == "Http" and ingress._deployment_config.num_replicas == 2
    router, http = ingress.init_args
    assert router._bound_deployment.name == "Router"
    assert isinstance(http, HttpConfig) and http.api_tokens == {token}
    assert http.models == ("smollm2-135m-instruct",)  # the folder's name, without /models
    named = from_args({**base, "http": {"models": ["smol"], "api_tokens": [token + "2"]}})
    assert named._bound_deployment.init_args[1].models == ("smol",)
    assert named._bound_deployment.init_args[1].api_tokens == {token + "2"}
    monkeypatch.delenv("CORALLINE_API_TOKENS")
    assert from_args({**base, "http": {}})._bound_deployment.init_args[1].api_tokens == set()
    assert from_args(base)._bound_deployment.name == "Router"  # no http: the router is ingress
    with pytest.raises(ValueError, match=r"unknown http args \['port'\]"):
        from_args({**base, "http": {"port": 8000}})  # Serve's http_options own the port
    with pytest.raises(ValueError, match="shorter than"):
        from_args({**base, "http": {"api_tokens": ["short"]}})


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

"""The Helm chart, offline: it renders with the default values and the three example values
files, every object validates (Kubernetes schemas in strict mode, the operators' CRDs), `helm
lint --strict` is clean, the schema refuses bad values, and the chart does what it promises."""

import copy

import pytest
import yaml

from . import manifests as m

NAMES = list(m.VALUES)


@pytest.fixture(scope="module")
def rendered():
    return {name: m.render(m.values(name)) for name in NAMES}


def _containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("name", NAMES)
def test_the_chart_renders_and_every_object_validates_strictly(rendered, name):
    docs = rendered[name]
    for doc in docs:
        m.validate(doc)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "RayService", "ConfigMap", "Service"} <= kinds
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)  # no clashes


@pytest.mark.parametrize("name", NAMES)
def test_helm_lint_strict_is_clean(name, tmp_path):
    import helm_python as helm

    report = helm.lint(str(m.CHART), m.values(name), strict=True, namespace="serving")
    assert report["errors"] == []
    warnings = [msg for msg in report["messages"] if msg["severity"] >= 2]  # 1 = info
    assert warnings == []


def test_the_validators_refuse_unknown_fields():
    docs = m.render({})
    sts = copy.deepcopy(m.one(docs, "StatefulSet", "verifier"))
    sts["spec"]["template"]["spec"]["containers"][0]["gpu"] = 1
    with pytest.raises(AssertionError, match="StatefulSet coralline-verifier"):
        m.validate(sts)
    ray = copy.deepcopy(m.one(docs, "RayService", "router"))
    ray["spec"]["rayClusterConfig"]["headGroupSpec"]["replicas"] = 2
    with pytest.raises(AssertionError, match=r"unknown fields.*headGroupSpec\.replicas"):
        m.validate(ray)


def test_a_bad_values_file_is_refused_with_a_readable_message():
    import helm_python as helm

    for bad, where in [
        ({"image": {"variant": "rocm"}}, "at '/image/variant': value must be one of 'cpu', 'cuda'"),
        ({"drafter": {"replicas": -1}}, "at '/drafter/replicas': minimum: got -1, want 0"),
        ({"verifier": {"device": "tpu"}}, "/verifier/device"),
        ({"telemetry": {"otlpEndpoint": "tempo:4317"}}, "/telemetry/otlpEndpoint"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
    ]:
        with pytest.raises(helm.HelmValuesError) as e:
            m.render(bad)
        assert where in str(e.value), str(e.value)


def test_drafter_pods_land_on_the_small_gpu_pool_and_verifiers_on_the_large(rendered):
    docs = rendered["gpu-prod"]
    drafter = m.one(docs, "Deployment", "drafter")["spec"]["template"]["spec"]
    verifier = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]
    assert drafter["nodeSelector"] == {
        "coralline.io/pool": "small-gpu",
        "nvidia.com/gpu.product": "NVIDIA-L4",
    }
    assert verifier["nodeSelector"]["coralline.io/pool"] == "large-gpu"
    for spec in (drafter, verifier):
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]


def test_verifier_pods_request_a_gpu_in_gpu_prod_and_none_in_cpu_dev(rendered):
    def gpus(name):
        spec = m.one(rendered[name], "StatefulSet", "verifier")["spec"]["template"]["spec"]
        res = spec["containers"][0]["resources"]
        return res.get("limits", {}).get("nvidia.com/gpu"), spec["containers"][0]["args"]

    prod, prod_args = gpus("gpu-prod")
    dev, dev_args = gpus("cpu-dev")
    assert prod == 1 and "--device=cuda" in prod_args and "--dtype=bfloat16" in prod_args
    assert dev is None and "--device=cpu" in dev_args
    image = m.one(rendered["gpu-prod"], "StatefulSet", "verifier")["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert image == "ghcr.io/acme/coralline-verifier:0.1.0-cuda"


@pytest.mark.parametrize("name", NAMES)
def test_no_container_runs_as_root(rendered, name):
    specs = m.pod_specs(rendered[name])
    assert specs
    for obj, spec in specs:
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, obj
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, obj
        for c in _containers(spec):
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, (obj, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False, (obj, c["name"])
            assert sc.get("readOnlyRootFilesystem") is True, (obj, c["name"])
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], (obj, c["name"])
            assert not sc.get("privileged"), (obj, c["name"])


def test_disabling_redis_removes_its_objects_and_requires_an_external_url(rendered):
    import helm_python as helm

    docs = rendered["minimal"]
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    url = "redis://redis.shared.svc:6379/3"
    verifier = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]["containers"][0]
    assert f"--sessions={url}" in verifier["args"]
    serve = yaml.safe_load(m.one(docs, "RayService", "router")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["redis"] == url
    with pytest.raises(helm.HelmValuesError, match="/redis/externalUrl"):
        m.render({"redis": {"enabled": False}})
    assert m.find(rendered["default"], "Deployment", "redis")  # enabled by default


@pytest.mark.parametrize("name", NAMES)
def test_every_probe_of_a_coralline_service_is_a_grpc_health_probe(rendered, name):
    checked = 0
    for kind, component in (("Deployment", "drafter"), ("StatefulSet", "verifier")):
        for obj in m.find(rendered[name], kind, component):
            c = obj["spec"]["template"]["spec"]["containers"][0]
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert set(c[probe]) - {"periodSeconds", "failureThreshold", "timeoutSeconds"} == {
                    "grpc"
                }, (component, probe)
                assert c[probe]["grpc"] == {"port": port}
                checked += 1
    assert checked == (3 if name == "minimal" else 6)  # minimal: no drafters


def test_the_routers_rayservice_points_at_the_proto_services_the_code_serves(rendered):
    import importlib

    from coralline.router import app

    for name in NAMES:
        ray = m.one(rendered[name], "RayService", "router")
        serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
        assert serve["grpc_options"]["grpc_servicer_functions"] == [app.GRPC_SERVICER]
        module, fn = app.GRPC_SERVICER.rsplit(".", 1)
        assert module.endswith("generation_pb2_grpc")
        assert callable(getattr(importlib.import_module(module), fn))
        (application,) = serve["applications"]
        assert application["import_path"] == "coralline.router.app:from_args"
        port = serve["grpc_options"]["port"]
        service = m.one(rendered[name], "Service", "router")
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["ports"][0]["targetPort"] == "serve-grpc"
        # the OpenAI-compatible HTTP API on Serve's HTTP proxy, on every interface of the pod
        assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
        http = service["spec"]["ports"][1]
        assert (http["name"], http["port"], http["targetPort"]) == ("http", 8000, "serve-http")
        assert application["args"]["http"] == {"models": ["smollm2-135m-instruct"]}
        # the Serve application the operator would deploy is built from these args
        args = application["args"]
        assert app.from_args(args) is not None
        if name != "minimal":
            assert args["kubernetes_namespace"] == "serving"
            assert args["kubernetes_selector"] == "app.kubernetes.io/instance=coralline"


def test_external_redis_auth_and_otlp_are_values_not_edits(rendered):
    docs = rendered["gpu-prod"]
    verifier = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in verifier["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "coralline-redis",
        "key": "password",
    }
    assert "--sessions=redis://:$(REDIS_PASSWORD)@coralline-redis:6379/0" in verifier["args"]
    assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]["value"] == (
        "http://tempo-distributor.monitoring:4317"
    )
    serve = yaml.safe_load(m.one(docs, "RayService", "router")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["redis"] == (
        "redis://:${REDIS_PASSWORD}@coralline-redis:6379/0"
    )
    config = m.find(docs, "ConfigMap")
    assert any(c["data"].get("OTEL_SDK_DISABLED") == "false" for c in config)
    default = m.one(rendered["default"], "StatefulSet", "verifier")["spec"]["template"]["spec"]
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in {
        e["name"] for e in default["containers"][0]["env"]
    }


def test_the_dashboards_ship_as_a_configmap_for_grafanas_sidecar(rendered):
    cm = m.one(rendered["default"], "ConfigMap", "dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = sorted(p.name for p in (m.CHART / "dashboards").glob("*.json"))
    assert sorted(cm["data"]) == shipped
    for name in shipped:
        assert cm["data"][name].strip() == (m.CHART / "dashboards" / name).read_text().strip()
    assert not m.find(rendered["cpu-dev"], "ConfigMap", "dashboards")  # turned off there


def test_servicemonitor_and_autoscaling_on_queue_depth(rendered):
    docs = rendered["gpu-prod"]
    (sm,) = m.find(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    for component in ("drafter", "verifier"):
        svc = m.one(docs, "Service", component)
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    hpas = {
        h["metadata"]["labels"]["app.kubernetes.io/component"]: h
        for h in m.find(docs, "HorizontalPodAutoscaler")
    }
    assert hpas["drafter"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
        "coralline_drafter_queue_depth"
    )
    assert hpas["verifier"]["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert hpas["verifier"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == (
        "coralline_num_requests_waiting"
    )
    assert "replicas" not in m.one(docs, "StatefulSet", "verifier")["spec"]  # the HPA owns it
    assert not m.find(rendered["default"], "ServiceMonitor")


def test_network_policies_allow_only_the_links_of_the_data_flow(rendered):
    docs = rendered["default"]

    def sources(component, port):
        pol = m.one(docs, "NetworkPolicy", component)
        out = set()
        for rule in pol["spec"]["ingress"]:
            if "ports" not in rule or port in {p["port"] for p in rule["ports"]}:
                peers = rule.get("from")
                if peers is None:
                    out.add("anyone")
                for peer in peers or []:
                    out.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
        return out

    assert sources("verifier", "grpc") == {"router"}
    assert sources("drafter", "grpc") == {"verifier", "router"}
    assert sources("redis", "redis") == {"router", "verifier"}
    assert sources("router", "serve-grpc") == {"anyone", "router"}
    assert sources("router", "serve-http") == {"anyone", "router"}
    assert sources("router", "dashboard") == {"anyone", "router"}  # the KubeRay operator
    assert sources("verifier", "metrics") == {"anyone"}
    prod = m.one(rendered["gpu-prod"], "NetworkPolicy", "router")["spec"]["ingress"]
    namespaces = {
        r["ports"][0]["port"]: r["from"][0]["namespaceSelector"]["matchLabels"][
            "kubernetes.io/metadata.name"
        ]
        for r in prod
        if "ports" in r
    }
    assert namespaces == {"serve-grpc": "gateway", "dashboard": "kuberay"}
    assert not m.find(rendered["minimal"], "NetworkPolicy")


def test_a_disabled_drafter_makes_verifiers_decode_plainly(rendered):
    docs = rendered["minimal"]
    assert not m.find(docs, "Deployment", "drafter")
    args = m.one(docs, "StatefulSet", "verifier")["spec"]["template"]["spec"]["containers"][0]
    assert "--no-drafter" in args["args"]
    serve = yaml.safe_load(m.one(docs, "RayService", "router")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["default_drafter"] == "none"


def test_the_optional_collector_receives_every_services_spans(rendered):
    docs = rendered["cpu-dev"]  # collector on, no backend: it prints spans
    collector = m.one(docs, "Deployment", "otel-collector")["spec"]["template"]["spec"]
    assert collector["containers"][0]["image"].startswith("otel/opentelemetry-collector-contrib:")
    config = yaml.safe_load(m.one(docs, "ConfigMap", "otel-collector")["data"]["config.yaml"])
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["debug"]
    for kind, component in (("Deployment", "drafter"), ("StatefulSet", "verifier")):
        c = m.one(docs, kind, component)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://coralline-otel-collector:4317"
    tempo = "http://tempo:4317"
    forwarding = m.render({"telemetry": {"collector": {"enabled": True}, "otlpEndpoint": tempo}})
    cm = m.one(forwarding, "ConfigMap", "otel-collector")
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["exporters"]["otlp"] == {"endpoint": tempo, "tls": {"insecure": True}}
    assert not m.find(rendered["default"], "Deployment", "otel-collector")

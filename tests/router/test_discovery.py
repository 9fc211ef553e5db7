"""Discovery: a static list, and Kubernetes EndpointSlices through the real `kubernetes` client
against a small HTTP server that serves EndpointSlice JSON (no cluster runs here)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from coralline.router.discovery import KubernetesDiscovery, StaticDiscovery
from coralline.router.placement import DRAFTER, VERIFIER, Request, place


def _slice(name, port_name, endpoints, port=50051):
    return {
        "metadata": {"name": name},
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def _ep(ip, ready=True, node=None, zone=None):
    e = {"addresses": [ip], "conditions": {"ready": ready}}
    if node:
        e["nodeName"] = node
    if zone:
        e["zone"] = zone
    return e


SLICES = {
    "app.kubernetes.io/component=verifier": [
        _slice("v-1", "grpc", [_ep("10.0.0.1", node="n1", zone="z1"), _ep("10.0.0.2", False)]),
        _slice("v-2", "metrics", [_ep("10.0.0.3")], port=9090),  # not the gRPC port
    ],
    "app.kubernetes.io/component=drafter": [
        _slice("d-1", "grpc", [_ep("10.0.1.1", node="n2", zone="z1"), _ep("10.0.1.2", node="n1")],
               port=50052),
    ],
}  # fmt: skip


@pytest.fixture()
def api_server():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            seen.append((url.path, parse_qs(url.query)))
            if "/namespaces/forbidden/" in url.path:
                self.send_response(403)
                self.end_headers()
                self.wfile.write(b'{"kind":"Status","code":403}')
                return
            selector = parse_qs(url.query).get("labelSelector", [""])[0]
            body = {
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": {},
                "items": SLICES.get(selector, []),
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def _client(host):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = host
    return client.ApiClient(cfg)


def test_endpoint_slices_become_workers(api_server):
    host, seen = api_server
    workers = KubernetesDiscovery("serving", api_client=_client(host)).discover()
    got = {(w.address, w.kind, w.node, w.zone) for w in workers}
    assert got == {
        ("10.0.0.1:50051", VERIFIER, "n1", "z1"),  # 10.0.0.2 is not ready; v-2 has no grpc port
        ("10.0.1.1:50052", DRAFTER, "n2", "z1"),
        ("10.0.1.2:50052", DRAFTER, "n1", ""),
    }
    paths = {p for p, _ in seen}
    assert paths == {"/apis/discovery.k8s.io/v1/namespaces/serving/endpointslices"}
    assert {q["labelSelector"][0] for _, q in seen} == set(SLICES)
    # the drafter on the verifier's node is chosen
    assert place(workers, Request("s")).drafter.address == "10.0.1.2:50052"


def test_api_errors_are_clear(api_server):
    host, _ = api_server
    with pytest.raises(RuntimeError, match=r"forbidden.*403"):
        KubernetesDiscovery("forbidden", api_client=_client(host)).discover()


def test_static_discovery():
    workers = StaticDiscovery(["127.0.0.1:50051", "[::1]:50061"], ["127.0.0.1:50052"]).discover()
    assert [(w.address, w.kind) for w in workers] == [
        ("127.0.0.1:50051", VERIFIER),
        ("[::1]:50061", VERIFIER),
        ("127.0.0.1:50052", DRAFTER),
    ]
    for bad in (["localhost"], ["h:0"], ["h:99999"], [":50051"]):
        with pytest.raises(ValueError, match="host:port"):
            StaticDiscovery(bad)
    with pytest.raises(ValueError, match="at least one verifier"):
        StaticDiscovery([])

"""Discovery: where the verifiers and drafters are, behind one interface.

    Discovery.discover() -> list[Worker]   (addresses, kind, node / zone labels when known)

Sources: `StaticDiscovery` (addresses given on the command line) and `KubernetesDiscovery`
(EndpointSlices selected by label through the `kubernetes` client: ready endpoints only, the
port named `port_name`, the node name and zone each endpoint reports). A Redis heartbeat
registry (services register themselves with a TTL and their load) joins them with the Redis
session store. Load figures (`active`, `capacity`) come from the workers' Info or heartbeats,
not from discovery: a discovered Worker carries active 0 and capacity 1 until the router
merges them in.

Knows nothing about placement or gRPC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from coralline.router.placement import DRAFTER, VERIFIER, Worker


class Discovery(Protocol):
    def discover(self) -> list[Worker]: ...


def check_address(address: str) -> str:
    """host:port (IPv6 hosts in brackets); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return address


@dataclass(frozen=True)
class StaticDiscovery:
    verifiers: Sequence[str]
    drafters: Sequence[str] = ()

    def __post_init__(self) -> None:
        for a in [*self.verifiers, *self.drafters]:
            check_address(a)
        if not self.verifiers:
            raise ValueError("static discovery needs at least one verifier address")

    def discover(self) -> list[Worker]:
        return [Worker(a, VERIFIER) for a in self.verifiers] + [
            Worker(a, DRAFTER) for a in self.drafters
        ]


@dataclass(frozen=True)
class KubernetesDiscovery:
    namespace: str
    verifier_selector: str = "app.kubernetes.io/component=verifier"
    drafter_selector: str = "app.kubernetes.io/component=drafter"
    port_name: str = "grpc"  # the EndpointSlice port carrying the gRPC service
    api_client: object | None = field(default=None, compare=False)  # kubernetes.client.ApiClient
    # (None: the in-cluster configuration, else the local kubeconfig)

    def _api(self):
        from kubernetes import client, config

        if self.api_client is not None:
            return client.DiscoveryV1Api(self.api_client)
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.DiscoveryV1Api()

    def discover(self) -> list[Worker]:
        from kubernetes.client.exceptions import ApiException

        api = self._api()
        out: list[Worker] = []
        for kind, selector in (
            (VERIFIER, self.verifier_selector),
            (DRAFTER, self.drafter_selector),
        ):
            try:
                slices = api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
            except ApiException as e:
                raise RuntimeError(
                    f"listing EndpointSlices in {self.namespace!r} ({selector}) failed: "
                    f"{e.status} {e.reason}"
                ) from None
            for s in slices.items:
                port = next((p.port for p in s.ports or () if p.name == self.port_name), None)
                if port is None:
                    continue
                for ep in s.endpoints or ():
                    if ep.conditions is not None and ep.conditions.ready is False:
                        continue
                    for ip in ep.addresses or ():
                        host = f"[{ip}]" if ":" in ip else ip
                        out.append(
                            Worker(
                                f"{host}:{port}", kind, node=ep.node_name or "", zone=ep.zone or ""
                            )
                        )
        return out

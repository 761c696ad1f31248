"""Zone preference over xDS, with real clients: a client whose bootstrap node
names a locality (`node.locality.zone`) gets EDS with its zone's locality at
priority 0 and every other at priority 1, while its zone has a serving
endpoint; otherwise every locality is priority 0.

Proxyless grpcio (`xds:///greeter.default:grpc`) and Envoy (priority
failover) each keep every call in their zone, move to the other zone when
theirs empties or drains, and come back when it returns, with no failed call.
Admin shows each xDS client's zone.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from conftest import START_TIMEOUT, wait_until, write_yaml
from xds_helpers import GREETER, XdsClient, endpoint, envoy_bootstrap, free_port, grpc_bootstrap, start_envoy

pytestmark = pytest.mark.timeout(120)

# A change reaches the client within this (the file is polled every 50 ms).
FOLLOW_WITHIN = 2.0






@pytest.fixture
def two_zones(start_greeter):
    """Two backends in zone-a (a1, a2) and two in zone-b (b1, b2)."""
    return {name: start_greeter(name) for name in ("a1", "a2", "b1", "b2")}


def services(greeters: dict, zone_a: str = "serving") -> dict:
    """The greeter service with zone-b's two backends and zone-a's as asked:
    `serving`, `draining` or `gone`."""
    entries = [endpoint(greeters[n], "zone-b") for n in ("b1", "b2")]
    if zone_a != "gone":
        entries += [endpoint(greeters[n], "zone-a", draining=zone_a == "draining") for n in ("a1", "a2")]
    return {GREETER: entries}


def zones_of(backends) -> set[str]:
    return {"zone-" + name[0] for name in backends}


def test_proxyless_grpc_keeps_calls_in_its_zone_and_fails_over(start_lb, two_zones, stubs, xds_clients, admin_for):
    lb = start_lb(services=services(two_zones))
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]

    def client(node_id: str, zone: str | None) -> XdsClient:
        started = XdsClient(f"xds:///{GREETER}", grpc_bootstrap(lb.grpc_addr, node_id, zone=zone), stubs_dir)
        xds_clients.append(started)
        return started

    in_a, in_b, anywhere = client("grpc-zone-a", "zone-a"), client("grpc-zone-b", "zone-b"), client("grpc-no-zone", None)
    for c, zone in ((in_a, "zone-a"), (in_b, "zone-b")):
        names = {"zone-a": {"a1", "a2"}, "zone-b": {"b1", "b2"}}[zone]
        wait_until(lambda c=c, names=names: set(c.calls(8)["backends"]) == names, START_TIMEOUT, f"calls over {zone}")
        spread = c.calls(40)
        assert not spread["errors"] and set(spread["backends"]) == names, (zone, spread)
    # A client with no zone prefers none: both zones get calls.
    wait_until(lambda: zones_of(anywhere.calls(20)["backends"]) == {"zone-a", "zone-b"}, START_TIMEOUT, "calls over both zones")

    def only(c: XdsClient, zone: str, what: str) -> None:
        """Waits until every one of 10 calls lands in `zone`; no call fails meanwhile."""
        failed: collections.Counter = collections.Counter()

        def landed() -> bool:
            result = c.calls(10)
            failed.update(result["errors"])
            return zones_of(result["backends"]) == {zone}

        wait_until(landed, FOLLOW_WITHIN, what, interval=0)
        assert not failed, failed

    # zone-a drains: its client moves to zone-b at once.
    write_yaml(lb.file, services(two_zones, zone_a="draining"))
    only(in_a, "zone-b", "zone-a's client to move to zone-b when zone-a drains")
    spread = in_a.calls(40)
    assert not spread["errors"] and set(spread["backends"]) == {"b1", "b2"}, spread
    # zone-a comes back: its client returns.
    write_yaml(lb.file, services(two_zones))
    only(in_a, "zone-a", "zone-a's client to return to zone-a")
    # zone-a's endpoints are removed: the same failover.
    write_yaml(lb.file, services(two_zones, zone_a="gone"))
    only(in_a, "zone-b", "zone-a's client to move to zone-b when zone-a's endpoints go")
    write_yaml(lb.file, services(two_zones))
    only(in_a, "zone-a", "zone-a's client to return to zone-a once its endpoints are back")
    # zone-b's client never left its zone.
    spread = in_b.calls(40)
    assert not spread["errors"] and set(spread["backends"]) == {"b1", "b2"}, spread

    # Admin shows each xDS client's node zone.
    zones = {
        s.xds.node_id: s.zone for s in admin_for(lb).list_subscribers() if s.protocol == "xds"
    }
    assert zones == {"grpc-zone-a": "zone-a", "grpc-zone-b": "zone-b", "grpc-no-zone": ""}, zones


def test_envoy_keeps_calls_in_its_zone_and_fails_over_by_priority(
    start_lb, two_zones, stubs, channels, processes, tmp_path
):
    lb = start_lb(services=services(two_zones))
    port = free_port()
    _, admin = start_envoy(
        processes, tmp_path, envoy_bootstrap(lb.grpc_addr, port, GREETER, "envoy-zone-a", zone="zone-a"), "envoy-zone-a"
    )
    wait_until(lambda: len(admin.hosts(GREETER)) == 4, START_TIMEOUT, "envoy's hosts")
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{port}"))

    def calls(n: int) -> collections.Counter:
        backends: collections.Counter = collections.Counter()
        for _ in range(n):
            backends[stub.SayHello(stubs.helloworld_pb2.HelloRequest(name="zones"), timeout=2).backend] += 1
        return backends

    spread = calls(40)
    assert set(spread) == {"a1", "a2"}, spread
    write_yaml(lb.file, services(two_zones, zone_a="gone"))
    wait_until(lambda: zones_of(calls(10)) == {"zone-b"}, FOLLOW_WITHIN, "envoy to fail over to zone-b", interval=0)
    assert set(calls(40)) == {"b1", "b2"}
    write_yaml(lb.file, services(two_zones))
    wait_until(lambda: zones_of(calls(10)) == {"zone-a"}, FOLLOW_WITHIN, "envoy to return to zone-a", interval=0)

"""Delta xDS (`DeltaAggregatedResources`) with real peers: Envoy bootstrapped
with `api_type: DELTA_GRPC` follows scale-up, drain and removal of real
greeter-server backends, and bad delta input from a raw grpcio client (an
unknown type, a NACK, a subscribe/unsubscribe storm, 10,000 names) gets a clear
error or bounded work while another Envoy keeps being served.

The raw client encodes the few protobuf fields it needs by hand (the envoy
protos are not compiled for Python here): DeltaDiscoveryRequest 1 node,
2 type_url, 3 subscribe, 4 unsubscribe, 6 response_nonce, 7 error_detail;
DeltaDiscoveryResponse 2 resources (Resource 1 version, 3 name), 4 type_url,
5 nonce, 6 removed_resources.
"""

from __future__ import annotations

import collections
import json
import queue
import re
import threading
import time

import grpc
import pytest

from conftest import START_TIMEOUT, wait_until, write_yaml
from xds_helpers import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GREETER,
    SECRET_TYPE,
    endpoint,
    envoy_bootstrap,
    free_port,
    start_envoy,
    xds_subscriber,
)

pytestmark = pytest.mark.timeout(120)

# What "within a second" allows: the file is polled every 50 ms, the rest is push and apply.
FOLLOW_WITHIN = 1.0
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"




# --------------------------------------------------------------------------- protobuf by hand


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | str | int) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _parse(data: bytes) -> dict[int, list]:
    fields: dict[int, list] = collections.defaultdict(list)
    i = 0
    while i < len(data):
        key, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            key |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        number, wire = key >> 3, key & 7
        value, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if wire == 2:
            fields[number].append(data[i : i + value])
            i += value
        else:
            assert wire == 0, f"unexpected wire type {wire}"
            fields[number].append(value)
    return fields


def delta_request(
    type_url: str,
    subscribe=(),
    unsubscribe=(),
    nonce: str = "",
    error: str | None = None,
    node_id: str | None = None,
) -> bytes:
    out = b""
    if node_id is not None:
        out += _field(1, _field(1, node_id))
    out += _field(2, type_url)
    out += b"".join(_field(3, name) for name in subscribe)
    out += b"".join(_field(4, name) for name in unsubscribe)
    if nonce:
        out += _field(6, nonce)
    if error is not None:
        out += _field(7, _field(1, 3) + _field(2, error))
    return out


def delta_response(data: bytes) -> dict:
    fields = _parse(data)
    resources = []
    for raw in fields.get(2, []):
        resource = _parse(raw)
        resources.append((resource[3][0].decode(), resource[1][0].decode() if 1 in resource else ""))
    return {
        "type_url": fields[4][0].decode() if 4 in fields else "",
        "nonce": fields[5][0].decode() if 5 in fields else "",
        "resources": resources,
        "removed": [name.decode() for name in fields.get(6, [])],
    }


class RawDelta:
    """One raw DeltaAggregatedResources stream: requests in, decoded responses out."""

    def __init__(self, channel: grpc.Channel):
        self.requests: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        rpc = channel.stream_stream(
            DELTA_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        self.call = rpc(iter(self.requests.get, None))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.responses.put(delta_response(raw))
        except grpc.RpcError as error:
            self.error = error
        self.responses.put(None)

    def send(self, request: bytes) -> None:
        self.requests.put(request)

    def next(self, timeout: float = 5.0) -> dict:
        response = self.responses.get(timeout=timeout)
        assert response is not None, f"the stream ended: {self.error}"
        return response

    def nothing_for(self, seconds: float) -> bool:
        try:
            response = self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected response {response}")

    def ended(self, timeout: float = 10.0) -> grpc.RpcError | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        return self.error

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


@pytest.fixture
def raw_delta(channels):
    opened: list[RawDelta] = []

    def open_stream(lb) -> RawDelta:
        stream = RawDelta(channels(lb.grpc_addr))
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


# --------------------------------------------------------------------------- Envoy


def delta_envoy(processes, tmp_path, lb, node_id: str):
    port = free_port()
    config = envoy_bootstrap(lb.grpc_addr, port, GREETER, node_id, delta=True)
    _, admin = start_envoy(processes, tmp_path, config, node_id)
    return admin, port


def call_through(stub, stubs, n: int) -> collections.Counter:
    backends: collections.Counter = collections.Counter()
    for _ in range(n):
        reply = stub.SayHello(stubs.helloworld_pb2.HelloRequest(name="envoy"), timeout=2)
        backends[reply.backend] += 1
    return backends


def follows(stub, stubs, want: set[str], what: str, calls: int = 20) -> float:
    """Seconds until `calls` calls through Envoy reach exactly `want`; at most FOLLOW_WITHIN."""
    started = time.monotonic()
    wait_until(lambda: set(call_through(stub, stubs, calls)) == want, FOLLOW_WITHIN, what, interval=0.01)
    return time.monotonic() - started


def cluster_versions(envoy_admin) -> dict[str, str]:
    """The version of each dynamic cluster Envoy holds, from /config_dump."""
    dump = json.loads(envoy_admin.get("/config_dump?resource=dynamic_active_clusters"))
    versions = {}
    for config in dump.get("configs", []):
        cluster = config.get("cluster", {})
        versions[cluster.get("name", "")] = config.get("version_info", "")
    return versions


def test_envoy_over_delta_ads_follows_scale_up_drain_and_removal(
    processes, tmp_path, start_lb, start_greeter, stubs, channels, admin_for
):
    a, b, c = start_greeter("a"), start_greeter("b"), start_greeter("c")
    lb = start_lb(services={GREETER: [endpoint(a), endpoint(b)]})
    envoy, port = delta_envoy(processes, tmp_path, lb, "envoy-delta")
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{port}"))
    wait_until(lambda: set(call_through(stub, stubs, 20)) == {"a", "b"}, START_TIMEOUT, "calls through envoy to a and b")

    # Delta, not state of the world: each resource carries its own version,
    # lb-server's "{epoch}:{stamp}", where SotW versions count responses.
    versions = cluster_versions(envoy)
    assert re.fullmatch(r"[0-9a-f]+:p", versions.get(GREETER, "")), versions

    write_yaml(lb.file, {GREETER: [endpoint(a), endpoint(b), endpoint(c)]})
    took = follows(stub, stubs, {"a", "b", "c"}, "envoy to route to a, b and new c")
    print(f"delta scale-up followed in {took * 1000:.0f} ms")

    write_yaml(lb.file, {GREETER: [endpoint(a, draining=True), endpoint(b), endpoint(c)]})
    took = follows(stub, stubs, {"b", "c"}, "envoy to stop routing to draining a")
    print(f"delta drain followed in {took * 1000:.0f} ms")
    health = {h["hostname"]: h["health"] for h in envoy.hosts(GREETER)}
    assert health == {"a": "DRAINING", "b": "HEALTHY", "c": "HEALTHY"}, health

    write_yaml(lb.file, {GREETER: [endpoint(b), endpoint(c)]})
    wait_until(lambda: {h["hostname"] for h in envoy.hosts(GREETER)} == {"b", "c"}, FOLLOW_WITHIN, "a to leave envoy")
    write_yaml(lb.file, {GREETER: [endpoint(c)]})
    took = follows(stub, stubs, {"c"}, "envoy to route to c only once b is removed")
    print(f"delta removal followed in {took * 1000:.0f} ms")
    # The cluster itself did not change, so it was not re-sent.
    assert cluster_versions(envoy)[GREETER] == versions[GREETER]

    # Admin shows the Envoy with wildcard CDS and named EDS, every version ACKed.
    admin = admin_for(lb)
    subscriber = wait_until(lambda: xds_subscriber(admin, "envoy-delta"), START_TIMEOUT, "envoy in ListSubscribers")
    types = {t.type_url: t for t in subscriber.xds.resource_types}
    assert list(types[CLUSTER_TYPE].resource_names) == ["*"], types
    assert list(types[ENDPOINT_TYPE].resource_names) == [GREETER], types
    wait_until(
        lambda: all(
            t.last_acked_version == t.last_version_sent and t.nacks == 0
            for t in xds_subscriber(admin, "envoy-delta").xds.resource_types
        ),
        START_TIMEOUT,
        "envoy to ACK every delta response",
    )

    # The whole service goes: its cluster is removed from Envoy.
    write_yaml(lb.file, {"other.prod:8080": ["10.1.2.3:8080"]})
    wait_until(lambda: set(cluster_versions(envoy)) == {"other.prod:8080"}, START_TIMEOUT, "greeter's cluster to go")


def test_bad_delta_input_is_bounded_and_another_envoy_keeps_being_served(
    processes, tmp_path, start_lb, start_greeter, stubs, channels, admin_for, raw_delta
):
    a, b = start_greeter("a"), start_greeter("b")
    lb = start_lb(services={GREETER: [endpoint(a)]})
    envoy, port = delta_envoy(processes, tmp_path, lb, "envoy-bystander")
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{port}"))
    wait_until(lambda: set(call_through(stub, stubs, 5)) == {"a"}, START_TIMEOUT, "calls through envoy to a")

    # An unknown type is ignored (as go-control-plane does: no response) and
    # counted; the stream goes on and serves the types it knows.
    raw = raw_delta(lb)
    raw.send(delta_request(SECRET_TYPE, subscribe=["x"], node_id="raw-delta"))
    raw.nothing_for(0.5)
    assert lb.metric("lookaside_rejected_requests_total", {"api": "xds", "reason": "unknown_type"}) >= 1
    raw.send(delta_request(CLUSTER_TYPE))
    clusters = raw.next()
    assert clusters["type_url"] == CLUSTER_TYPE and [name for name, _ in clusters["resources"]] == [GREETER]

    # A NACK: counted, shown in Admin, logged; nothing re-sent.
    raw.send(delta_request(CLUSTER_TYPE, nonce=clusters["nonce"], error="bad cluster, says the test"))
    raw.nothing_for(0.5)
    admin = admin_for(lb)

    def nacked():
        subscriber = xds_subscriber(admin, "raw-delta")
        types = {t.type_url: t for t in subscriber.xds.resource_types} if subscriber else {}
        cluster = types.get(CLUSTER_TYPE)
        return cluster if cluster and cluster.nacks else None

    cluster = wait_until(nacked, START_TIMEOUT, "the NACK in Admin")
    assert cluster.nacks == 1 and cluster.last_nack.nonce == clusters["nonce"], cluster
    assert "bad cluster, says the test" in cluster.last_nack.message
    assert lb.metric("lookaside_xds_nacks_total", {"type_url": CLUSTER_TYPE}) == 1
    lb.process.wait_for_line(r"xDS client rejected a response \(NACK\)")

    # A storm of subscribe/unsubscribe: read at the request rate, not faster
    # (a burst of 100, then 20 per second), each request answered in turn.
    storm = raw_delta(lb)
    started = time.monotonic()
    requests = 200
    for i in range(requests):
        names = [f"s{i}-{j}.default:1" for j in range(50)]
        storm.send(delta_request(ENDPOINT_TYPE, subscribe=names, unsubscribe=[f"s{i - 1}-{j}.default:1" for j in range(50)]))
    wait_until(
        lambda: lb.metric("lookaside_rejected_requests_total", {"api": "xds", "reason": "rate_limited"}) > 0,
        START_TIMEOUT,
        "the storm to be held back",
    )
    # Meanwhile the other Envoy follows a change at once.
    write_yaml(lb.file, {GREETER: [endpoint(a), endpoint(b)]})
    took = follows(stub, stubs, {"a", "b"}, "the bystander envoy to route to new b during the storm")
    print(f"bystander envoy followed a scale-up in {took * 1000:.0f} ms during the storm")
    for i in range(requests):
        answer = storm.next(timeout=5)
        # Each answer says its request's 50 new names do not exist.
        assert len(answer["removed"]) == 50 and not answer["resources"], answer
    elapsed = time.monotonic() - started
    least = (requests - 100) / 20
    print(f"{requests} storm requests answered in {elapsed:.1f} s (rate limit: at least {least:.0f} s)")
    assert elapsed >= least * 0.8, f"{requests} requests in {elapsed:.1f} s: faster than the rate limit"

    # 10,000 names are served (none exists: all answered as removed) ...
    many = raw_delta(lb)
    names = [f"svc{i}.default:1" for i in range(10_000)]
    many.send(delta_request(ENDPOINT_TYPE, subscribe=names))
    answer = many.next(timeout=10)
    assert len(answer["removed"]) == 10_000 and not answer["resources"]
    # ... one more name ends the stream with RESOURCE_EXHAUSTED.
    too_many = raw_delta(lb)
    too_many.send(delta_request(ENDPOINT_TYPE, subscribe=names + ["one-more.default:1"]))
    error = too_many.ended()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "at most 10000" in error.details()
    assert lb.metric("lookaside_rejected_requests_total", {"api": "xds", "reason": "too_many_names"}) >= 1

    # The bystander never noticed: no NACK, and it still follows changes.
    write_yaml(lb.file, {GREETER: [endpoint(b)]})
    follows(stub, stubs, {"b"}, "the bystander envoy to route to b only")
    bystander = {t.type_url: t for t in xds_subscriber(admin, "envoy-bystander").xds.resource_types}
    assert all(t.nacks == 0 for t in bystander.values()), bystander

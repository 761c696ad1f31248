"""Python grpcio as a stock grpclb client of lb-server.

grpcio finds grpclb balancers only through DNS SRV records
(`_grpclb._tcp.HOST`), so each test runs a loopback DNS server (dnslib, UDP and
TCP on one OS-picked port) and points the channel at it with
`dns://127.0.0.1:PORT/HOST:PORT`. The balancer is lb-server; the backends are
greeter-server processes whose replies name the backend that served them.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from conftest import RPC_TIMEOUT, wait_until, write_yaml

pytestmark = pytest.mark.timeout(60)

# A numeric port in the key: grpcio resolves HOST:PORT from the channel target
# and sends that same HOST:PORT as the grpclb name.
SERVICE = "greeter.default:8080"
LB_HOST = "lb.test."
GRPCLB_CONFIG = json.dumps({"loadBalancingConfig": [{"grpclb": {"childPolicy": [{"round_robin": {}}]}}]})


class Resolver(BaseResolver):
    """Answers SRV `_grpclb._tcp.HOST` with the balancer, A/AAAA from `a`/`aaaa`.

    Names it knows get NOERROR (possibly with no answers); others NXDOMAIN."""

    def __init__(self):
        self.lock = threading.Lock()
        self.a: dict[str, list[str]] = {}
        self.aaaa: dict[str, list[str]] = {}
        self.srv: dict[str, tuple[str, int]] = {}
        self.queries: list[tuple[str, str, str]] = []

    def resolve(self, request, handler):
        reply = request.reply()
        qname = request.q.qname
        name = str(qname).lower()
        qtype = QTYPE.get(request.q.qtype)
        with self.lock:
            self.queries.append((name, qtype, handler.protocol))
            known = name in self.a or name in self.aaaa or name in self.srv
            if qtype == "SRV" and name in self.srv:
                host, port = self.srv[name]
                reply.add_answer(RR(qname, QTYPE.SRV, ttl=1, rdata=SRV(0, 0, port, host)))
            elif qtype == "A":
                for ip in self.a.get(name, []):
                    reply.add_answer(RR(qname, QTYPE.A, ttl=1, rdata=A(ip)))
            elif qtype == "AAAA":
                for ip in self.aaaa.get(name, []):
                    reply.add_answer(RR(qname, QTYPE.AAAA, ttl=1, rdata=AAAA(ip)))
            # TXT (service config) and anything else: no answers.
            if not known:
                reply.header.rcode = RCODE.NXDOMAIN
        return reply


class LoopbackDns:
    def __init__(self):
        self.resolver = Resolver()
        logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        # UDP on a port the OS picks, then TCP on the same port (retried if taken).
        for _ in range(20):
            udp = DNSServer(self.resolver, address="127.0.0.1", port=0, logger=logger)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(self.resolver, address="127.0.0.1", port=port, tcp=True, logger=logger)
            except OSError:
                udp.server.server_close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.port = port
        self.servers = [udp, tcp]
        self.threads = [
            threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            for s in self.servers
        ]
        for thread in self.threads:
            thread.start()

    def balancer(self, host: str, lb_port: int) -> None:
        """SRV `_grpclb._tcp.HOST` → lb.test:LB_PORT, and lb.test → 127.0.0.1."""
        with self.resolver.lock:
            self.resolver.srv[f"_grpclb._tcp.{host}."] = (LB_HOST, lb_port)
            self.resolver.a[LB_HOST] = ["127.0.0.1"]

    def host(self, host: str, *ips: str) -> None:
        with self.resolver.lock:
            self.resolver.a[f"{host}."] = list(ips)

    def stop(self) -> None:
        for server in self.servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def dns():
    server = LoopbackDns()
    yield server
    server.stop()


def greeter_via_grpclb(stubs, channels, dns: LoopbackDns, target: str):
    channel = channels(
        f"dns://127.0.0.1:{dns.port}/{target}",
        options=[("grpc.dns_enable_srv_queries", 1), ("grpc.service_config", GRPCLB_CONFIG)],
    )
    return stubs.helloworld_pb2_grpc.GreeterStub(channel)


def call(stubs, greeter, n: int) -> Counter:
    """N sequential SayHello calls; the backends that served them."""
    request = stubs.helloworld_pb2.HelloRequest(name="interop")
    served = Counter()
    for _ in range(n):
        reply = greeter.SayHello(request, timeout=RPC_TIMEOUT, wait_for_ready=True)
        served[reply.backend] += 1
    return served


def assert_fair(served: Counter, backends: list[str], total: int, slack: int) -> None:
    assert set(served) == set(backends), served
    share = total / len(backends)
    for backend in backends:
        assert abs(served[backend] - share) <= slack, f"{backend} got {served[backend]} of {total}: {served}"


def wait_until_all_serve(stubs, greeter, backends: list[str], timeout: float = 10) -> None:
    """Round robin picks only connected backends: wait until every one answers."""
    seen: set[str] = set()

    def all_seen():
        seen.update(call(stubs, greeter, 2 * len(backends)))
        return set(backends) <= seen

    wait_until(all_seen, timeout, f"calls to reach all of {backends}", interval=0.01)


def grpclb_subscribers(admin, target: str):
    return [s for s in admin.list_subscribers() if s.protocol == "grpclb" and s.target == target]


@pytest.fixture
def three_backends(start_greeter, start_lb, dns):
    greeters = [start_greeter(f"g{i}") for i in range(1, 4)]
    lb = start_lb(
        services={SERVICE: [g.addr for g in greeters]},
        extra=["--grpclb-stats-interval", "1s"],
    )
    dns.balancer("greeter.default", int(lb.grpc_addr.rsplit(":", 1)[1]))
    # Fallback addresses only; nothing listens on 127.0.0.1:8080 for these tests.
    dns.host("greeter.default", "127.0.0.1")
    return greeters, lb


def test_round_robin_over_the_server_list_and_client_stats(stubs, channels, dns, three_backends, admin_for):
    greeters, lb = three_backends
    names = [g.name for g in greeters]
    greeter = greeter_via_grpclb(stubs, channels, dns, SERVICE)
    wait_until_all_serve(stubs, greeter, names)

    served = call(stubs, greeter, 300)
    assert_fair(served, names, 300, slack=5)

    asked = {(name, qtype) for name, qtype, _ in dns.resolver.queries}
    assert ("_grpclb._tcp.greeter.default.", "SRV") in asked, asked

    admin = admin_for(lb)
    [subscriber] = grpclb_subscribers(admin, SERVICE)
    assert subscriber.peer.startswith("127.0.0.1:")
    assert subscriber.last_version_sent >= 1
    summary = {s.target: s for s in admin.list_services().services}[SERVICE]
    assert summary.subscribers >= 1

    # Stats are reported every second; they cover at least the 300 calls above.
    def reported():
        [s] = grpclb_subscribers(admin, SERVICE)
        stats = s.grpclb_stats
        return stats.reports >= 1 and stats.num_calls_started >= 300 and stats.num_calls_finished >= 300 and stats

    stats = wait_until(reported, 10, "grpclb client stats covering 300 calls", interval=0.1)
    assert stats.num_calls_finished_known_received >= 300
    assert stats.num_calls_dropped == 0
    assert stats.HasField("last_report")
    assert lb.metric("lookaside_grpclb_client_calls_total", {"kind": "started"}) >= 300


def test_server_list_follows_the_file(stubs, channels, dns, three_backends, start_greeter, admin_for):
    greeters, lb = three_backends
    greeter = greeter_via_grpclb(stubs, channels, dns, SERVICE)
    wait_until_all_serve(stubs, greeter, [g.name for g in greeters])
    version_before = admin_for(lb).get_service(SERVICE).version

    g1, g2, g3 = greeters
    g4 = start_greeter("g4")
    write_yaml(
        lb.file,
        {SERVICE: [g1.addr, g2.addr, {"address": g3.addr, "draining": True}, g4.addr]},
    )
    started = time.monotonic()

    def switched():
        served = call(stubs, greeter, 12)
        return "g4" in served and "g3" not in served

    wait_until(switched, 10, "calls to reach g4 and stop reaching draining g3", interval=0.01)
    switch_seconds = time.monotonic() - started

    served = call(stubs, greeter, 300)
    assert "g3" not in served, served
    assert_fair(served, ["g1", "g2", "g4"], 300, slack=5)
    assert admin_for(lb).get_service(SERVICE).version > version_before
    print(f"grpclb client switched {switch_seconds:.3f}s after the file was rewritten")


def test_weights_repeat_entries_in_the_server_list(stubs, channels, dns, start_greeter, start_lb):
    heavy, light = start_greeter("heavy"), start_greeter("light")
    lb = start_lb(services={SERVICE: [{"address": heavy.addr, "weight": 3}, {"address": light.addr, "weight": 1}]})
    dns.balancer("greeter.default", int(lb.grpc_addr.rsplit(":", 1)[1]))
    dns.host("greeter.default", "127.0.0.1")
    greeter = greeter_via_grpclb(stubs, channels, dns, SERVICE)
    wait_until_all_serve(stubs, greeter, ["heavy", "light"])

    served = call(stubs, greeter, 200)
    assert abs(served["heavy"] - 150) <= 10 and abs(served["light"] - 50) <= 10, served


def test_unknown_service_falls_back_to_the_dns_backends(stubs, channels, dns, start_greeter, start_lb, admin_for):
    """lb-server sends fallback_response; grpcio then uses the A records of the target."""
    fallback = start_greeter("fallback")
    listed = start_greeter("listed")
    lb = start_lb(services={SERVICE: [listed.addr]})
    target = f"unlisted.default:{fallback.port}"
    dns.balancer("unlisted.default", int(lb.grpc_addr.rsplit(":", 1)[1]))
    dns.host("unlisted.default", "127.0.0.1")
    greeter = greeter_via_grpclb(stubs, channels, dns, target)

    # Quickly, not after grpclb's 10 s fallback timeout: fallback_response is explicit.
    started = time.monotonic()
    served = call(stubs, greeter, 20)
    assert served == Counter({"fallback": 20}), served
    assert time.monotonic() - started < 5

    admin = admin_for(lb)
    [subscriber] = grpclb_subscribers(admin, target)
    assert subscriber.peer.startswith("127.0.0.1:")
    assert ("_grpclb._tcp.unlisted.default.", "SRV") in {(n, t) for n, t, _ in dns.resolver.queries}

    # Once the file lists the service, lb-server sends a server list and grpcio leaves fallback.
    write_yaml(lb.file, {SERVICE: [listed.addr], target: [listed.addr]})
    wait_until(lambda: call(stubs, greeter, 5) == Counter({"listed": 5}), 10, "calls to leave fallback", interval=0.01)


def test_grpcio_sends_the_channel_targets_host_and_port_as_the_grpclb_name(stubs, channels, dns, start_greeter):
    """Pins what lb-server must parse: a recording balancer captures initial_request.name."""
    pb, pb_grpc = stubs.lb_pb2, stubs.lb_pb2_grpc
    names: queue.Queue[str] = queue.Queue()

    class Recorder(pb_grpc.LoadBalancerServicer):
        def BalanceLoad(self, request_iterator, context):
            first = next(request_iterator)
            names.put(first.initial_request.name if first.HasField("initial_request") else "<no initial_request>")
            yield pb.LoadBalanceResponse(initial_response=pb.InitialLoadBalanceResponse())
            yield pb.LoadBalanceResponse(fallback_response=pb.FallbackResponse())
            # Keep the stream open until the client goes away.
            while context.is_active():
                time.sleep(0.02)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_LoadBalancerServicer_to_server(Recorder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        fallback = start_greeter("fallback")
        target = f"greeter.default:{fallback.port}"
        dns.balancer("greeter.default", port)
        dns.host("greeter.default", "127.0.0.1")
        greeter = greeter_via_grpclb(stubs, channels, dns, target)
        assert call(stubs, greeter, 1) == Counter({"fallback": 1})
        name = names.get(timeout=5)
        print(f"grpcio sent initial_request.name={name!r}")
        assert name == target
    finally:
        server.stop(grace=None).wait(5)


# --------------------------------------------------------------------------- the protocol, by a raw grpc.lb.v1 client

RAW_SERVICE = "greeter.default:grpc"
LOOPBACK = bytes([127, 0, 0, 1])


@pytest.fixture
def raw_lb(start_lb):
    return start_lb(
        services={
            RAW_SERVICE: [
                {"address": "127.0.0.1:50051", "weight": 2},
                {"address": "127.0.0.1:50052"},
                {"address": "127.0.0.1:50053", "draining": True},
            ]
        }
    )


def kind(response) -> str:
    return response.WhichOneof("load_balance_response_type")


def servers(response) -> list[tuple[bytes, int]]:
    assert kind(response) == "server_list", response
    return [(bytes(s.ip_address), s.port) for s in response.server_list.servers]


def test_raw_protocol(raw_lb, balance_load, stubs, admin_for):
    """initial_response with the stats interval, then a weighted, interleaved server_list without the
    draining endpoint, then one per change; client_stats are recorded; unknown services get fallback."""
    lb = raw_lb
    pb = stubs.lb_pb2
    stream = balance_load(lb).initial(f"dns:///{RAW_SERVICE}")
    first = stream.next()
    assert kind(first) == "initial_response", first
    # lb-server's default --grpclb-stats-interval is 10s.
    assert first.initial_response.client_stats_report_interval.seconds == 10
    second = stream.next()
    assert servers(second) == [(LOOPBACK, 50051), (LOOPBACK, 50052), (LOOPBACK, 50051)]
    assert not any(s.drop or s.load_balance_token for s in second.server_list.servers)

    stream.send(pb.LoadBalanceRequest(client_stats=pb.ClientStats(num_calls_started=7, num_calls_finished=5)))
    admin = admin_for(lb)

    def recorded():
        found = [s for s in admin.list_subscribers() if s.protocol == "grpclb" and s.target == RAW_SERVICE]
        return found and found[0].grpclb_stats.num_calls_started == 7 and found[0]

    subscriber = wait_until(recorded, 5, "client_stats in Admin ListSubscribers")
    assert subscriber.grpclb_stats.num_calls_finished == 5
    assert subscriber.grpclb_stats.reports == 1

    write_yaml(lb.file, {RAW_SERVICE: [{"address": "127.0.0.1:50054"}]})
    assert servers(stream.next()) == [(LOOPBACK, 50054)]

    unknown = balance_load(lb).initial("nope.default:80")
    assert kind(unknown.next()) == "initial_response"
    assert kind(unknown.next()) == "fallback_response"


def test_raw_stream_follows_a_service_appearing_and_disappearing(start_lb, balance_load):
    lb = start_lb(services={"other.default:80": ["127.0.0.1:1"]})
    stream = balance_load(lb).initial("later.default:80")
    assert kind(stream.next()) == "initial_response"
    assert kind(stream.next()) == "fallback_response"

    write_yaml(lb.file, {"other.default:80": ["127.0.0.1:1"], "later.default:80": ["127.0.0.1:2"]})
    assert servers(stream.next()) == [(LOOPBACK, 2)]

    write_yaml(lb.file, {"other.default:80": ["127.0.0.1:1"]})
    assert kind(stream.next()) == "fallback_response"

    # Listed again, with an IPv6 endpoint: 16 bytes in network order.
    write_yaml(lb.file, {"later.default:80": ["[::1]:3", "127.0.0.1:4"]})
    assert sorted(servers(stream.next())) == sorted([(LOOPBACK, 4), (bytes(15) + b"\x01", 3)])

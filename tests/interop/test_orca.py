"""greeter-server's ORCA load reports, read by real peers.

The out-of-band reports are decoded with `xds-protos` (the CNCF xDS API's
own generated Python messages), and gRPC's `weighted_round_robin` policy in grpcio weights
backends by them: per call (the `endpoint-load-metrics-bin` trailer) and
out of band (`OpenRcaService/StreamCoreMetrics`). A backend made slow with
`--cpu-work-us` reports more CPU per call, and grpcio sends it less: with the
policy from a service config, and from lb-server's xDS Cluster
(`--xds-lb-policy weighted-round-robin`), where Envoy's
client_side_weighted_round_robin reads the same reports.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import grpc
import pytest
from xds.data.orca.v3 import orca_load_report_pb2
from xds.service.orca.v3 import orca_pb2

from conftest import RPC_TIMEOUT, START_TIMEOUT, Greeter, Process, binary, wait_until
from xds_helpers import CLUSTER_TYPE, GREETER, XdsClient, envoy_bootstrap, free_port, grpc_bootstrap, start_envoy

@pytest.fixture
def start_busy_greeter(processes):
    """Starts greeter-server NAME spending CPU_US of CPU per call."""

    def start(name: str, cpu_us: int) -> Greeter:
        process = Process(
            [
                binary("greeter-server"),
                "--listen",
                "127.0.0.1:0",
                "--name",
                name,
                "--cpu-work-us",
                str(cpu_us),
            ],
            name=f"greeter-{name}",
        )
        processes.append(process)
        match = process.wait_for_line(r"greeter-server listening addr=(\S+)")
        return Greeter(process, match.group(1), name)

    return start


def stream_core_metrics(channel, interval_ms: int):
    call = channel.unary_stream(
        "/xds.service.orca.v3.OpenRcaService/StreamCoreMetrics",
        request_serializer=orca_pb2.OrcaLoadReportRequest.SerializeToString,
        response_deserializer=orca_load_report_pb2.OrcaLoadReport.FromString,
    )
    request = orca_pb2.OrcaLoadReportRequest()
    request.report_interval.FromMilliseconds(interval_ms)
    return call(request, timeout=10)


def test_reports_decoded_with_the_xds_api_messages_show_the_calls(start_busy_greeter, stubs, channels):
    # grpcio reads the per-call trailer itself and does not hand it to the
    # application; the weighted round-robin tests below show it is read. The
    # same figures go out of band, where the xDS API's messages decode them.
    greeter = start_busy_greeter("busy", 2000)
    channel = channels(greeter.addr)
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channel)
    request = stubs.helloworld_pb2.HelloRequest(name="orca")
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 2.5:
        stub.SayHello(request, timeout=RPC_TIMEOUT)
        calls += 1
    rate = calls / (time.monotonic() - started)
    reports = stream_core_metrics(channel, 1000)
    report = next(iter(reports))
    reports.cancel()
    assert 0.3 * rate < report.rps_fractional < 3 * rate, (report, rate)
    assert report.eps == 0, report
    # Each call spent 2 ms of CPU: at least that share of the CPUs it may use.
    cpus = len(os.sched_getaffinity(0))
    assert report.rps_fractional * 0.002 / cpus * 0.5 < report.cpu_utilization <= 1.0, (report, cpus)


def test_out_of_band_reports_stream_at_the_asked_interval(start_busy_greeter, channels):
    greeter = start_busy_greeter("oob", 0)
    reports = stream_core_metrics(channels(greeter.addr), 1000)
    arrived = []
    for report in reports:
        assert isinstance(report, orca_load_report_pb2.OrcaLoadReport)
        arrived.append(time.monotonic())
        if len(arrived) == 3:
            break
    reports.cancel()
    gaps = [b - a for a, b in zip(arrived, arrived[1:])]
    assert all(0.8 < gap < 2.0 for gap in gaps), gaps


def spread(stub, request, seconds: float) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        counts[stub.SayHello(request, timeout=RPC_TIMEOUT).backend] += 1
    return counts


@pytest.mark.parametrize("out_of_band", [False, True], ids=["per-call", "out-of-band"])
def test_grpcio_weighted_round_robin_sends_less_to_the_slow_backend(
    start_busy_greeter, stubs, channels, out_of_band
):
    fast = [start_busy_greeter(f"fast-{i}", 200) for i in range(2)]
    slow = start_busy_greeter("slow", 3000)
    policy = {
        "blackoutPeriod": "0.5s",
        "weightUpdatePeriod": "0.1s",
        "enableOobLoadReport": out_of_band,
        "oobReportingPeriod": "1s",
    }
    config = {"loadBalancingConfig": [{"weighted_round_robin": policy}]}
    target = "ipv4:" + ",".join(g.addr for g in [*fast, slow])
    # grpcio would send the whole address list as :authority, which no
    # HTTP/2 server accepts.
    options = [("grpc.service_config", json.dumps(config)), ("grpc.default_authority", "greeter.default.svc")]
    channel = channels(target, options=options)
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channel)
    request = stubs.helloworld_pb2.HelloRequest(name="wrr")

    # With no weights yet every backend gets its turn: round-robin.
    first = spread(stub, request, 0.3)
    assert set(first) == {"fast-0", "fast-1", "slow"}, first
    # Once the reports are in (a window, then the blackout), the slow
    # backend's share falls well below a third, and no call fails.
    deadline = time.monotonic() + 10
    while True:
        counts = spread(stub, request, 1.0)
        share = counts["slow"] / sum(counts.values())
        if share < 0.15:
            break
        assert time.monotonic() < deadline, f"the slow backend kept {share:.0%}: {counts}"
    assert counts["fast-0"] > 0 and counts["fast-1"] > 0, counts


# --------------------------------------------------------------------------- policy from lb-server's xDS






def settles_below(spread_once, share: float, within: float) -> collections.Counter:
    """Repeats `spread_once()` (a Counter of calls per backend) until the slow
    backend's share is below `share`; fails after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        counts = spread_once()
        slow = counts["slow"] / max(1, sum(counts.values()))
        if slow < share:
            return counts
        assert time.monotonic() < deadline, f"the slow backend kept {slow:.0%}: {counts}"


@pytest.mark.parametrize("client", ["grpcio", "envoy"])
def test_weighted_round_robin_from_lb_server_xds_sends_less_to_the_slow_backend(
    start_busy_greeter, start_lb, stubs, channels, admin_for, processes, tmp_path, xds_clients, client
):
    """With `--xds-lb-policy weighted-round-robin` the Cluster carries
    client_side_weighted_round_robin: grpcio's weighted_round_robin and Envoy's
    each accept it (no NACK), read greeter-server's per-call reports and send
    the slow backend well under a third of the calls."""
    greeters = [start_busy_greeter(f"fast-{i}", 200) for i in range(2)] + [start_busy_greeter("slow", 3000)]
    lb = start_lb(
        services={GREETER: [{"address": g.addr, "pod": g.name} for g in greeters]},
        extra=["--xds-lb-policy", "weighted-round-robin"],
    )
    node_id = f"wrr-{client}"
    if client == "grpcio":
        stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
        xds = XdsClient(f"xds:///{GREETER}", grpc_bootstrap(lb.grpc_addr, node_id), stubs_dir)
        xds_clients.append(xds)

        def spread_once() -> collections.Counter:
            result = xds.calls(60)
            assert not result["errors"], result
            return collections.Counter(result["backends"])
    else:
        port = free_port()
        start_envoy(processes, tmp_path, envoy_bootstrap(lb.grpc_addr, port, GREETER, node_id), node_id)
        stub = stubs.helloworld_pb2_grpc.GreeterStub(channels(f"127.0.0.1:{port}"))
        request = stubs.helloworld_pb2.HelloRequest(name="wrr")

        def spread_once() -> collections.Counter:
            return spread(stub, request, 0.5)

    # Every backend gets calls at first (even weights until reports arrive).
    first = wait_until(lambda: (c := spread_once()) and len(c) == 3 and c, START_TIMEOUT, "calls to every backend")
    started = time.monotonic()
    counts = settles_below(spread_once, 0.15, within=15)
    print(f"{client}: the slow backend's share fell below 15% in {time.monotonic() - started:.1f} s: {dict(counts)}")
    assert counts["fast-0"] > 0 and counts["fast-1"] > 0, (first, counts)

    # The client accepted the Cluster: ACKed, never NACKed.
    admin = admin_for(lb)
    subscriber = next(
        s for s in admin.list_subscribers() if s.protocol == "xds" and s.xds.node_id == node_id
    )
    cluster = {t.type_url: t for t in subscriber.xds.resource_types}[CLUSTER_TYPE]
    assert cluster.nacks == 0 and cluster.last_acked_version == cluster.last_version_sent, cluster

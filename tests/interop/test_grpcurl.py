"""lb-server queried with the real grpcurl binary, as operators do (via server reflection)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from conftest import GRPCURL, Process, lb_server_command, wait_until, write_file_atomic, write_yaml

pytestmark = pytest.mark.timeout(60)

GREETER = "greeter.default:grpc"
SERVICES = {
    GREETER: [
        {"address": "127.0.0.1:50051", "zone": "zone-a", "weight": 2},
        {"address": "127.0.0.1:50052", "draining": True},
    ],
    "other.prod:8080": [{"address": "10.1.2.3:8080", "zone": "zone-b"}],
}

# grpcurl exits with 64 + the gRPC status code when an RPC fails.
INVALID_ARGUMENT = 64 + 3
NOT_FOUND = 64 + 5
DEADLINE_EXCEEDED = 64 + 4


def grpcurl(addr: str, *args: str, data: dict | None = None, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs grpcurl; its own flags go before the address, the verb/method after it."""
    command = [str(GRPCURL), "-plaintext", *flags]
    if data is not None:
        command += ["-d", json.dumps(data)]
    command += [addr, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=15)


def json_objects(text: str) -> list[dict]:
    """grpcurl prints one pretty JSON object per response message, back to back."""
    decoder = json.JSONDecoder()
    objects, index = [], 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return objects
        obj, index = decoder.raw_decode(text, index)
        objects.append(obj)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"grpcurl failed ({result.returncode}): {result.stderr}"
    return result.stdout


def get_service(addr: str, target: str) -> dict:
    return json.loads(ok(grpcurl(addr, "lookaside.v1.Admin/GetService", data={"target": target})))


def test_list_shows_every_service(start_lb):
    lb = start_lb(services=SERVICES)
    listed = ok(grpcurl(lb.grpc_addr, "list")).split()
    for service in [
        "lookaside.v1.Discovery",
        "lookaside.v1.Admin",
        "grpc.lb.v1.LoadBalancer",
        "grpc.health.v1.Health",
    ]:
        assert service in listed, listed


def test_describe_admin(start_lb):
    lb = start_lb(services=SERVICES)
    described = ok(grpcurl(lb.grpc_addr, "describe", "lookaside.v1.Admin"))
    assert "lookaside.v1.Admin is a service" in described
    for method in ["ListServices", "GetService", "ListSubscribers"]:
        assert f"rpc {method}" in described, described
    message = ok(grpcurl(lb.grpc_addr, "describe", "lookaside.v1.Endpoint"))
    for field in ["address", "port", "weight", "zone", "draining"]:
        assert field in message, message


def test_admin_shows_the_files_endpoints(start_lb):
    lb = start_lb(services=SERVICES)
    listed = json.loads(ok(grpcurl(lb.grpc_addr, "lookaside.v1.Admin/ListServices")))
    summaries = {s["target"]: s for s in listed["services"]}
    assert set(summaries) == {"greeter.default:grpc", "other.prod:8080"}, listed
    assert summaries["greeter.default:grpc"]["endpoints"] == 2
    assert summaries["greeter.default:grpc"]["draining"] == 1
    assert summaries["other.prod:8080"]["endpoints"] == 1

    service = get_service(lb.grpc_addr, GREETER)
    assert service["target"] == GREETER
    assert service["exists"] is True
    # proto3 JSON leaves out default values (false, "").
    assert service["endpoints"] == [
        {"address": "127.0.0.1", "port": 50051, "weight": 2, "zone": "zone-a"},
        {"address": "127.0.0.1", "port": 50052, "weight": 1, "draining": True},
    ]
    # Every accepted target form names the same service.
    for alias in [
        "dns:///greeter.default:grpc",
        "greeter.default.svc.cluster.local:grpc",
        "dns:///greeter.default.svc.cluster.local:grpc",
    ]:
        assert get_service(lb.grpc_addr, alias)["endpoints"] == service["endpoints"], alias
    other = get_service(lb.grpc_addr, "other.prod:8080")
    assert other["endpoints"] == [{"address": "10.1.2.3", "port": 8080, "weight": 1, "zone": "zone-b"}]


def test_admin_pages_what_grpcurl_could_not_receive_whole(start_lb):
    """A service whose endpoint list is larger than gRPC's default 4 MiB
    receive limit (grpcurl's too) is listed in pages that each fit it."""
    total = 24_000
    pod = "p" * 200  # long pod names, as StatefulSets with long names have
    endpoints = [
        {"address": f"10.{i // 60_000}.{i // 250 % 240}.{i % 250 + 1}:8080", "pod": f"{pod}-{i}"}
        for i in range(total)
    ]
    lb = start_lb(services={"big.default:grpc": endpoints, GREETER: SERVICES[GREETER]})
    seen, offset, pages = [], 0, 0
    while True:
        page = get_service(lb.grpc_addr, "big.default:grpc") if offset == 0 else json.loads(
            ok(grpcurl(lb.grpc_addr, "lookaside.v1.Admin/GetService", data={"target": "big.default:grpc", "offset": offset}))
        )
        pages += 1
        assert page["totalEndpoints"] == total
        seen += [e["pod"] for e in page["endpoints"]]
        offset = page.get("nextOffset", 0)
        if offset == 0:
            break
        assert offset == len(seen)
    assert pages == 2, pages  # about 5.5 MB in all: two pages of at most 4 MiB
    assert sorted(seen) == sorted(e["pod"] for e in endpoints)
    # A limit pages by count; the last page has no nextOffset.
    limited = json.loads(
        ok(grpcurl(lb.grpc_addr, "lookaside.v1.Admin/GetService", data={"target": "big.default:grpc", "offset": total - 3, "limit": 5}))
    )
    assert len(limited["endpoints"]) == 3 and "nextOffset" not in limited, limited
    first = json.loads(ok(grpcurl(lb.grpc_addr, "lookaside.v1.Admin/ListServices", data={"limit": 1})))
    assert first["total"] == 2 and first["nextOffset"] == 1, first
    assert [s["target"] for s in first["services"]] == ["big.default:grpc"]


def test_health_check_serving(start_lb):
    lb = start_lb(services=SERVICES)
    reply = json.loads(ok(grpcurl(lb.grpc_addr, "grpc.health.v1.Health/Check")))
    assert reply == {"status": "SERVING"}


@pytest.mark.parametrize(
    "target, reason",
    [
        ("greeter", "missing port"),
        ("", "empty target"),
        ("greeter.default:", "bad port"),
        ("greeter.default:99999", "bad port"),
        ("greeter:grpc", "bad host"),
        ("a.b.c:grpc", "bad host"),
        ("http://greeter.default:grpc", "unsupported scheme"),
        ("Greeter.default:grpc", "bad service name"),
    ],
)
def test_malformed_target_is_invalid_argument(start_lb, target, reason):
    lb = start_lb(services=SERVICES)
    result = grpcurl(lb.grpc_addr, "lookaside.v1.Admin/GetService", data={"target": target})
    assert result.returncode == INVALID_ARGUMENT, (result.returncode, result.stderr)
    assert "Code: InvalidArgument" in result.stderr
    assert reason in result.stderr, result.stderr


def test_unknown_service_is_not_found(start_lb):
    lb = start_lb(services=SERVICES)
    result = grpcurl(lb.grpc_addr, "lookaside.v1.Admin/GetService", data={"target": "nope.default:grpc"})
    assert result.returncode == NOT_FOUND, (result.returncode, result.stderr)
    assert "Code: NotFound" in result.stderr
    assert "nope.default:grpc" in result.stderr


def test_oversized_target_is_invalid_argument(start_lb):
    lb = start_lb(services=SERVICES)
    target = "a" * 290 + ".default:grpc"
    assert len(target) > 300
    for method in ["lookaside.v1.Admin/GetService", "lookaside.v1.Discovery/Watch"]:
        result = grpcurl(lb.grpc_addr, method, data={"target": target}, flags=("-max-time", "5"))
        assert result.returncode == INVALID_ARGUMENT, (method, result.returncode, result.stderr)
        assert "Code: InvalidArgument" in result.stderr
        assert f"{len(target)} bytes" in result.stderr, result.stderr


def test_watch_returns_the_snapshot(start_lb):
    lb = start_lb(services=SERVICES)
    result = grpcurl(
        lb.grpc_addr, "lookaside.v1.Discovery/Watch", data={"target": f"dns:///{GREETER}"}, flags=("-max-time", "1")
    )
    # The stream stays open, so grpcurl ends it at -max-time; the snapshot came first.
    assert result.returncode == DEADLINE_EXCEEDED, (result.returncode, result.stderr)
    responses = json_objects(result.stdout)
    assert len(responses) == 1, result.stdout
    snapshot = responses[0]
    assert snapshot["target"] == GREETER
    assert snapshot["exists"] is True
    assert int(snapshot["version"]) >= 1
    assert [(e["port"], e.get("draining", False)) for e in snapshot["endpoints"]] == [(50051, False), (50052, True)]


def test_watch_of_an_unknown_service_says_it_does_not_exist(start_lb):
    lb = start_lb(services=SERVICES)
    result = grpcurl(
        lb.grpc_addr, "lookaside.v1.Discovery/Watch", data={"target": "nope.default:80"}, flags=("-max-time", "1")
    )
    assert result.returncode == DEADLINE_EXCEEDED, (result.returncode, result.stderr)
    [snapshot] = json_objects(result.stdout)
    assert snapshot.get("exists", False) is False
    assert snapshot.get("endpoints", []) == []
    assert snapshot["target"] == "nope.default:80"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("services: [\n", "cannot parse"),
        ("services:\n  greeter.default:grpc:\n    - address: 127.0.0.1\n", "not IP:PORT"),
        ("services:\n  nope:\n    - address: 127.0.0.1:1\n", 'service "nope"'),
        (None, "cannot read"),
    ],
)
def test_broken_file_at_start_exits_with_the_reason(processes, tmp_path, text, reason):
    path = tmp_path / "lb.yaml"
    if text is not None:
        write_file_atomic(path, text)
    process = Process(
        lb_server_command(path),
        name="lb-server-broken",
    )
    processes.append(process)
    code = process.wait_exit(timeout=15)
    assert code != 0, process.output
    errors = [line for line in process.output.splitlines() if line.startswith("lb-server: error:")]
    assert errors, process.output
    assert reason in errors[0], errors[0]
    assert str(path) in errors[0], errors[0]
    assert "listening" not in process.output


def test_broken_file_later_keeps_the_last_good_state(start_lb):
    lb = start_lb(services=SERVICES)
    good = get_service(lb.grpc_addr, GREETER)
    errors_before = lb.metric("lookaside_file_reloads_total", {"result": "error"})

    write_file_atomic(lb.file, "services:\n  greeter.default:grpc: [\n")
    wait_until(
        lambda: lb.metric("lookaside_file_reloads_total", {"result": "error"}) > errors_before,
        10,
        "the reload error counter to rise",
    )
    # It is logged as a warning (or error) that names the file.
    lb.process.wait_for_line(rf"(WARN|ERROR).*{re.escape(str(lb.file))}", timeout=5)
    still = get_service(lb.grpc_addr, GREETER)
    assert still["version"] == good["version"]
    assert still["endpoints"] == good["endpoints"]
    assert lb.http_get("/readyz")[0] == 200

    ok_before = lb.metric("lookaside_file_reloads_total", {"result": "ok"})
    write_yaml(lb.file, {GREETER: [{"address": "127.0.0.1:50053", "zone": "zone-c"}]})
    fixed = wait_until(
        lambda: (s := get_service(lb.grpc_addr, GREETER))["version"] != good["version"] and s,
        10,
        "the fixed file to be picked up",
    )
    assert int(fixed["version"]) > int(good["version"])
    assert fixed["endpoints"] == [{"address": "127.0.0.1", "port": 50053, "weight": 1, "zone": "zone-c"}]
    assert lb.metric("lookaside_file_reloads_total", {"result": "ok"}) > ok_before
    # The service the fixed file no longer lists is gone.
    result = grpcurl(lb.grpc_addr, "lookaside.v1.Admin/GetService", data={"target": "other.prod:8080"})
    gone = result.returncode == NOT_FOUND or '"exists": true' not in result.stdout
    assert gone, (result.returncode, result.stdout, result.stderr)

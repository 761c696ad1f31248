"""Clients that misbehave: bad grpclb requests, and a Discovery watcher that never reads."""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time

import grpc
import pytest

from conftest import wait_until, write_yaml

pytestmark = pytest.mark.timeout(60)

SERVICE = "greeter.default:grpc"


@pytest.fixture
def lb(start_lb):
    return start_lb(
        services={
            SERVICE: [
                {"address": "127.0.0.1:50051", "weight": 2},
                {"address": "127.0.0.1:50052"},
                {"address": "127.0.0.1:50053", "draining": True},
            ]
        }
    )


def name_of(length: int) -> str:
    suffix = ".default:grpc"
    return "a" * (length - len(suffix)) + suffix


@pytest.mark.parametrize("length", [256, 300, 4096])
def test_grpclb_name_of_256_bytes_or_more_is_invalid_argument(lb, balance_load, length):
    name = name_of(length)
    assert len(name.encode()) == length
    error = balance_load(lb).initial(name).error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"{length} bytes" in error.details(), error.details()
    assert lb.metric("lookaside_rejected_requests_total", {"api": "grpclb", "reason": "too_long"}) >= 1


def test_grpclb_first_message_must_be_initial_request(lb, balance_load, stubs):
    pb = stubs.lb_pb2
    stream = balance_load(lb)
    stream.send(pb.LoadBalanceRequest(client_stats=pb.ClientStats(num_calls_started=1)))
    error = stream.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "initial_request" in error.details(), error.details()

    # An empty message (no oneof set) and a stream closed before any message are refused too.
    stream = balance_load(lb)
    stream.send(pb.LoadBalanceRequest())
    assert stream.error().code() == grpc.StatusCode.INVALID_ARGUMENT

    stream = balance_load(lb)
    stream.close_send()
    assert stream.error().code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name, reason", [("greeter", "missing port"), ("", "empty target"), ("a.b.c:1", "bad host")])
def test_grpclb_malformed_name_is_invalid_argument(lb, balance_load, name, reason):
    error = balance_load(lb).initial(name).error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert reason in error.details(), error.details()


# --------------------------------------------------------------------------- a watcher that never reads


def h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def hpack_literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman coding."""

    def string(text: str) -> bytes:
        data = text.encode()
        assert len(data) < 127
        return bytes([len(data)]) + data

    return b"\x00" + string(name) + string(value)


def open_stalled_watch(addr: str, request: bytes, window: int) -> socket.socket:
    """Opens Discovery/Watch over a hand-made HTTP/2 connection that never reads a byte.

    The client's stream window is `window` bytes and is never replenished, and
    the socket's receive buffer is small, so the server's writes soon block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = addr.rsplit(":", 1)
    sock.connect((host, int(port)))
    settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, window)  # ENABLE_PUSH=0, INITIAL_WINDOW_SIZE
    headers = b"".join(
        hpack_literal(name, value)
        for name, value in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/lookaside.v1.Discovery/Watch"),
            (":authority", addr),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )
    message = b"\x00" + len(request).to_bytes(4, "big") + request
    sock.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + h2_frame(0x4, 0, 0, settings)
        + h2_frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + h2_frame(0x0, 0x1, 1, message)  # DATA, END_STREAM
    )
    return sock


def many_endpoints(marker: int) -> dict:
    """About 2 KB per Watch response; `marker` is the port of the one 127.0.0.1 endpoint."""
    endpoints = [{"address": f"127.0.0.1:{marker}", "zone": "zone-" + "x" * 40}]
    endpoints += [{"address": f"10.0.{i // 250}.{i % 250 + 1}:8080", "zone": "zone-" + "y" * 40} for i in range(30)]
    return {SERVICE: endpoints}


def marker_of(response) -> int:
    [port] = [e.port for e in response.endpoints if e.address == "127.0.0.1"]
    return port


@pytest.mark.timeout(45)
def test_a_watcher_that_never_reads_does_not_hold_up_others(start_lb, stubs, channels, admin_for):
    lb = start_lb(services=many_endpoints(20000))
    pb = stubs.lookaside_pb2
    admin = admin_for(lb)
    request = pb.WatchRequest(target=SERVICE)

    stalled = open_stalled_watch(lb.grpc_addr, request.SerializeToString(), window=1024)
    stalled_peer = "{}:{}".format(*stalled.getsockname())
    try:
        # A healthy watcher reads every response on a thread.
        responses: queue.Queue = queue.Queue()
        watch = stubs.lookaside_pb2_grpc.DiscoveryStub(channels(lb.grpc_addr)).Watch(request, timeout=40)

        def read():
            try:
                for response in watch:
                    responses.put((time.monotonic(), response))
            except grpc.RpcError as error:
                responses.put((time.monotonic(), error))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def next_response(timeout: float):
            at, response = responses.get(timeout=timeout)
            assert not isinstance(response, grpc.RpcError), response
            return at, response

        _, initial = next_response(5)
        assert marker_of(initial) == 20000
        wait_until(
            lambda: any(s.peer == stalled_peer for s in admin.list_subscribers()),
            5,
            "the stalled watcher to be registered",
        )

        versions = [initial.version]
        delays = []
        for change in range(1, 31):
            marker = 20000 + change
            written = time.monotonic()
            write_yaml(lb.file, many_endpoints(marker))
            # Every change reaches the healthy watcher, promptly and in order.
            at, response = next_response(3)
            assert marker_of(response) == marker, (change, response)
            assert response.version > versions[-1]
            versions.append(response.version)
            delays.append(at - written)
            # Admin still answers, with the same state.
            assert admin.get_service(SERVICE).version == response.version

        assert max(delays) < 2.0, delays
        print(f"healthy watcher: {len(delays)} changes, max delay {max(delays) * 1000:.0f} ms")

        subscribers = {s.peer: s for s in admin.list_subscribers() if s.protocol == "discovery"}
        assert stalled_peer in subscribers, subscribers
        stalled_version = subscribers[stalled_peer].last_version_sent
        # The stalled stream is held back by flow control; it is not fed every version.
        assert stalled_version < versions[-1], (stalled_version, versions[-1])
        assert lb.http_get("/readyz")[0] == 200
    finally:
        stalled.close()

    # Once the stalled client goes away, its stream is dropped.
    wait_until(
        lambda: all(s.peer != stalled_peer for s in admin.list_subscribers()),
        10,
        "the closed stalled watcher to be unregistered",
        interval=0.05,
    )
    watch.cancel()

"""Shared harness for the interop tests against real peers (grpcurl, grpcio).

Processes (lb-server, greeter-server) start on ports the OS picks; each one's
stderr is read by a thread, so pipes never fill, and readiness is the log line
announcing the bound ports. Every process is stopped by its own handle in the
fixture teardown (SIGTERM, bounded wait, SIGKILL).

Python stubs are generated with grpc_tools.protoc at session start into a
temporary directory. grpc/lb/v1/load_balancer.proto is copied to
`grpclb_v1/` first: a generated `grpc.lb.v1` package would be shadowed by the
real `grpc` package.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "proto"
GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"

# Bounds for every wait in the suite.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
RPC_TIMEOUT = 5.0


def target_dir() -> Path:
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        path = Path(env)
        return path if path.is_absolute() else ROOT / path
    return ROOT / "target"


def binary(name: str) -> Path:
    # scripts/test.sh builds everything once, in the release profile, and says so here.
    profile = os.environ.get("LOOKASIDE_PROFILE", "debug")
    path = target_dir() / profile / name
    if not path.is_file():
        flag = " --release" if profile == "release" else ""
        pytest.fail(f"{path} is missing: run `cargo build{flag} --workspace --bins` first")
    return path


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Polls `predicate` until it returns something truthy (returned) or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - reported if we time out
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- processes


class Process:
    """A child process whose stderr lines are collected by a reader thread."""

    def __init__(self, args: list[str], name: str):
        self.name = name
        self.args = [str(a) for a in args]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, name=f"stderr-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT, start: int = 0) -> re.Match:
        """Waits for a stderr line matching `pattern` (from line index `start`)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    index += 1
                    if match:
                        return match
                if self._eof:
                    raise AssertionError(
                        f"{self.name} exited (code {self.proc.poll()}) before logging {pattern!r}:\n"
                        + "\n".join(self.lines)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name} did not log {pattern!r} within {timeout}s:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(remaining)

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(STOP_TIMEOUT)
        return code

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL; never leaves the process behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class LbServer:
    process: Process
    grpc_addr: str
    metrics_addr: str
    file: Path

    def http_get(self, path: str, timeout: float = RPC_TIMEOUT) -> tuple[int, str]:
        url = f"http://{self.metrics_addr}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample from /metrics, 0 if absent."""
        _, text = self.http_get("/metrics")
        want = labels or {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
            if not match or match.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            if all(have.get(k) == v for k, v in want.items()):
                return float(match.group(3))
        return 0.0


@dataclass
class Greeter:
    process: Process
    addr: str
    name: str

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])


@pytest.fixture
def processes():
    """Every process a test starts; all are stopped at teardown, each by its own handle."""
    started: list[Process] = []
    yield started
    errors = []
    for process in reversed(started):
        try:
            process.stop()
        except Exception as error:  # noqa: BLE001 - stop the rest, then report
            errors.append(f"{process.name}: {error!r}")
    assert not errors, errors


def lb_server_command(file: Path, *extra) -> list:
    """lb-server on the YAML `file`, its gRPC and metrics ports picked by the OS."""
    return [
        binary("lb-server"),
        "--source", "file",
        "--file", file,
        "--listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0",
        *extra,
    ]


@pytest.fixture
def xds_clients():
    """Proxyless xDS clients (`xds_helpers.XdsClient`) a test starts: each stopped at teardown."""
    started: list = []
    yield started
    for client in started:
        client.stop()


@pytest.fixture
def start_lb(processes, tmp_path) -> Callable[..., LbServer]:
    """Starts lb-server on a YAML file; returns once it listens and /readyz is 200."""

    def start(file: Path | None = None, services: dict | None = None, extra: Iterable[str] = ()) -> LbServer:
        path = file or tmp_path / "lb.yaml"
        if services is not None:
            write_yaml(path, services)
        process = Process(
            lb_server_command(path, "--file-poll-interval", "50ms", *extra),
            name="lb-server",
        )
        processes.append(process)
        match = process.wait_for_line(r"lb-server listening grpc=(\S+) metrics=(\S+)")
        lb = LbServer(process, match.group(1), match.group(2), path)
        wait_until(lambda: lb.http_get("/readyz", timeout=1)[0] == 200, START_TIMEOUT, "lb-server /readyz")
        return lb

    return start


@pytest.fixture
def start_greeter(processes) -> Callable[[str], Greeter]:
    """Starts greeter-server NAME; returns once it logs its address."""

    def start(name: str) -> Greeter:
        process = Process(
            [binary("greeter-server"), "--listen", "127.0.0.1:0", "--name", name],
            name=f"greeter-{name}",
        )
        processes.append(process)
        match = process.wait_for_line(r"greeter-server listening addr=(\S+)")
        return Greeter(process, match.group(1), name)

    return start


# --------------------------------------------------------------------------- YAML file


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML scalar


def render_yaml(services: dict) -> str:
    """services: {key: [{"address": ..., "zone": ..., "weight": ..., "draining": ...}, ...]}.

    An endpoint may also be given as a plain "IP:PORT" string."""
    lines = ["services:"]
    for key, endpoints in services.items():
        lines.append(f"  {_yaml_scalar(key)}:")
        for endpoint in endpoints or []:
            if isinstance(endpoint, str):
                endpoint = {"address": endpoint}
            first = True
            for field, value in endpoint.items():
                prefix = "    - " if first else "      "
                lines.append(f"{prefix}{field}: {_yaml_scalar(value)}")
                first = False
    return "\n".join(lines) + "\n"


def write_file_atomic(path: Path, text: str) -> None:
    """Writes a temporary file next to `path`, then renames it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_yaml(path: Path, services: dict) -> None:
    write_file_atomic(path, render_yaml(services))


# --------------------------------------------------------------------------- stubs


@dataclass
class Stubs:
    helloworld_pb2: object
    helloworld_pb2_grpc: object
    lookaside_pb2: object
    lookaside_pb2_grpc: object
    lb_pb2: object
    lb_pb2_grpc: object


@pytest.fixture(scope="session")
def stubs(tmp_path_factory) -> Stubs:
    """Generates Python stubs for helloworld, lookaside.v1 and grpc.lb.v1."""
    from grpc_tools import protoc

    src = tmp_path_factory.mktemp("proto-src")
    out = tmp_path_factory.mktemp("proto-gen")
    shutil.copytree(PROTO_DIR / "helloworld", src / "helloworld")
    shutil.copytree(PROTO_DIR / "lookaside", src / "lookaside")
    (src / "grpclb_v1").mkdir()
    shutil.copy(PROTO_DIR / "grpc" / "lb" / "v1" / "load_balancer.proto", src / "grpclb_v1")
    well_known = Path(protoc.__file__).parent / "_proto"
    files = [
        "helloworld/helloworld.proto",
        "lookaside/v1/lookaside.proto",
        "grpclb_v1/load_balancer.proto",
    ]
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    )
    assert code == 0, f"protoc failed with {code}"
    sys.path.insert(0, str(out))
    try:
        return Stubs(
            helloworld_pb2=importlib.import_module("helloworld.helloworld_pb2"),
            helloworld_pb2_grpc=importlib.import_module("helloworld.helloworld_pb2_grpc"),
            lookaside_pb2=importlib.import_module("lookaside.v1.lookaside_pb2"),
            lookaside_pb2_grpc=importlib.import_module("lookaside.v1.lookaside_pb2_grpc"),
            lb_pb2=importlib.import_module("grpclb_v1.load_balancer_pb2"),
            lb_pb2_grpc=importlib.import_module("grpclb_v1.load_balancer_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))


@pytest.fixture
def channels(processes):
    """grpc channels a test opens; all are closed at teardown, before the processes stop."""
    opened: list[grpc.Channel] = []

    def open_channel(target: str, options=None) -> grpc.Channel:
        channel = grpc.insecure_channel(target, options=options or [])
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()


class Admin:
    """lookaside.v1.Admin over a grpcio channel."""

    def __init__(self, stubs: Stubs, channel: grpc.Channel):
        self.pb = stubs.lookaside_pb2
        self.stub = stubs.lookaside_pb2_grpc.AdminStub(channel)

    def get_service(self, target: str):
        return self.stub.GetService(self.pb.GetServiceRequest(target=target), timeout=RPC_TIMEOUT)

    def list_services(self):
        return self.stub.ListServices(self.pb.ListServicesRequest(), timeout=RPC_TIMEOUT)

    def list_subscribers(self):
        return self.stub.ListSubscribers(self.pb.ListSubscribersRequest(), timeout=RPC_TIMEOUT).subscribers


@pytest.fixture
def admin_for(stubs, channels) -> Callable[[LbServer], Admin]:
    return lambda lb: Admin(stubs, channels(lb.grpc_addr))


class BalanceLoad:
    """A raw grpc.lb.v1.LoadBalancer/BalanceLoad stream: send requests, read responses."""

    def __init__(self, stubs, channel: grpc.Channel):
        self.pb = stubs.lb_pb2
        self._requests: queue.Queue = queue.Queue()
        stub = stubs.lb_pb2_grpc.LoadBalancerStub(channel)
        self.call = stub.BalanceLoad(iter(self._requests.get, None), timeout=10)

    def initial(self, name: str) -> "BalanceLoad":
        self.send(self.pb.LoadBalanceRequest(initial_request=self.pb.InitialLoadBalanceRequest(name=name)))
        return self

    def send(self, request) -> None:
        self._requests.put(request)

    def close_send(self) -> None:
        self._requests.put(None)

    def next(self):
        return next(self.call)

    def error(self) -> grpc.RpcError:
        """Reads until the stream fails; returns the error."""
        with pytest.raises(grpc.RpcError) as failed:
            for _ in range(10):
                self.next()
        return failed.value

    def end(self) -> None:
        self.close_send()
        self.call.cancel()


@pytest.fixture
def balance_load(stubs, channels):
    opened: list[BalanceLoad] = []

    def open_stream(lb) -> BalanceLoad:
        stream = BalanceLoad(stubs, channels(lb.grpc_addr))
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.end()

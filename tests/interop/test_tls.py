"""lb-server's gRPC port over TLS and mutual TLS, against real peers: grpcurl,
grpcio as a grpclb client and as a proxyless xDS client, and Envoy's ADS.

Certificates come from `trustme` (a throwaway CA per test). lb-server's
certificate names `lb.test`, `localhost` and 127.0.0.1; the backends'
names `greeter.default`, the host grpcio verifies them against.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from collections import Counter
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from conftest import GRPCURL, wait_until, write_yaml
from test_grpclb import GRPCLB_CONFIG, LoopbackDns, call
from test_xds import GREETER, start_envoy  # noqa: F401 - start_envoy is a fixture
from xds_helpers import XdsClient, envoy_bootstrap, free_port

pytestmark = pytest.mark.timeout(90)

SERVICES = {"greeter.default:grpc": [{"address": "10.1.2.3:50051"}]}


@dataclass
class Pair:
    cert: Path
    key: Path


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    server: Pair
    client: Pair
    dir: Path

    def issue(self, name: str, *hosts: str, ca: trustme.CA | None = None) -> Pair:
        cert = (ca or self.ca).issue_cert(*hosts)
        chain = self.dir / f"{name}.crt"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        key = self.dir / f"{name}.key"
        cert.private_key_pem.write_to_path(str(key))
        return Pair(chain, key)

    def lb_flags(self, mutual: bool = True) -> list[str]:
        flags = ["--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key)]
        return flags + (["--tls-client-ca", str(self.ca_file)] if mutual else [])


@pytest.fixture
def pki(tmp_path) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    pki = Pki(ca, ca_file, None, None, tmp_path)  # type: ignore[arg-type]
    pki.server = pki.issue("server", "lb.test", "localhost", "127.0.0.1")
    pki.client = pki.issue("client", "client.test")
    return pki


def grpcurl_tls(addr: str, *args: str, flags: list[str], data: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(GRPCURL), *flags]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, addr, *args], capture_output=True, text=True, timeout=15)


def test_grpcurl_over_mtls_and_who_is_refused(start_lb, pki):
    lb = start_lb(services=SERVICES, extra=pki.lb_flags())
    good = ["-cacert", str(pki.ca_file), "-cert", str(pki.client.cert), "-key", str(pki.client.key)]
    good += ["-servername", "lb.test"]

    listed = grpcurl_tls(lb.grpc_addr, "list", flags=good)
    assert listed.returncode == 0, listed.stderr
    for service in ["lookaside.v1.Discovery", "lookaside.v1.Admin", "grpc.health.v1.Health"]:
        assert service in listed.stdout.split(), listed.stdout
    services = grpcurl_tls(lb.grpc_addr, "lookaside.v1.Admin/ListServices", flags=good)
    assert services.returncode == 0 and "greeter.default:grpc" in services.stdout, services
    watch = grpcurl_tls(
        lb.grpc_addr,
        "lookaside.v1.Discovery/Watch",
        flags=[*good, "-max-time", "1"],
        data={"target": "greeter.default:grpc"},
    )
    # The stream stays open until -max-time; the snapshot came first.
    assert '"address": "10.1.2.3"' in watch.stdout, (watch.returncode, watch.stderr)

    other_ca = trustme.CA()
    stranger = pki.issue("stranger", "client.test", ca=other_ca)
    for name, flags in [
        ("no client certificate", ["-cacert", str(pki.ca_file), "-servername", "lb.test"]),
        (
            "a client certificate from another CA",
            ["-cacert", str(pki.ca_file), "-cert", str(stranger.cert), "-key", str(stranger.key)]
            + ["-servername", "lb.test"],
        ),
        ("plaintext", ["-plaintext"]),
    ]:
        refused = grpcurl_tls(lb.grpc_addr, "list", flags=[*flags, "-connect-timeout", "3"])
        assert refused.returncode != 0, f"{name}: {refused.stdout}"
        # Everyone else is still served.
        assert grpcurl_tls(lb.grpc_addr, "list", flags=good).returncode == 0, name
    assert lb.metric("lookaside_rejected_connections_total", {"reason": "tls_handshake"}) >= 2


def test_grpcurl_verifies_the_server_name(start_lb, pki):
    lb = start_lb(services=SERVICES, extra=pki.lb_flags(mutual=False))
    base = ["-cacert", str(pki.ca_file)]
    assert grpcurl_tls(lb.grpc_addr, "list", flags=[*base, "-servername", "lb.test"]).returncode == 0
    wrong = grpcurl_tls(lb.grpc_addr, "list", flags=[*base, "-servername", "other.test"])
    assert wrong.returncode != 0 and "certificate" in wrong.stderr, wrong.stderr


# --------------------------------------------------------------------------- grpclb over TLS


def start_tls_greeter(stubs, name: str, pair: Pair, ca_file: Path) -> tuple[grpc.Server, int]:
    """A Python gRPC Greeter serving mTLS: replies name the backend."""

    class Greeter(stubs.helloworld_pb2_grpc.GreeterServicer):
        def SayHello(self, request, context):
            return stubs.helloworld_pb2.HelloReply(message=f"hello {request.name}", backend=name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    stubs.helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    credentials = grpc.ssl_server_credentials(
        [(pair.key.read_bytes(), pair.cert.read_bytes())],
        root_certificates=ca_file.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def client_credentials(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),
        private_key=pki.client.key.read_bytes(),
        certificate_chain=pki.client.cert.read_bytes(),
    )


@pytest.fixture
def tls_backends(stubs, pki):
    pair = pki.issue("greeter", "greeter.default")
    servers = [start_tls_greeter(stubs, name, pair, pki.ca_file) for name in ("t1", "t2")]
    yield servers
    for server, _ in servers:
        server.stop(None)


def test_grpcio_grpclb_over_mtls_to_the_balancer_and_the_backends(stubs, start_lb, pki, tls_backends):
    service = "greeter.default:8080"
    lb = start_lb(
        services={service: [f"127.0.0.1:{port}" for _, port in tls_backends]},
        extra=pki.lb_flags(),
    )
    dns = LoopbackDns()
    try:
        dns.balancer("greeter.default", int(lb.grpc_addr.rsplit(":", 1)[1]))
        dns.host("greeter.default", "127.0.0.1")
        channel = grpc.secure_channel(
            f"dns://127.0.0.1:{dns.port}/{service}",
            client_credentials(pki),
            options=[("grpc.dns_enable_srv_queries", 1), ("grpc.service_config", GRPCLB_CONFIG)],
        )
        try:
            greeter = stubs.helloworld_pb2_grpc.GreeterStub(channel)
            seen: Counter = Counter()
            wait_until(lambda: seen.update(call(stubs, greeter, 4)) or set(seen) == {"t1", "t2"}, 15, "both TLS backends")
            served = call(stubs, greeter, 40)
            assert served == Counter({"t1": 20, "t2": 20}), served
        finally:
            channel.close()
    finally:
        dns.stop()
    assert lb.metric("lookaside_subscribers", {"protocol": "grpclb"}) <= 1


# --------------------------------------------------------------------------- xDS over TLS


def grpc_ads_over_mtls(lb, pki: Pki, node_id: str) -> dict:
    """A gRPC xDS bootstrap for lb-server over mTLS: `tls` channel credentials
    (gRFC A65), files gRPC watches, so a rotation is picked up as lb-server's is.
    The server's certificate must name the host of `server_uri`."""
    port = lb.grpc_addr.rsplit(":", 1)[1]
    return {
        "xds_servers": [
            {
                "server_uri": f"localhost:{port}",
                "channel_creds": [
                    {
                        "type": "tls",
                        "config": {
                            "ca_certificate_file": str(pki.ca_file),
                            "certificate_file": str(pki.client.cert),
                            "private_key_file": str(pki.client.key),
                        },
                    }
                ],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": node_id, "locality": {"zone": "interop"}},
    }


def test_proxyless_grpc_reaches_ads_over_mtls(start_lb, start_greeter, stubs, pki):
    a, b = start_greeter("a"), start_greeter("b")
    lb = start_lb(services={GREETER: [{"address": a.addr}, {"address": b.addr}]}, extra=pki.lb_flags())
    bootstrap = json.dumps(grpc_ads_over_mtls(lb, pki, "grpc-tls"))
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", bootstrap, stubs_dir)
    try:
        wait_until(
            lambda: (r := client.calls(10)) and set(r["backends"]) == {"a", "b"} and not r["errors"],
            20,
            "proxyless calls over a and b through ADS over mTLS",
        )
    finally:
        client.stop()


SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def sds_file(path: Path, secret: dict) -> None:
    """An SDS file Envoy reads by path: one `Secret` (name plus `tls_certificate`
    or `validation_context`)."""
    path.write_text(json.dumps({"resources": [{"@type": SECRET_TYPE, **secret}]}))


def sds_ref(sds_dir: Path, name: str) -> dict:
    """An SdsSecretConfig that reads `name` from `sds_dir/name.json`; Envoy
    re-reads it when its directory changes, as it takes rotating files."""
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": str(sds_dir / f"{name}.json"), "watched_directory": {"path": str(sds_dir)}},
            "resource_api_version": "V3",
        },
    }


def envoy_ads_over_mtls(bootstrap: dict, pki: Pki) -> dict:
    """Makes the `lookaside` (ADS) cluster of an Envoy bootstrap call lb-server
    over mTLS, its certificate and CA by SDS from files; returns the bootstrap."""
    (ads_cluster,) = bootstrap["static_resources"]["clusters"]
    sds_dir = pki.dir / "ads-sds"
    sds_dir.mkdir()
    sds_file(sds_dir / "client.json", {
        "name": "client",
        "tls_certificate": {
            "certificate_chain": {"filename": str(pki.client.cert)},
            "private_key": {"filename": str(pki.client.key)},
        },
    })
    sds_file(sds_dir / "ca.json", {"name": "ca", "validation_context": {"trusted_ca": {"filename": str(pki.ca_file)}}})
    ads_cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "lb.test",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [sds_ref(sds_dir, "client")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "lb.test"}}]
                    },
                    "validation_context_sds_secret_config": sds_ref(sds_dir, "ca"),
                },
            },
        },
    }
    return bootstrap


def test_envoy_reaches_ads_over_mtls(start_lb, start_greeter, start_envoy, stubs, pki):
    a = start_greeter("a")
    lb = start_lb(services={GREETER: [{"address": a.addr}]}, extra=pki.lb_flags())
    port = free_port()
    bootstrap = envoy_ads_over_mtls(envoy_bootstrap(lb.grpc_addr, port, GREETER, "envoy-tls"), pki)
    envoy = start_envoy(lb.grpc_addr, node_id="envoy-tls", config_text=json.dumps(bootstrap), port=port)
    channel = grpc.insecure_channel(f"127.0.0.1:{envoy.port}")
    try:
        stub = stubs.helloworld_pb2_grpc.GreeterStub(channel)
        request = stubs.helloworld_pb2.HelloRequest(name="envoy")

        def served():
            try:
                return stub.SayHello(request, timeout=1).backend == "a"
            except grpc.RpcError:
                return False

        wait_until(served, 20, "a call through Envoy configured over mTLS ADS")
    finally:
        channel.close()


# --------------------------------------------------------------------------- greeter over mTLS


def test_greeter_client_calls_tls_greeters_direct_and_through_lb_server(processes, start_lb, pki):
    from conftest import Process, binary

    backend = pki.issue("greeter", "greeter.default.svc", "localhost")
    greeters = []
    for name in ("g1", "g2"):
        process = Process(
            [
                binary("greeter-server"), "--listen", "127.0.0.1:0", "--name", name,
                "--tls-cert", backend.cert, "--tls-key", backend.key, "--tls-client-ca", pki.ca_file,
            ],
            name=f"greeter-{name}",
        )
        processes.append(process)
        greeters.append(process.wait_for_line(r"greeter-server listening addr=(\S+)").group(1))
    lb = start_lb(services={"greeter.default:grpc": greeters}, extra=pki.lb_flags())
    tls = ["--tls-ca", str(pki.ca_file), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]

    def client(*args: str) -> dict:
        result = subprocess.run(
            [str(binary("greeter-client")), "--calls", "40", "--concurrency", "4", "--json", *args],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    direct = client("--direct", greeters[0], *tls, "--tls-server-name", "greeter.default.svc")
    assert direct["ok"] == 40, direct
    through_lb = client("--lb", f"https://localhost:{lb.grpc_addr.rsplit(':', 1)[1]}", *tls)
    assert through_lb["ok"] == 40, through_lb
    # DNS mode verifies the name it resolved (`localhost`, which the certificate carries).
    by_dns = client("--dns", f"localhost:{greeters[1].rsplit(':', 1)[1]}", *tls)
    assert by_dns["ok"] == 40 and by_dns["backends"] == {"g2": 40}, by_dns
    # Without a client certificate the greeters refuse the handshake.
    refused = subprocess.run(
        [str(binary("greeter-client")), "--calls", "1", "--direct", greeters[0], "--tls-ca", str(pki.ca_file),
         "--tls-server-name", "greeter.default.svc"],
        capture_output=True, text=True, timeout=30,
    )
    assert refused.returncode != 0, refused.stdout


def test_greeter_demo_tls_prints_a_grpcurl_command_that_works_and_removes_its_files(processes):
    from conftest import Process, binary

    # The demo prints to stdout; Process reads stderr.
    demo = Process(["sh", "-c", f"exec {shlex.quote(str(binary('demo')))} --tls --hold 1>&2"], name="demo")
    processes.append(demo)
    command = demo.wait_for_line(r"^\s*(grpcurl .*)$").group(1).split()
    demo.wait_for_line(r"keep running; Ctrl-C stops them", timeout=60)
    failed = re.findall(r"failed calls: (\d+)", demo.output)
    assert failed and set(failed) == {"0"}, demo.output

    # The printed command, as printed, with the real grpcurl.
    listed = subprocess.run([str(GRPCURL), *command[1:]], capture_output=True, text=True, timeout=15)
    assert listed.returncode == 0 and "greeter.default:grpc" in listed.stdout, listed
    addr = command[-2]
    refused = grpcurl_tls(addr, "list", flags=["-plaintext"])
    assert refused.returncode != 0, refused
    no_cert = grpcurl_tls(addr, "list", flags=["-cacert", command[command.index("-cacert") + 1]])
    assert no_cert.returncode != 0, no_cert

    files = Path(command[command.index("-cacert") + 1]).parent
    assert files.is_dir()
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait_exit() == 0, demo.output
    assert "No call failed" in demo.output, demo.output
    assert not files.exists(), f"{files} outlived the demo"

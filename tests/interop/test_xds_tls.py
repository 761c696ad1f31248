"""`lb-server --xds-upstream-tls`: xDS clients call the backends over mutual TLS
as lb-server's Clusters tell them, against real peers: Envoy (certificates by
SDS from files) and proxyless grpcio (a `file_watcher` certificate provider
from its bootstrap, gRFC A29), both reaching lb-server's ADS over mTLS, both
calling greeter-server processes that serve mTLS.

Every backend certificate names the service as pods' certificates do,
`greeter.default.svc`, not an IP. Two backends are wrong on purpose: the
"stranger" has the right name from another CA, the "impostor" a certificate
from the right CA for another name. Neither may ever serve a call.

Both clients also pick up a rotated CA file without a restart: Envoy when a
file is moved into the SDS directory it watches (a Secret volume's swap),
gRPC's file_watcher on its next refresh.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import grpc
import pytest
import trustme

from conftest import Greeter, Process, binary, wait_until, write_file_atomic, write_yaml
from test_tls import Pair, Pki, envoy_ads_over_mtls, grpc_ads_over_mtls, pki, sds_file  # noqa: F401 - pki is a fixture
from test_xds import GREETER, start_envoy  # noqa: F401 - start_envoy is a fixture
from xds_helpers import XdsClient, envoy_bootstrap, free_port

pytestmark = pytest.mark.timeout(120)

# The name lb-server verifies a backend of greeter.default:grpc as (and sends as SNI).
SERVER_NAME = "greeter.default.svc"
# The names lb-server's Clusters use: Envoy's SDS secrets (files in the SDS
# directory) and gRPC's certificate provider instance.
CERT_SECRET = "lookaside-upstream-cert"
CA_SECRET = "lookaside-upstream-ca"
PROVIDER = "lookaside-upstream"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@pytest.fixture
def tls_greeter(processes, pki):
    """Starts greeter-server NAME serving mTLS with `pair`, requiring a client
    certificate from the test CA."""

    def start(name: str, pair: Pair) -> Greeter:
        process = Process(
            [
                binary("greeter-server"), "--listen", "127.0.0.1:0", "--name", name,
                "--tls-cert", pair.cert, "--tls-key", pair.key, "--tls-client-ca", pki.ca_file,
            ],
            name=f"greeter-{name}",
        )
        processes.append(process)
        match = process.wait_for_line(r"greeter-server listening addr=(\S+)")
        return Greeter(process, match.group(1), name)

    return start


@pytest.fixture
def backends(tls_greeter, pki):
    """g1 and g2 with good certificates; the stranger (another CA) and the
    impostor (another name)."""
    good = pki.issue("greeter", SERVER_NAME)
    stranger = pki.issue("stranger", SERVER_NAME, ca=trustme.CA())
    impostor = pki.issue("impostor", "other.default.svc")
    return {
        "g1": tls_greeter("g1", good),
        "g2": tls_greeter("g2", good),
        "stranger": tls_greeter("stranger", stranger),
        "impostor": tls_greeter("impostor", impostor),
    }


def lb_flags(pki: Pki, *more: str) -> list[str]:
    return [*pki.lb_flags(), "--xds-upstream-tls", *more]


def evenly(served: dict, calls: int) -> bool:
    """All `calls` served by g1 and g2, each within a tenth of `calls` of half.

    Not exact: gRPC's round robin starts every new picker at a random index,
    and a picker is rebuilt each time a refused backend's subchannel goes
    from CONNECTING to TRANSIENT_FAILURE again (its backoff retries), so
    each rebuild may give one backend an extra call (CI saw 22/18)."""
    return (
        set(served) == {"g1", "g2"}
        and sum(served.values()) == calls
        and abs(served["g1"] - served["g2"]) <= calls // 5
    )


def refused_handshake(greeter: Greeter) -> str:
    """Waits for the backend to log a TLS handshake its client gave up; returns the line."""
    return greeter.process.wait_for_line(r"TLS handshake failed.*").group(0)


# --------------------------------------------------------------------------- Envoy


def upstream_sds_dir(pki: Pki, ca_file: Path | None = None) -> Path:
    """The directory given to --xds-upstream-sds-dir, with the SDS files of the
    secrets lb-server's Clusters name: Envoy's client certificate, and the CA
    it verifies the backends with (`ca_file`, the test CA unless given). The
    certificate files live in the same directory, as in a projected volume."""
    sds_dir = pki.dir / "upstream-sds"
    sds_dir.mkdir()
    envoy_pair = pki.issue("envoy", "envoy.test")
    write_file_atomic(sds_dir / "ca.crt", (ca_file or pki.ca_file).read_text())
    sds_file(sds_dir / f"{CERT_SECRET}.yaml", {
        "name": CERT_SECRET,
        "tls_certificate": {
            "certificate_chain": {"filename": str(envoy_pair.cert)},
            "private_key": {"filename": str(envoy_pair.key)},
        },
    })
    sds_file(sds_dir / f"{CA_SECRET}.yaml", {
        "name": CA_SECRET,
        "validation_context": {"trusted_ca": {"filename": str(sds_dir / "ca.crt")}},
    })
    return sds_dir


def envoy_for(lb, pki: Pki, start_envoy):
    """An Envoy with ADS to lb-server over mTLS and a listener routing to GREETER."""
    port = free_port()
    bootstrap = envoy_ads_over_mtls(envoy_bootstrap(lb.grpc_addr, port, GREETER, "envoy-upstream-tls"), pki)
    return start_envoy(lb.grpc_addr, node_id="envoy-upstream-tls", config_text=json.dumps(bootstrap), port=port)


def caller(stubs, channel):
    """calls(n) makes n calls on `channel`: (served by backend, failed by code, failure messages)."""
    stub = stubs.helloworld_pb2_grpc.GreeterStub(channel)
    request = stubs.helloworld_pb2.HelloRequest(name="envoy")

    def calls(n: int) -> tuple[Counter, Counter, set[str]]:
        served: Counter = Counter()
        failed: Counter = Counter()
        messages: set[str] = set()
        for _ in range(n):
            try:
                served[stub.SayHello(request, timeout=2).backend] += 1
            except grpc.RpcError as error:
                failed[error.code().name] += 1
                messages.add(error.details() or "")
        return served, failed, messages

    return calls


def envoy_ssl_stats(envoy) -> dict[str, int]:
    """The TLS counters of the greeter cluster (Envoy writes its ':' as '_')."""
    stats: dict[str, int] = {}
    for line in envoy.admin.get("/stats?filter=ssl").splitlines():
        match = re.match(r"cluster\.greeter\.default.grpc\.ssl\.(\w+): (\d+)$", line.strip())
        if match:
            stats[match.group(1)] = int(match.group(2))
    return stats


def test_envoy_calls_mtls_backends_with_sds_files_and_never_a_wrong_certificate(
    start_lb, start_envoy, backends, stubs, pki
):
    g1, g2 = backends["g1"], backends["g2"]
    sds_dir = upstream_sds_dir(pki)
    lb = start_lb(
        services={GREETER: [g1.addr, g2.addr]},
        extra=lb_flags(pki, "--xds-upstream-sds-dir", str(sds_dir)),
    )
    envoy = envoy_for(lb, pki, start_envoy)
    channel = grpc.insecure_channel(f"127.0.0.1:{envoy.port}")
    try:
        calls = caller(stubs, channel)
        wait_until(lambda: calls(1)[0], 20, "a first call through Envoy to an mTLS backend")
        served, failed, _ = calls(40)
        assert not failed, failed
        assert evenly(served, 40), served
        # The backends saw Envoy's certificate (they require one): no refused handshake yet.
        assert envoy_ssl_stats(envoy).get("handshake", 0) >= 2, envoy_ssl_stats(envoy)
        assert envoy_ssl_stats(envoy).get("fail_verify_error", 0) == 0
        assert envoy_ssl_stats(envoy).get("fail_verify_san", 0) == 0

        # The stranger and the impostor join the service.
        stranger, impostor = backends["stranger"], backends["impostor"]
        write_yaml(lb.file, {GREETER: [g1.addr, g2.addr, stranger.addr, impostor.addr]})
        wait_until(lambda: len(envoy.admin.hosts(GREETER)) == 4, 10, "Envoy to know the four backends")
        served, failed, messages = calls(40)
        # Envoy tries them (no health checks), refuses their certificates, and
        # fails those calls: UNAVAILABLE, a connection failure (Envoy 1.40 does
        # not name the TLS reason in the message; its TLS counters do).
        assert set(served) == {"g1", "g2"}, served
        assert set(failed) == {"UNAVAILABLE"} and failed["UNAVAILABLE"] >= 10, (failed, messages)
        assert all("connection failure" in message for message in messages), messages
        stats = envoy_ssl_stats(envoy)
        assert stats.get("fail_verify_error", 0) >= 1, f"the stranger's CA is unknown: {stats}"
        assert stats.get("fail_verify_san", 0) >= 1, f"the impostor's name is wrong: {stats}"
        # Each bad backend saw Envoy give up its handshake.
        refused_handshake(stranger)
        refused_handshake(impostor)
    finally:
        channel.close()


def test_envoy_picks_up_a_rotated_ca_without_a_restart(start_lb, start_envoy, backends, stubs, pki):
    # Envoy starts out trusting another CA: every backend is refused.
    other_ca = pki.dir / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    sds_dir = upstream_sds_dir(pki, ca_file=other_ca)
    g1 = backends["g1"]
    lb = start_lb(services={GREETER: [g1.addr]}, extra=lb_flags(pki, "--xds-upstream-sds-dir", str(sds_dir)))
    envoy = envoy_for(lb, pki, start_envoy)
    channel = grpc.insecure_channel(f"127.0.0.1:{envoy.port}")
    try:
        calls = caller(stubs, channel)
        wait_until(
            lambda: calls(1)[1] and envoy_ssl_stats(envoy).get("fail_verify_error", 0) >= 1,
            20,
            "Envoy to refuse the backend's certificate",
        )
        assert not calls(3)[0]
        # The rotation: a new file moved into the watched directory, as a
        # Secret volume's ..data swap does. Envoy re-reads it; no restart.
        write_file_atomic(sds_dir / "ca.crt", pki.ca_file.read_text())
        wait_until(lambda: calls(1)[0], 10, "calls to succeed with the rotated CA")
        served, failed, _ = calls(10)
        assert served == {"g1": 10} and not failed, (served, failed)
    finally:
        channel.close()


# --------------------------------------------------------------------------- proxyless gRPC


def grpc_upstream_bootstrap(lb, pki: Pki, node_id: str, ca_file: Path | None = None) -> dict:
    """ADS over mTLS, and the certificate provider instance lb-server's
    Clusters name: gRPC's file_watcher plugin, which re-reads its files every
    refresh_interval (so a rotation is picked up). The CA is `ca_file`, the
    test CA unless given."""
    client_pair = pki.issue("grpc-client", "grpc-client.test")
    bootstrap = grpc_ads_over_mtls(lb, pki, node_id)
    bootstrap["certificate_providers"] = {
        PROVIDER: {
            "plugin_name": "file_watcher",
            "config": {
                "certificate_file": str(client_pair.cert),
                "private_key_file": str(client_pair.key),
                "ca_certificate_file": str(ca_file or pki.ca_file),
                "refresh_interval": "1s",
            },
        }
    }
    return bootstrap


def test_proxyless_grpc_calls_mtls_backends_with_its_certificate_provider(start_lb, backends, stubs, pki):
    g1, g2 = backends["g1"], backends["g2"]
    lb = start_lb(services={GREETER: [g1.addr, g2.addr]}, extra=lb_flags(pki))
    bootstrap = grpc_upstream_bootstrap(lb, pki, "grpc-upstream-tls")
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", json.dumps(bootstrap), stubs_dir, xds_credentials=True)
    try:
        try:
            wait_until(
                lambda: (r := client.calls(4)) and set(r["backends"]) == {"g1", "g2"} and not r["errors"],
                20,
                "proxyless calls over g1 and g2 with mTLS",
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\nclient:\n" + "\n".join(client.stderr[-20:])) from None
        result = client.calls(40)
        assert evenly(result["backends"], 40) and not result["errors"], result

        # The stranger and the impostor join: gRPC tries them (the stranger
        # sees its handshake refused, so the update has arrived), refuses
        # their certificates, and its round robin keeps every call on the
        # backends that passed: the calls go elsewhere, none fails.
        stranger, impostor = backends["stranger"], backends["impostor"]
        write_yaml(lb.file, {GREETER: [g1.addr, g2.addr, stranger.addr, impostor.addr]})
        refused = refused_handshake(stranger)
        result = client.calls(40)
        assert evenly(result["backends"], 40) and not result["errors"], (result, refused)

        # Alone, each bad backend fails every call, with gRPC's reason.
        for bad, reason in [
            (impostor, "SANs from certificate did not match SANs from xDS control plane"),
            (stranger, "CERTIFICATE_VERIFY_FAILED"),
        ]:
            write_yaml(lb.file, {GREETER: [bad.addr]})
            wait_until(
                lambda: reason in client.calls(1)["messages"].get("UNAVAILABLE", ""),
                10,
                f"calls to the {bad.name} alone to fail with {reason!r}",
            )
            result = client.calls(5)
            assert not result["backends"] and result["errors"] == {"UNAVAILABLE": 5}, result
            assert reason in result["messages"]["UNAVAILABLE"], result
    finally:
        client.stop()


def test_proxyless_grpc_picks_up_a_rotated_ca_without_a_restart(start_lb, backends, stubs, pki):
    ca_file = pki.dir / "grpc-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    lb = start_lb(services={GREETER: [backends["g1"].addr]}, extra=lb_flags(pki))
    bootstrap = grpc_upstream_bootstrap(lb, pki, "grpc-rotation", ca_file=ca_file)
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", json.dumps(bootstrap), stubs_dir, xds_credentials=True)
    try:
        result = client.calls(2)
        assert result["errors"] == {"UNAVAILABLE": 2}, result
        assert "CERTIFICATE_VERIFY_FAILED" in result["messages"]["UNAVAILABLE"], result
        write_file_atomic(ca_file, pki.ca_file.read_text())
        # file_watcher re-reads every second; the subchannel then reconnects
        # after its backoff (1 s, then growing).
        wait_until(lambda: client.calls(1)["backends"], 15, "calls to succeed with the rotated CA")
        result = client.calls(10)
        assert result["backends"] == {"g1": 10} and not result["errors"], result
    finally:
        client.stop()


def test_a_plaintext_xds_channel_cannot_reach_mtls_backends(start_lb, backends, stubs, pki):
    """The control: a grpcio channel that ignores xDS security (insecure
    credentials) speaks plaintext to the mTLS backends and fails, so the calls
    above succeed only because of the TLS context lb-server sent. Same
    bootstrap: the only difference is the channel's credentials."""
    g1 = backends["g1"]
    lb = start_lb(services={GREETER: [g1.addr]}, extra=lb_flags(pki))
    bootstrap = grpc_upstream_bootstrap(lb, pki, "grpc-plaintext")
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", json.dumps(bootstrap), stubs_dir)
    try:
        result = client.calls(3)
        assert not result["backends"] and result["errors"] == {"UNAVAILABLE": 3}, result
    finally:
        client.stop()


def test_a_grpc_bootstrap_without_the_provider_instance_rejects_the_cluster(start_lb, backends, stubs, pki):
    """The instance lb-server names must be in the client's bootstrap: without
    it gRPC NACKs the Cluster (counted by lb-server) and has nowhere to call."""
    lb = start_lb(services={GREETER: [backends["g1"].addr]}, extra=lb_flags(pki))
    bootstrap = grpc_ads_over_mtls(lb, pki, "grpc-no-provider")
    stubs_dir = Path(stubs.helloworld_pb2.__file__).resolve().parents[1]
    client = XdsClient(f"xds:///{GREETER}", json.dumps(bootstrap), stubs_dir, xds_credentials=True)
    try:
        result = client.calls(2)
        assert not result["backends"] and result["errors"] == {"UNAVAILABLE": 2}, result
        assert PROVIDER in result["messages"]["UNAVAILABLE"], result
        wait_until(
            lambda: lb.metric("lookaside_xds_nacks_total", {"type_url": CLUSTER_TYPE}) >= 1,
            5,
            "lb-server to count the Cluster's NACK",
        )
    finally:
        client.stop()
